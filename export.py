"""Export a trained run as a diffusers pipeline folder that loads with DiffusionPipeline.from_pretrained:

    python export.py --run runs/demo --out exports/demo [--scheduler dpm++|ddim] [--format auto|unet3d|facevid]
                     [--merge-lora]

A backbone expressible as UNet3DConditionModel (e.g. one started from ModelScope / zeroscope) becomes a standard
TextToVideoSDPipeline folder; any other (FaceVid's own layout, image-to-video) a FaceVidDiffusersPipeline folder
(load with trust_remote_code=True where facevid is installed). See facevid/export.py and the folder's README.md.
"""

import argparse
import sys

from facevid.export import EXPORT_FORMATS, export_run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory written by train.py (stage t2v, any task)")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--scheduler", choices=["dpm++", "ddim"], default=None, help="default: the run's sampler")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="auto",
                        help="auto = UNet3DConditionModel when the backbone has an equivalent, else facevid")
    parser.add_argument("--no-ema", action="store_true", help="export the raw weights even when EMA weights exist")
    parser.add_argument("--merge-lora", action="store_true",
                        help="a LoRA run (train.trainable=lora): merge the adapters into the exported UNet's weights "
                        "(default: the base UNet plus OUT/pytorch_lora_weights.safetensors)")
    args = parser.parse_args(argv)
    try:
        kind = export_run(args.run, args.out, use_ema=not args.no_ema, scheduler=args.scheduler, format=args.format,
                          merge_lora=args.merge_lora)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    what = {"unet3d": "TextToVideoSDPipeline (UNet3DConditionModel)",
            "facevid": "FaceVidDiffusersPipeline (FaceVidUNet3D; load with trust_remote_code=True)"}[kind]
    print(f"exported {args.run} to {args.out} as {what}; see {args.out}/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
