"""Train a FaceVid stage: `accelerate launch train.py --config configs/demo.yaml [key=value ...]`.

Parses and validates the config (before any work starts), then composes the run: the stage (the core's, or
a plug-in's: plugin.module), the evaluation callback when eval.every > 0, and the Trainer.
"""

import argparse
import sys

from facevid.checkpoints import CheckpointWriteError
from facevid.config import load_config
from facevid.health import NonFiniteLossError
from facevid.schema import ConfigError
from facevid.stages import build_stage
from facevid.trainer import Trainer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder (same as resume=...)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"resume={args.resume}"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    evaluation = None
    if cfg.eval.every:
        from evaluation.training import TrainingEvaluation

        evaluation = TrainingEvaluation(cfg)
    try:
        Trainer(cfg, build_stage(cfg), evaluation=evaluation).fit()
    except ConfigError as err:  # found once the data is read (e.g. a cache built for another setup)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, CheckpointWriteError) as err:  # their message says what to do: no traceback
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
