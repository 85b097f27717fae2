"""Per-rank memory of the training state under DDP, FSDP2 and DeepSpeed ZeRO-3 (facevid/engine.py):

    python bench/engine_memory.py [--world 2] [--measure-width 64] [--no-measure]

Two tables, each figure labelled with how it was obtained:

1. COUNTED at full width: the configs/t2v_256.yaml UNet (1404.8M parameters) is built on the meta device (no
   memory). FSDP2's placement is real: `fully_shard` (one unit per UNetLayer plus the root, as the engine wraps it)
   is applied to the meta parameters in a fake process group of --world ranks, and each rank's DTensor local shard
   sizes are summed (rank 0 and the last rank; padding can make them differ). ZeRO-3's is DeepSpeed's partition
   rule, ceil(numel / world) elements of every parameter per rank, plus the whole of each parameter smaller than
   stage3_param_persistence_threshold (1e5, DeepSpeed's default), which every rank keeps gathered. Elements are
   turned into bytes with the dtypes each engine holds under the shipped GPU configs (bf16 mixed precision):
     DDP    fp32 weights 4 + fp32 gradients 4 + AdamW 8 + EMA 4 bytes per parameter, whole model on every rank;
     FSDP2  the same 20 bytes per element of the rank's shard (fp32 master shards; bf16 copies of one unit at a
            time exist only while it computes);
     ZeRO-3 bf16 slice 2 + fp32 master 4 + fp32 gradient partition 4 (the engine sets grad_accum_dtype fp32
            under bf16) + AdamW 8 + EMA 4 bytes per element of the rank's slice, + 2 bytes per persistent
            element (+ up to 4 bytes per slice element during the optimizer step, when DeepSpeed flattens the
            slice's gradients into one fp32 tensor for AdamW: shown separately).
   "buffers" are what the engine allocates besides: DDP's gradient buckets (a second fp32 copy of all gradients,
   as the trainer builds DDP: gradient_as_bucket_view off), ZeRO-3's gradient reduce bucket (reduce_bucket_size,
   DeepSpeed's default 5e8 elements, in the bf16 communication dtype, whatever the model size); FSDP2's
   all-gather buffers hold one unit at a time and are not counted. Activations and allocator caching are not
   in these figures.

2. MEASURED at reduced width (--measure-width: block_out_channels [w, 2w, 4w, 4w], the recipe otherwise) on --world
   real CPU ranks (gloo): for each engine `accelerate launch` with its CPU config (configs/accelerate/
   cpu_2proc.yaml, fsdp2_2proc_cpu.yaml, zero3_2proc_cpu.yaml; fp32, as the CPU configs run) starts this script's
   worker, which builds the UNet, prepares it with the facevid engine (EMA included), runs 2 training steps on
   random latents, and reports (a) the parameter elements this rank holds, read from the live tensors (DTensor
   local shards, ZeRO-3 ds_tensor slices plus persistent parameters), next to the counting rule's prediction for
   the same model, and (b) resident memory (RSS, after malloc_trim) over the worker's RSS before the model was
   built: steady state after the steps, and the peak (ru_maxrss, which includes building the full model on each
   rank before it is sharded, and the activations). The CPU figures are fp32 everywhere, so their ratios differ
   from the bf16 table; they check the counting, not replace it.

The machine these figures come from is shared: RSS has noise of some tens of MB; ratios are what to read.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from facevid.config import load_config  # noqa: E402
from facevid.engine import FSDP_WRAP_UNIT  # noqa: E402
from facevid.stages import build_unet  # noqa: E402

RECIPE = REPO / "configs" / "t2v_256.yaml"
TEXT_WIDTH = 768  # the recipe's text encoder width (CLIP ViT-L/14): the UNet's cross-attention dim
PERSISTENCE = 100_000  # DeepSpeed's default stage3_param_persistence_threshold (elements)
REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)
ENGINE_CONFIGS = {"ddp": "cpu_2proc.yaml", "fsdp2": "fsdp2_2proc_cpu.yaml", "zero3": "zero3_2proc_cpu.yaml"}
GIB = 1024 ** 3
MARK = "ENGINE_MEMORY "  # prefix of the workers' result lines


def recipe_unet(width: int | None = None, device: str = "meta"):
    """The recipe's UNet (full width, or block_out_channels [w, 2w, 4w, 4w] with 32-dim heads)."""
    overrides = [] if width is None else [f"unet.block_out_channels=[{width},{2 * width},{4 * width},{4 * width}]",
                                          "unet.attention_head_dim=32"]
    cfg = load_config(RECIPE, overrides, validate_files=False)
    with torch.device(device):
        return build_unet(cfg.unet, 4, 0, TEXT_WIDTH)


# ------------------------------------------------------------------------------------------ counting
def fsdp2_local_elements(width: int | None, world: int) -> list[int]:
    """Per-rank parameter elements after fully_shard on the meta device (fake process group, no memory)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    counts = []
    for rank in sorted({0, world - 1}):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        try:
            model = recipe_unet(width)
            mesh = init_device_mesh("cpu", (world,))
            for module in model.modules():
                if type(module).__name__ == FSDP_WRAP_UNIT:
                    fully_shard(module, mesh=mesh)
            fully_shard(model, mesh=mesh)
            counts.append(sum(p.to_local().numel() for p in model.parameters()))
        finally:
            dist.destroy_process_group()
    return counts


def zero3_elements(model, world: int, persistence: int = PERSISTENCE) -> tuple[int, int]:
    """(slice elements, persistent elements) per rank under DeepSpeed ZeRO-3's partitioning."""
    numels = [p.numel() for p in model.parameters()]
    return sum(math.ceil(n / world) for n in numels), sum(n for n in numels if n < persistence)


def counted_table(world: int) -> list[dict]:
    model = recipe_unet()
    total = sum(p.numel() for p in model.parameters())
    shard = max(fsdp2_local_elements(None, world))
    slices, persistent = zero3_elements(model, world)
    rows = [
        dict(engine="DDP", elements=total, weights=4 * total, grads=4 * total, adamw=8 * total, ema=4 * total,
             buffers=4 * total, transient=0),
        dict(engine="FSDP2", elements=shard, weights=4 * shard, grads=4 * shard, adamw=8 * shard, ema=4 * shard,
             buffers=0, transient=0),
        dict(engine="ZeRO-3", elements=slices + persistent, weights=6 * slices + 2 * persistent, grads=4 * slices,
             adamw=8 * slices, ema=4 * slices, buffers=2 * REDUCE_BUCKET, transient=4 * slices),
    ]
    for row in rows:
        row["total"] = row["weights"] + row["grads"] + row["adamw"] + row["ema"] + row["buffers"]
    return [dict(row, params_total=total) for row in rows]


def print_counted(rows: list[dict], world: int) -> None:
    total = rows[0]["params_total"]
    print(f"\nCOUNTED (meta device, no memory used): configs/t2v_256.yaml UNet at full width, {total / 1e6:.1f}M "
          f"parameters, {world} ranks, bf16 mixed precision as in the GPU configs. GiB per rank:")
    print("| engine | parameter elements held | weights | gradients | AdamW state | EMA | buffers | total | vs DDP |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = f" (+{r['transient'] / GIB:.2f} during the step)" if r["transient"] else ""
        print(f"| {r['engine']} | {r['elements'] / 1e6:.1f}M | {r['weights'] / GIB:.2f} | {r['grads'] / GIB:.2f} | "
              f"{r['adamw'] / GIB:.2f} | {r['ema'] / GIB:.2f} | {r['buffers'] / GIB:.2f} | "
              f"{r['total'] / GIB:.2f}{peak} | {r['total'] / rows[0]['total']:.2f}x |")


# ---------------------------------------------------------------------------------------- measuring
def rss_bytes() -> int:
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS shows what is still held
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def held_elements(model) -> int:
    """Parameter elements this rank really holds: DTensor local shards, ZeRO-3 slices plus gathered data."""
    count = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            count += p.ds_tensor.numel() + p.data.numel()  # .data is empty unless the parameter stays gathered
        else:
            count += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return count


def worker(width: int) -> None:
    """One rank, started by `accelerate launch`: the facevid engine the launch config asks for, two steps."""
    from types import SimpleNamespace

    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    from facevid.engine import build_engine

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    engine = build_engine(acc, SimpleNamespace(batch_size=1, max_grad_norm=1.0, gradient_accumulation_steps=1))
    before = rss_bytes()
    torch.manual_seed(0)
    model = recipe_unet(width, device="cpu")
    total = sum(p.numel() for p in model.parameters())
    predicted = {"ddp": total, "zero3": sum(zero3_elements(model, acc.num_processes))}.get(engine.name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ema = EMAModel(list(model.parameters()), decay=0.99)
    model, optimizer, scheduler = engine.prepare(model, optimizer, scheduler, ema)
    module = acc.unwrap_model(model)
    g = torch.Generator().manual_seed(acc.process_index)
    for _ in range(2):
        sample, text = torch.randn(1, 4, 4, 16, 16, generator=g), torch.randn(1, 8, TEXT_WIDTH, generator=g)
        loss = model(sample, torch.tensor([500]), text).pow(2).mean()
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=False)  # keep gradient buffers: they are part of the steady state
        ema.step([p for p in module.parameters() if p.requires_grad])
    steady = rss_bytes() - before
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(MARK + json.dumps(dict(engine=engine.name, rank=acc.process_index, params_total=total,
                                 held=held_elements(module), predicted=predicted, steady=steady, peak=peak)),
          flush=True)
    acc.end_training()


def measure(engine: str, width: int, world: int, timeout_s: int = 600) -> list[dict]:
    config = REPO / "configs" / "accelerate" / ENGINE_CONFIGS[engine]
    with tempfile.TemporaryDirectory() as scratch:  # DeepSpeed's launcher may leave files in the cwd
        cmd = ["timeout", "-k", "10", str(timeout_s), sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(config), "--num_processes", str(world), "--main_process_port",
               str(29600 + os.getpid() % 1000), str(Path(__file__).resolve()), "--worker", str(width)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=scratch, env=env)
    rows = [json.loads(line[len(MARK):]) for line in result.stdout.splitlines() if line.startswith(MARK)]
    if result.returncode != 0 or len(rows) != world:
        raise RuntimeError(f"{engine} worker failed (exit {result.returncode}):\n{(result.stdout + result.stderr)[-3000:]}")
    return sorted(rows, key=lambda row: row["rank"])


def print_measured(results: dict[str, list[dict]], width: int, world: int) -> None:
    total = next(iter(results.values()))[0]["params_total"]
    fsdp2 = fsdp2_local_elements(width, world)
    print(f"\nMEASURED on {world} CPU ranks (gloo, fp32, shared machine): the same UNet at block_out_channels "
          f"[{width}, {2 * width}, {4 * width}, {4 * width}], {total / 1e6:.1f}M parameters, 2 training steps "
          "with EMA. Per rank (max over ranks):")
    print("| engine | parameter elements held (live tensors) | counting rule predicts | RSS after steps, MiB | "
          "vs DDP | peak RSS, MiB |")
    print("|---|---|---|---|---|---|")
    base = max(row["steady"] for row in results["ddp"])
    for engine, rows in results.items():
        held, steady, peak = (max(row[k] for row in rows) for k in ("held", "steady", "peak"))
        predicted = rows[0]["predicted"] if engine != "fsdp2" else max(fsdp2)
        print(f"| {engine} | {held / 1e6:.2f}M | {predicted / 1e6:.2f}M | {steady / 2**20:.0f} | "
              f"{steady / base:.2f}x | {peak / 2**20:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--measure-width", type=int, default=64,
                        help="first block width of the measured UNet (default 64: about 56M parameters)")
    parser.add_argument("--no-measure", action="store_true", help="only the counted full-width table")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.worker)
    print_counted(counted_table(args.world), args.world)
    if not args.no_measure:
        results = {engine: measure(engine, args.measure_width, args.world) for engine in ENGINE_CONFIGS}
        print_measured(results, args.measure_width, args.world)


if __name__ == "__main__":
    main()
