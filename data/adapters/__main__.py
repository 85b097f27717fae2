"""Command line: ``python -m data.adapters NAME --root ROOT --out manifest.jsonl [options]``."""

from __future__ import annotations

import argparse
import sys

from data.adapters import ADAPTERS, run_adapter
from data.adapters.celebv import VIDEO_MODES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.adapters",
                                     description="Turn a face-video dataset release into a FaceVid manifest.")
    parser.add_argument("dataset", choices=ADAPTERS)
    parser.add_argument("--root", required=True,
                        help="dataset folder (for csv: the CSV file, or a folder holding one)")
    parser.add_argument("--out", required=True, help="manifest to write (JSONL); the report goes beside it")
    parser.add_argument("--annotations", help="facevid1k: annotation file or folder (default: every "
                                              ".json/.jsonl under --root); easyanimate: the metadata JSON "
                                              "(default: the one .json in --root)")
    parser.add_argument("--info", help="celebvhq/celebvtext: info JSON (default: celebvhq_info.json / "
                                       "*info*.json in --root)")
    parser.add_argument("--texts", help="celebvtext: texts folder (default: ROOT/texts)")
    parser.add_argument("--csv", dest="csv_path", help="csv: the CSV file (default: the one .csv in --root)")
    parser.add_argument("--videos", dest="videos_mode", choices=VIDEO_MODES, default="auto",
                        help="celebv*: processed <clip_id> clips, raw <ytb_id> sources, or whichever exists")
    parser.add_argument("--allow-uncaptioned", action="store_true",
                        help="folder, easyanimate: keep videos without a caption (unconditional training)")
    parser.add_argument("--keep-images", action="store_true",
                        help="easyanimate: write image entries as 1-frame clips (default: skipped, counted)")
    parser.add_argument("--probe", action="store_true",
                        help="open every video: undecodable ones become errors, fps is recorded")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any clip is missing or in error")
    args = parser.parse_args(argv)
    options = vars(args)
    dataset, root, out, strict = (options.pop(k) for k in ("dataset", "root", "out", "strict"))
    try:
        report = run_adapter(dataset, root, out, **options)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if report["clips_written"] == 0:
        print("error: no clip written; see the report for why", file=sys.stderr)
        return 1
    if strict and (report["clips_missing_on_disk"] or report["annotation_errors"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
