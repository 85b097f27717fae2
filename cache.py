"""Encode a dataset once into the latent + text-embedding cache, then train many epochs from it.

    accelerate launch cache.py --config configs/demo.yaml [data.cache_dir=...] [key=value ...]

Uses the config's VAE, text encoder, resolution, frames and data.cache_* settings; splits the clips
across all Accelerate processes; resumes an interrupted build. Train from it with data.cache=use
(or data.cache=auto, which runs this step itself before training).
"""

import argparse
import sys
from pathlib import Path

from facevid.cache_builder import build_cache
from facevid.config import load_config
from facevid.engine import build_accelerator
from facevid.run_log import setup_logging
from facevid.schema import ConfigError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
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
    try:
        report = build_cache(cfg, accelerator)
    except ConfigError as err:  # found once the manifest is read or the cache opened
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if report.clips_encoded + report.clips_already_cached > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
