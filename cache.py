"""Encode a dataset once into the latent + text-embedding cache, then train many epochs from it.

    accelerate launch cache.py --config configs/demo.yaml [--rebuild] [data.cache_dir=...] [key=value ...]

Uses the config's VAE, text encoder, resolution, frames and data.cache_* settings; splits the clips
across all Accelerate processes (each decodes in data.num_workers DataLoader workers and encodes
data.cache_encode_batch windows per VAE call); resumes an interrupted build. --rebuild first deletes
the cache files in data.cache_dir (of any format version, nothing else) and builds from scratch.
Train from it with data.cache=use (or data.cache=auto, which runs this step itself before training).
"""

import argparse
import sys
from pathlib import Path

from data.cache import discard_cache
from facevid.cache_builder import build_cache
from facevid.config import load_config
from facevid.engine import build_accelerator
from facevid.run_log import setup_logging
from facevid.schema import ConfigError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--rebuild", action="store_true",
                        help="delete the cache in data.cache_dir first (e.g. one of an older format version)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.cache_dir=/scratch/cache")
    args = parser.parse_args(argv)
    try:
        # data.cache=use would demand an existing cache; building one is what we are here for.
        cfg = load_config(args.config, list(args.overrides) + ["data.cache=auto", "train.tracker=none"])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    accelerator = build_accelerator(cfg, Path(cfg.output_dir))
    setup_logging(accelerator)
    if args.rebuild:
        if accelerator.is_main_process:
            discard_cache(cfg.data.cache_dir)
        accelerator.wait_for_everyone()
    try:
        report = build_cache(cfg, accelerator)
    except ConfigError as err:  # found once the manifest is read or the cache opened
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if report.clips_encoded + report.clips_already_cached > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
