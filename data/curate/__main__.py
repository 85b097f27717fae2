"""Command line: ``python -m data.curate --input DIR_OR_LIST [...] --out DIR [--workers N] [thresholds]``.

Every threshold of CurationConfig is an option of the same name (``--min-face 96``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from data.curate.pipeline import CurationConfig
from data.curate.runner import ConfigMismatch, run_curation

HELP = {
    "out_size": "side of the square clips written (pixels)",
    "fps": "frame rate of the clips written",
    "detect_every": "run the face detector every k frames (interpolated in between)",
    "min_face": "minimum face width in source pixels",
    "min_seconds": "shortest clip kept",
    "max_seconds": "longer face shots are split into clips of at most this",
    "min_sharpness": "minimum variance of the Laplacian of the face (at 96x96)",
    "min_brightness": "minimum mean luma of the crop (0-255)",
    "max_brightness": "maximum mean luma of the crop (0-255)",
    "max_border": "maximum share of the crop taken by black bars",
    "max_camera_motion": "maximum camera motion, frame widths per second",
    "max_face_motion": "maximum face motion, crop sides per second",
    "shot_threshold": "colour-histogram distance that marks a cut",
    "crop_scale": "crop side / face width",
    "crop_drop": "crop centre below the face centre, in face heights",
    "smoothing": "EMA weight of each new detection in the crop window (1 = no smoothing)",
    "iou_threshold": "overlap needed for a detection to continue the face track",
    "max_missed": "keyframes without a detection that a track survives",
    "detector": "'haar' or package.module:factory returning detector(rgb) -> [(x, y, w, h)]",
    "captioner": "package.module:factory returning captioner(frames, stats) -> str | list[str]",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data.curate",
                                     description="Raw video -> captioned face clips, manifest and report.")
    parser.add_argument("--input", nargs="+", required=True,
                        help="video folders (searched recursively), list files (.txt: one path a line) or videos")
    parser.add_argument("--out", required=True, help="output folder: clips/, manifest.jsonl, report.json")
    parser.add_argument("--workers", type=int, default=1, help="processes (1 = in this process)")
    parser.add_argument("--redo", action="store_true", help="forget earlier results in --out and start over")
    parser.add_argument("--limit", type=int, help="process at most this many pending inputs, then stop")
    for option in dataclasses.fields(CurationConfig):
        kind = str if option.name in ("detector", "captioner") else type(option.default)
        parser.add_argument("--" + option.name.replace("_", "-"), type=kind, default=option.default,
                            help=f"{HELP[option.name]} (default: {option.default})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    config = CurationConfig(**{f.name: args[f.name] for f in dataclasses.fields(CurationConfig)})
    try:
        report = run_curation(args["input"], args["out"], config, workers=args["workers"], redo=args["redo"],
                              limit=args["limit"])
    except ConfigMismatch as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if report["summary"]["clips"] else 1


if __name__ == "__main__":
    sys.exit(main())
