"""FaceVidUNet3D vs FaceVidDiT at matched parameter count.

Per-step costs (default): parameters, FLOPs of a training step (forward + backward, torch.utils.flop_counter),
step time (forward + backward + AdamW) and activation memory, with and without gradient checkpointing.

    python bench/unet_vs_dit.py                      # the demo backbones (configs/demo.yaml, configs/demo_dit.yaml)
    python bench/unet_vs_dit.py --batch 8 --device cuda

The comparison (--train; docs/unet_vs_dit.md): FaceVid-Synth (generated unless present), the demo VAE (trained
unless --vae names one), one latent cache, then configs/compare_unet.yaml and configs/compare_dit.yaml (4.66M /
4.61M parameters) trained with the same data, seed, objective and schedule for the same training FLOPs (the UNet's
--unet-steps steps; the DiT gets budget / its FLOPs a step), val/loss on 32 held-out clips, then
`evaluate.py --metrics alignment` on held-out prompts; prints the results table (RUN/comparison.md) and draws both
loss curves against training FLOPs (--plot).

    python bench/unet_vs_dit.py --train --vae-steps 1000 --threads 1
    python bench/unet_vs_dit.py --train --seed 1 --vae runs/compare/vae/vae --cache-dir runs/compare/cache \\
        --out runs/compare-seed1 --plot runs/compare-seed1/curves.png
    python bench/unet_vs_dit.py --summarize runs/compare runs/compare-seed1     # the mean over seeds
    python bench/unet_vs_dit.py --at-scale    # FLOPs of the 256 px x 16 frame GPU recipes, on the meta device

Activation memory: on CUDA the peak allocated during forward + backward minus the memory before it; on CPU the
bytes autograd saves for backward (bench/activations.py: each storage once, parameters left out), which misses what
checkpoint boundaries keep, so the CPU figure with checkpointing is a lower bound. FLOPs count the denoiser only:
training reads cached latents and text states, so the frozen VAE and text encoder cost nothing a step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.activations import SavedForBackward  # noqa: E402
from bench.gpu_check import model_flops  # noqa: E402
from facevid.config import load_config  # noqa: E402
from facevid.diffusion import build_noise_scheduler  # noqa: E402
from facevid.objective import Objective  # noqa: E402
from facevid.stages.text_to_video import BACKBONES  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def build(config: str, text_width: int):
    cfg = load_config(CONFIGS / config, validate_files=False)
    torch.manual_seed(0)
    return BACKBONES[cfg.unet.backbone](cfg.unet, 4, 0, text_width), cfg


def measure(model, cfg, args, checkpointing: bool) -> dict:
    device = torch.device(args.device)
    model = model.to(device).train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    objective = Objective.from_config(cfg.diffusion, build_noise_scheduler(cfg.diffusion))
    latents = torch.randn(args.batch, 4, args.frames, args.latent, args.latent, device=device)
    text = torch.randn(args.batch, args.text_tokens, args.text_width, device=device)
    generator = torch.Generator(device).manual_seed(0)

    def loss():
        return objective.loss(lambda x, t: model(x, t, text), latents, generator)

    with FlopCounterMode(display=False) as counter:
        loss().backward()
    flops = counter.get_total_flops()
    model.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss().backward()
        torch.cuda.synchronize()
        activations = torch.cuda.max_memory_allocated() - before
    else:
        with SavedForBackward(model) as saved:
            value = loss()
        value.backward()
        activations = saved.bytes
    model.zero_grad(set_to_none=True)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(args.steps + 1):  # the first step warms up allocator and kernels
        start = time.perf_counter()
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"flops": flops, "seconds": statistics.median(times[1:]), "activations": activations}


def meta_flops(config: str, batch: int, frames: int, latent: int, text_width: int) -> tuple[int, int]:
    """(FLOPs of a training step's forward + backward, parameters) of a config's backbone, built and run on the meta
    device (bench/gpu_check.py: model_flops): no memory and no time, so the GPU recipes can be counted anywhere."""
    return model_flops(load_config(CONFIGS / config, validate_files=False), batch, frames, latent, text_width)


# ------------------------------------------------------------------------------------------- --train: the comparison
ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _run(command: list[str], log: Path, threads: int) -> None:
    """A stage as its own process (what a user runs), its output appended to `log`; fails loudly."""
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": str(threads)}
    print("$", " ".join(command), flush=True)
    started = time.time()
    with open(log, "a", encoding="utf-8") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"failed (exit {done.returncode}) after {time.time() - started:.0f} s: see {log}")
    print(f"  done in {time.time() - started:.0f} s", flush=True)


def training_shape(cfg, text_width: int, steps: int) -> argparse.Namespace:
    """measure()'s arguments for one training step of `cfg`: its batch, clip length, latent size and text."""
    factor = 2 ** (len(cfg.vae.block_out_channels) - 1)
    return argparse.Namespace(batch=cfg.train.batch_size, frames=cfg.data.num_frames,
                              latent=cfg.data.resolution // factor, text_tokens=cfg.text_encoder.max_length,
                              text_width=text_width, steps=steps, device="cpu")


def read_run(run: Path) -> dict:
    """Curves and end points of a finished comparison run: metrics.jsonl and the alignment evaluation."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
    if not train or not val:
        raise SystemExit(f"{run}/metrics.jsonl has no loss or no val/loss rows: did the run finish?")
    alignment = json.loads((run / "eval" / "heldout" / "metrics.json").read_text())["metrics"]["alignment"]
    elapsed = max(r.get("elapsed_s", 0) for r in rows)
    return {"train": train, "val": val, "alignment": alignment, "elapsed_s": elapsed,
            "final_train_loss": statistics.mean(loss for _, loss in train[-3:])}  # the last 30 steps


def comparison_table(rows: dict) -> str:
    """Markdown, shaped like a results table: one row per backbone."""
    attributes = list(next(iter(rows.values()))["alignment"]["per_attribute"])
    head = (["backbone", "params", "GFLOP/step", "steps", "s/step", "train min", "act. MB (ckpt off / on)",
             "final train loss", "val loss"] + [a.replace("_", " ") for a in attributes] + ["mean"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        accuracy = r["alignment"]["per_attribute"]
        cells = [name, f"{r['params'] / 1e6:.2f}M", f"{r['flops'] / 1e9:.1f}", str(r["steps"]),
                 f"{r['seconds']:.2f}", f"{r['elapsed_s'] / 60:.1f}",
                 f"{r['activations'] / 2**20:.0f} / {r['activations_ckpt'] / 2**20:.0f}",
                 f"{r['final_train_loss']:.4f}", f"{r['val'][-1][1]:.4f}"]
        cells += [f"{100 * accuracy[a]['accuracy']:.0f}%" for a in attributes]
        cells.append(f"**{100 * r['alignment']['mean_accuracy']:.1f}%**")
        lines.append("| " + " | ".join(cells) + " |")
    chance = next(iter(rows.values()))["alignment"]
    lines.append("| chance | | | | | | | | | " + " | ".join(
        f"{100 * chance['per_attribute'][a]['chance']:.0f}%" for a in attributes) +
        f" | {100 * chance['mean_chance']:.1f}% |")
    return "\n".join(lines)


def plot_losses(rows: dict, out: Path) -> Path:
    """Training and validation loss of every backbone against training compute (TFLOP), side by side."""
    from PIL import Image

    from facevid.curves import overlay_panel

    panels = [overlay_panel(title, {name: (np.array([s for s, _ in r[key]]) * r["flops"] / 1e12,
                                           np.array([v for _, v in r[key]])) for name, r in rows.items()},
                            x_label="TFLOP")
              for title, key in (("training loss (mean of 10 steps)", "train"), ("val loss (held-out clips, EMA)", "val"))]
    sheet = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel, (i * panel.width, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def compare(args) -> int:
    """The comparison (docs/unet_vs_dit.md): FaceVid-Synth, one VAE, one latent cache, then each backbone trained
    on the same data with the same seed and objective for the same training FLOPs, scored on held-out prompts."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    python = sys.executable
    manifest = Path(args.data) / "manifest.jsonl"
    # Returns at once when the folder already holds these clips (data/synth.py checks its synth_info.json).
    _run([python, "-m", "data.synth", "--out", args.data, "--num-clips", "512", "--frames", "16", "--resolution", "64",
          "--fps", "12", "--aligned-motion"], log, args.threads)
    vae = Path(args.vae) if args.vae else out / "vae" / "vae"
    if not args.vae:
        _run([python, "train.py", "--config", "configs/demo_vae.yaml", f"output_dir={out / 'vae'}",
              f"data.manifest={manifest}", f"train.max_steps={args.vae_steps}",
              f"train.checkpoint_every={args.vae_steps}"], log, args.threads)
    if not (vae / "config.json").is_file():
        raise SystemExit(f"--vae {vae}: no trained VAE there (config.json missing); give a run's vae/ folder")

    backbones = {"UNet": args.unet_config, "DiT": args.dit_config}
    rows = {}
    torch.set_num_threads(args.threads)
    for name, config in backbones.items():  # per-step costs at the training shape, before any training
        model, cfg = build(config, args.text_width)
        shape = training_shape(cfg, args.text_width, args.timing_steps)
        plain = measure(model, cfg, shape, checkpointing=False)
        ckpt = measure(model, cfg, shape, checkpointing=True)
        rows[name] = {"config": config, "params": sum(p.numel() for p in model.parameters()), "flops": plain["flops"],
                      "seconds": plain["seconds"], "activations": plain["activations"],
                      "activations_ckpt": ckpt["activations"]}
        print(f"{name}: {rows[name]['params'] / 1e6:.2f}M parameters, {plain['flops'] / 1e9:.1f} GFLOP a step "
              f"(batch {shape.batch}), {plain['seconds']:.2f} s a step", flush=True)
    budget = args.unet_steps * rows["UNet"]["flops"]
    for r in rows.values():
        r["steps"] = max(1, round(budget / r["flops"]))
    print(f"budget: {budget / 1e12:.1f} TFLOP = " + ", ".join(f"{n} {r['steps']} steps" for n, r in rows.items()))

    for name, r in rows.items():
        run = out / name.lower()
        if args.reuse and (run / "eval" / "heldout" / "metrics.json").is_file():
            print(f"{name}: reusing {run}")
        else:
            shutil.rmtree(run, ignore_errors=True)
            _run([python, "train.py", "--config", f"configs/{r['config']}", f"output_dir={run}", f"seed={args.seed}",
                  f"data.manifest={manifest}", f"vae.pretrained={vae}", f"data.cache_dir={args.cache_dir or out / 'cache'}",
                  f"train.max_steps={r['steps']}", f"train.checkpoint_every={r['steps']}",
                  f"train.validate_every={max(1, r['steps'] // args.val_points)}"]
                 + ([f"train.learning_rate={args.learning_rate}"] if args.learning_rate else []), log, args.threads)
            _run([python, "evaluate.py", "--run", str(run), "--metrics", "alignment",
                  "--synth-heldout", str(args.eval_prompts), "--out", str(run / "eval" / "heldout")], log, args.threads)
        r.update(read_run(run))

    table = comparison_table(rows)
    figure = plot_losses(rows, Path(args.plot))
    report = (f"{budget / 1e12:.1f} TFLOP of training each (the UNet's {args.unet_steps} steps), seed {args.seed}, "
              f"{args.eval_prompts} held-out prompts, {args.threads} thread(s)\n\n{table}\n\nloss curves: {figure}\n")
    (out / "comparison.md").write_text(report)
    write_comparison(rows, out)
    print(report)
    return 0


def write_comparison(rows: dict, out: Path) -> Path:
    """OUT/comparison.json: every number of the table and both curves, what --summarize reads."""
    path = out / "comparison.json"
    path.write_text(json.dumps(
        {n: {k: v for k, v in r.items() if k != "alignment"} | {"alignment": {
            k: r["alignment"][k] for k in ("per_attribute", "mean_accuracy", "exact_match")}}
         for n, r in rows.items()}, indent=2))
    return path


def summarize(folders: list[str]) -> str:
    """Several --train comparisons (e.g. one per --seed) as one table: each number the mean over them, the mean
    accuracy also with its spread (min-max) and each comparison's own value."""
    runs = [json.loads((Path(f) / "comparison.json").read_text()) for f in folders]
    attributes = list(runs[0]["UNet"]["alignment"]["per_attribute"])
    head = ["backbone", "comparisons", "final train loss", "val loss"] + [a.replace("_", " ") for a in attributes]
    lines = ["| " + " | ".join(head + ["mean (min-max)", "each"]) + " |", "|" + "---|" * (len(head) + 2)]
    for name in runs[0]:
        rows = [r[name] for r in runs]
        means = [100 * r["alignment"]["mean_accuracy"] for r in rows]
        cells = [name, str(len(rows)), f"{statistics.mean(r['final_train_loss'] for r in rows):.4f}",
                 f"{statistics.mean(r['val'][-1][1] for r in rows):.4f}"]
        cells += [f"{100 * statistics.mean(r['alignment']['per_attribute'][a]['accuracy'] for r in rows):.0f}%"
                  for a in attributes]
        cells += [f"**{statistics.mean(means):.1f}%** ({min(means):.1f}-{max(means):.1f})",
                  " / ".join(f"{m:.1f}" for m in means)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet-config", default=None, help="default: demo.yaml, with --train compare_unet.yaml")
    parser.add_argument("--dit-config", default=None, help="default: demo_dit.yaml, with --train compare_dit.yaml")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--latent", type=int, default=8, help="latent height = width")
    parser.add_argument("--text-tokens", type=int, default=48)
    parser.add_argument("--text-width", type=int, default=384)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    train = parser.add_argument_group("--train: the comparison (training runs)")
    train.add_argument("--train", action="store_true", help="train both backbones at one FLOPs budget and score them")
    train.add_argument("--out", default="runs/compare", help="runs, cache, log.txt and comparison.md go here")
    train.add_argument("--data", default="outputs/facevid_synth", help="FaceVid-Synth folder (generated if empty)")
    train.add_argument("--vae", help="a trained demo VAE folder (RUN/vae) to reuse; default: train one")
    train.add_argument("--cache-dir", help="latent cache folder (default OUT/cache); another comparison's, to reuse "
                                           "it with the same VAE")
    train.add_argument("--vae-steps", type=int, default=2000, help="steps of the VAE trained when --vae is not given")
    train.add_argument("--unet-steps", type=int, default=240,
                       help="the budget: this many UNet steps' FLOPs; the DiT gets as many steps as fit in them")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--learning-rate", type=float,
                       help="one rate for both backbones (default: each config's own: UNet 1e-3, DiT 5e-4)")
    train.add_argument("--val-points", type=int, default=6, help="val/loss evaluations per run (and one at the end)")
    train.add_argument("--eval-prompts", type=int, default=64, help="held-out FaceVid-Synth prompts for alignment")
    train.add_argument("--timing-steps", type=int, default=2, help="timed steps per backbone for s/step")
    train.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    train.add_argument("--reuse", action="store_true", help="keep a backbone's finished, evaluated run")
    train.add_argument("--plot", default="docs/unet_vs_dit_curves.png", help="the loss curves PNG")
    parser.add_argument("--at-scale", action="store_true",
                        help="only count FLOPs and parameters of the GPU recipes (t2v_256.yaml, dit_256.yaml)")
    parser.add_argument("--summarize", nargs="+", metavar="OUT",
                        help="only print one table over these finished --train comparisons (--out folders)")
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    if args.at_scale:  # the GPU recipes at 256 px x 16 frames: SD's VAE (factor 8), CLIP ViT-L/14 text (768 wide)
        for config in ("t2v_256.yaml", "dit_256.yaml"):
            flops, params = meta_flops(config, 1, 16, 32, 768)
            print(f"{config}: {params / 1e6:.1f}M parameters, {flops / 1e12:.2f} TFLOP a clip (forward + backward, "
                  f"4 x 16 x 32 x 32 latents), {flops / params / 1e3:.1f} kFLOP a parameter")
        return 0
    if args.train:
        args.unet_config = args.unet_config or "compare_unet.yaml"
        args.dit_config = args.dit_config or "compare_dit.yaml"
        return compare(args)
    args.unet_config = args.unet_config or "demo.yaml"
    args.dit_config = args.dit_config or "demo_dit.yaml"

    print(f"batch {args.batch} x 4 x {args.frames} x {args.latent} x {args.latent} latents, {args.text_tokens} "
          f"text tokens of {args.text_width}, {args.device}, {torch.get_num_threads()} thread(s)")
    print(f"{'backbone':<28}{'params':>9}{'GFLOP/step':>12}{'s/step':>9}{'act. MB':>10}"
          f"{'s/step ckpt':>13}{'act. MB ckpt':>14}")
    for config in (args.unet_config, args.dit_config):
        model, cfg = build(config, args.text_width)
        plain = measure(model, cfg, args, checkpointing=False)
        ckpt = measure(model, cfg, args, checkpointing=True)
        name = f"{type(model).__name__} ({config})"
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name:<28}{params:>8.2f}M{plain['flops'] / 1e9:>12.2f}{plain['seconds']:>9.3f}"
              f"{plain['activations'] / 2**20:>10.1f}{ckpt['seconds']:>13.3f}{ckpt['activations'] / 2**20:>14.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
