"""Run by tests/test_training_robustness.py under `torch.distributed.run --nproc_per_node 2`: a tiny real
2-rank training run in which something goes wrong on rank 1 only.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/two_rank_failures.py MODE MANIFEST VAE RUN

MODE nan: rank 1's loss turns NaN at its 3rd micro-batch; disk: rank 1 cannot write its part of the step-4
checkpoint. Every rank must stop with the same error; none may wait forever for the other.
"""

import errno
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny import tiny_config  # noqa: E402

from facevid.stages import TextToVideoStage  # noqa: E402
from facevid.trainer import Trainer  # noqa: E402

RANK = int(os.environ["RANK"])


class _NaNOnRank1(TextToVideoStage):
    calls = 0

    def compute_loss(self, model, batch, generator):
        loss, logs = super().compute_loss(model, batch, generator)
        self.calls += 1
        return (loss * float("nan") if RANK == 1 and self.calls == 3 else loss), logs


def _disk_full_on_rank1():
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if RANK == 1 and ".tmp-step-00000004" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def main(mode: str, manifest: str, vae: str, run: str) -> None:
    torch.set_num_threads(1)
    cfg = tiny_config(Path(manifest), Path(run), "train.max_steps=6", "train.checkpoint_every=2",
                      "train.validate_every=0", "sample.num_inference_steps=1", vae=Path(vae))
    if mode == "disk":
        _disk_full_on_rank1()
    stage = _NaNOnRank1(cfg) if mode == "nan" else TextToVideoStage(cfg)
    try:
        Trainer(cfg, stage).fit()
    except Exception as err:
        print(f"rank {RANK} stopped: {type(err).__name__}: {err}", flush=True)
        sys.exit(3)


if __name__ == "__main__":
    main(*sys.argv[1:])
