"""The input pipeline and the trainer's own cost, measured side by side in one run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/input_pipeline.py [--clips 24] [--batches 12] [--steps 12]

Prints:
1. samples/s of 16-frame 256 px windows: raw PyAV decode in this process (data.video.read_frames), the same
   clips as training items built and collated in this process (random window, float tensor), the training
   DataLoader decoding on the fly with 1 and 2 persistent workers (data/sampler.py training_loader over
   VideoClipDataset: probe, window, decode, tensor, collate), and the DataLoader reading the latent cache
   (CachedClipDataset; SD-VAE-sized latents 4x16x32x32 and 77x768 text states, fp16, random values);
2. the trainer's per-step overhead: a tiny t2v run's step time (train.py's Trainer: loader, Accelerate, grad
   clipping, EMA, finiteness check, logging) minus the bare forward/backward/AdamW step of the same model on a
   batch prepared beforehand;
3. compiled vs eager: the same bare step with train.compile=blocks (each repeated UNet block, facevid/compile.py):
   the cold first step (compilation) and the steady step time.

FaceVid-Synth clips are generated at 256 px into a temporary folder. On a shared machine the figures are noisy:
read the ratios, which are measured in the same minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data import synth  # noqa: E402
from data.cache import FORMAT_VERSION, CacheFingerprint, CacheWriter, LatentCache, write_fingerprint  # noqa: E402
from data.dataset import CachedClipDataset, VideoClipDataset, collate_clips  # noqa: E402
from data.manifest import read_manifest  # noqa: E402
from data.sampler import ShardedEpochSampler, training_loader  # noqa: E402
from data.video import read_frames  # noqa: E402
from facevid.compile import compile_model, repeated_blocks  # noqa: E402
from facevid.config import load_config  # noqa: E402
from facevid.stages import TextToVideoStage  # noqa: E402
from facevid.trainer import Trainer  # noqa: E402
from models.vae import build_tiny_vae  # noqa: E402

FRAMES, RESOLUTION = 16, 256


def one_text_key(_caption: str) -> str:
    return "prompt"  # every caption shares one cached embedding: the read size is what is measured


def raw_decode(records, batches: int, batch: int) -> float:
    """samples/s: read_frames of a 16-frame window per clip, nothing else."""
    start = time.perf_counter()
    count = 0
    for i in range(batches * batch):
        read_frames(records[i % len(records)].video, range(0, FRAMES), RESOLUTION)
        count += 1
    return count / (time.perf_counter() - start)


def items_in_process(dataset, batches: int, batch: int) -> float:
    """samples/s of the dataset's items built in this process and collated (no DataLoader, no worker)."""
    start = time.perf_counter()
    for b in range(batches):
        collate_clips([dataset[(b * batch + i) % len(dataset)] for i in range(batch)])
    return batches * batch / (time.perf_counter() - start)


def loader_rate(dataset, workers: int, batches: int, batch: int) -> float:
    """samples/s of the training DataLoader after its first batch (worker start-up is a one-off)."""
    sampler = ShardedEpochSampler(len(dataset), batch, seed=0)
    loader = training_loader(dataset, sampler, collate_clips, batch, num_workers=workers, seed=0)
    count, start = 0, None
    for epoch in range(1000):
        sampler.set_epoch(epoch)
        for _ in loader:
            if start is None:
                start = time.perf_counter()
                continue
            count += batch
            if count >= batches * batch:
                rate = count / (time.perf_counter() - start)
                if workers:
                    loader._iterator._shutdown_workers()
                return rate
    raise RuntimeError("not enough batches")


def cached_dataset(records, folder: Path) -> CachedClipDataset:
    writer = CacheWriter(folder, rank=0, shard_clips=64)
    generator = torch.Generator().manual_seed(0)
    for record in records:
        mean = torch.randn(4, FRAMES, RESOLUTION // 8, RESOLUTION // 8, generator=generator)
        writer.add_latent(record.clip_id, 0, 0, mean, mean.abs())
        writer.clip_done()
    writer.add_text("prompt", torch.randn(77, 768, generator=generator), torch.ones(77, dtype=torch.bool))
    writer.flush()
    write_fingerprint(folder, CacheFingerprint(  # what a real build records; the reader needs its text layout
        format_version=FORMAT_VERSION, vae="random", vae_weights="none", text_encoder="random",
        text_encoder_weights="none", text_max_length=77, text_storage="padded", resolution=RESOLUTION,
        num_frames=FRAMES, frame_stride=1, target_fps=None, windows_per_clip=1, flip=False, dtype="fp16",
        posterior="mean+std"))
    return CachedClipDataset(records, LatentCache(folder), one_text_key)


def tiny_run_config(manifest: Path, vae: Path, out: Path, steps: int, *extra: str):
    return load_config(None, [
        "stage=t2v", f"output_dir={out}", f"data.manifest={manifest}", f"vae.pretrained={vae}",
        "data.resolution=32", "data.num_frames=8", "data.num_workers=1", "vae.chunk_frames=16",
        "unet.block_out_channels=[32,64]", "unet.attention_levels=[false,true]", "unet.attention_head_dim=16",
        "train.batch_size=2", "train.log_every=1", f"train.max_steps={steps}", f"train.checkpoint_every={steps}",
        "train.tracker=none", "train.ema_decay=0.999", "train.lr_warmup_steps=0", "train.lr_scheduler=constant",
        "sample.num_inference_steps=1", "train.validation_prompts=[a person talking]", *extra])


def trainer_step_time(cfg) -> tuple[float, Trainer]:
    """Median seconds per optimizer step of a real run (from metrics.jsonl's elapsed_s), first 2 steps excluded."""
    trainer = Trainer(cfg, TextToVideoStage(cfg))
    trainer.fit()
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    elapsed = [row["elapsed_s"] for row in rows if "elapsed_s" in row]
    return statistics.median(np.diff(elapsed[2:])), trainer


def bare_step_times(model, stage, batch, steps: int) -> list[float]:
    """Seconds per step of compute_loss + backward + AdamW on one prepared batch, nothing around it."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss, _ = stage.compute_loss(model, batch, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--batches", type=int, default=12, help="batches of 2 timed per loader measurement")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per training measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the input-pipeline rows")
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor")  # a cold compile, not the disk cache's
        print(f"generating {args.clips} FaceVid-Synth clips, {FRAMES + 8} frames at {RESOLUTION} px ...", flush=True)
        manifest = synth.generate(work / "synth256", num_clips=args.clips, num_frames=FRAMES + 8,
                                  resolution=RESOLUTION, fps=12.0, seed=0, progress=False)
        records = read_manifest(manifest)[0]
        dataset = VideoClipDataset(records, num_frames=FRAMES, resolution=RESOLUTION, seed=0)
        cached = cached_dataset(records, work / "cache")
        measures = {
            "raw PyAV decode, this process": lambda: raw_decode(records, args.batches, 2),
            "dataset items + collate, this process": lambda: items_in_process(dataset, args.batches, 2),
            "DataLoader on the fly, 1 persistent worker": lambda: loader_rate(dataset, 1, args.batches, 2),
            "DataLoader on the fly, 2 persistent workers": lambda: loader_rate(dataset, 2, args.batches, 2),
            "DataLoader from the latent cache, 1 worker": lambda: loader_rate(cached, 1, args.batches * 4, 2),
        }
        # Interleaved rounds, medians: the load of a shared machine drifts from minute to minute.
        rates = {name: [] for name in measures}
        for _ in range(args.rounds):
            for name, measure in measures.items():
                rates[name].append(measure())
        raw = statistics.median(rates["raw PyAV decode, this process"])
        print(f"\n1. Input pipeline, {FRAMES} frames x {RESOLUTION} px, batches of 2 (torch threads "
              f"{torch.get_num_threads()}; median of {args.rounds} interleaved rounds):")
        for name, values in rates.items():
            rate = statistics.median(values)
            print(f"   {name:46s} {rate:8.1f} samples/s  ({rate / raw:.2f}x raw decode; rounds "
                  f"{', '.join(f'{v:.1f}' for v in values)})")

        vae = work / "vae"
        build_tiny_vae([32, 32], 1, 4).save_pretrained(vae)
        small = synth.generate(work / "synth32", num_clips=16, num_frames=16, resolution=32, fps=8.0, seed=1,
                               progress=False)
        trainer_steps, bare_steps = [], []
        for round_ in range(2):  # trainer, bare, trainer, bare: the same minutes for both
            cfg = tiny_run_config(small, vae, work / f"run{round_}", args.steps + 2)
            trainer_s, trainer = trainer_step_time(cfg)
            trainer_steps.append(trainer_s)
            model = trainer.accelerator.unwrap_model(trainer.model)
            batch = collate_clips([trainer.dataset[i] for i in range(2)])
            bare_steps.append(statistics.median(bare_step_times(model, trainer.stage, batch, args.steps + 2)[2:]))
        trainer_s, bare_s = statistics.median(trainer_steps), statistics.median(bare_steps)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"\n2. Trainer overhead, tiny t2v run ({params:.2f}M-param UNet, batch 2, 8x32x32 px clips, VAE and "
              f"text encoder on the fly, 1 worker):")
        print(f"   (rounds: trainer {', '.join(f'{t * 1e3:.0f}' for t in trainer_steps)} ms, bare "
              f"{', '.join(f'{t * 1e3:.0f}' for t in bare_steps)} ms)")
        print(f"   trainer step {trainer_s * 1e3:.1f} ms, bare fwd/bwd/AdamW {bare_s * 1e3:.1f} ms: overhead "
              f"{(trainer_s - bare_s) * 1e3:.1f} ms per step ({(trainer_s - bare_s) / trainer_s:.0%})")

        if not args.skip_compile:
            blocks = repeated_blocks(model)
            compile_model(model, "blocks")
            compiled_calls = [b._compiled_call_impl for b in blocks]
            cold = bare_step_times(model, trainer.stage, batch, 2)  # compiles forward and backward
            eager_steps, compiled_steps = [], []
            for _ in range(2):  # eager and compiled in turn (nn.Module.compile is a per-module switch)
                for block in blocks:
                    block._compiled_call_impl = None
                eager_steps += bare_step_times(model, trainer.stage, batch, args.steps // 2)
                for block, call in zip(blocks, compiled_calls):
                    block._compiled_call_impl = call
                compiled_steps += bare_step_times(model, trainer.stage, batch, args.steps // 2)
            eager_s, compiled_s = statistics.median(eager_steps), statistics.median(compiled_steps)
            print(f"\n3. train.compile=blocks ({len(blocks)} UNetLayer blocks) vs eager, the same bare step, "
                  f"in turns:")
            print(f"   cold first step (compiles forward and backward) {cold[0]:.1f} s, second {cold[1]:.2f} s")
            print(f"   steady step: eager {eager_s * 1e3:.1f} ms, compiled {compiled_s * 1e3:.1f} ms "
                  f"({eager_s / compiled_s:.2f}x)")

if __name__ == "__main__":
    main()
