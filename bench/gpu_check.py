"""One-command GPU check of the shipped recipe's UNet (configs/t2v_256.yaml): `make gpu-check`, or

    python bench/gpu_check.py [--batch N] [--steps 10] [--peak-tflops 989] [--no-ddp]
                              [--vae stabilityai/sd-vae-ft-mse] [--text-encoder openai/clip-vit-large-patch14]

On CUDA it builds the recipe's UNet at full width ([320, 640, 1280, 1280], 2 layers per block, 64-dim heads,
cross-attention 768 = CLIP ViT-L/14's width) from the config with the trainer's own constructor, and times training
steps (the recipe's loss, forward + backward + fused AdamW) in bf16 autocast with gradient checkpointing on latents
4 x 16 x 32 x 32 (256 px, 16 frames) at the recipe's per-GPU batch, with torch SDPA and, when installed, xformers,
taking turns step by step. It prints, per attention backend: seconds per step, samples/s, latent tokens/s (frames x
height x width of the latent per sample), model TFLOP/s, MFU, and the peak allocated and reserved CUDA memory over
one step (weights, AdamW state, gradients and activations; reserved = what the caching allocator holds, the figure
an out-of-memory is about). Torch settings are the trainer's (no TF32 switch, no cuDNN autotuning).

Model FLOPs are counted, not estimated: torch.utils.flop_counter.FlopCounterMode over one forward + backward of the
same UNet on the meta device (no memory, no time) at batch 1, times the batch; attention as explicit matmuls (the
"math" backend: the counter does not see every fused kernel), WITHOUT the forward recomputed by gradient
checkpointing: MFU = model FLOPs / step time / peak. Full width, batch 4: 57.91 TFLOP per step (1404.8M
parameters in the recipe's ModelScope layout, the size of ModelScope's own UNet).
The peak is 989 TFLOP/s dense bf16 on H100 / H200 (312 on A100); other GPUs need --peak-tflops.

With 2 or more GPUs it also runs train.py itself on 2 ranks (accelerate launch, NCCL DDP) with the recipe and
train.replica_check_every=1, on FaceVid-Synth clips it generates, and reports the step time and whether every
step's weights were identical on both ranks. That run loads the recipe's VAE and text encoder (hub ids, or local
folders with --vae / --text-encoder).

Without CUDA it runs a reduced mode (narrow widths, 4 x 4 x 16 x 16 latents, few steps, on the CPU) that prints the
same table, so the script itself is tested on every machine (tests/test_real_recipe.py); --ddp-on-cpu runs the DDP
part's command on 2 gloo CPU processes at that size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.timing import interleaved_median_seconds  # noqa: E402
from data import synth  # noqa: E402
from facevid.config import load_config  # noqa: E402
from facevid.diffusion import build_noise_scheduler  # noqa: E402
from facevid.objective import Objective  # noqa: E402
from facevid.stages.text_to_video import build_unet  # noqa: E402
from models.attention import xformers_available  # noqa: E402

RECIPE = REPO / "configs" / "t2v_256.yaml"
CLIP_L_WIDTH = 768  # openai/clip-vit-large-patch14's text width: the recipe UNet's cross-attention dim
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, no sparsity
REDUCED = ["unet.block_out_channels=[32,32,64,64]", "unet.attention_head_dim=16", "unet.layers_per_block=1"]
COLUMNS = ["backend", "s/step", "samples/s", "latent tokens/s", "model TFLOP/s", "MFU", "peak allocated GiB",
           "peak reserved GiB"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, help="clips per step (default: the recipe's train.batch_size on CUDA, "
                                                  "1 in reduced mode)")
    parser.add_argument("--steps", type=int, help="timed steps per backend (default 10 on CUDA, 2 reduced)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per backend first")
    parser.add_argument("--peak-tflops", type=float, help="the MFU denominator (default: from the GPU's name)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="autocast dtype")
    parser.add_argument("--reduced", action="store_true", help="the reduced CPU mode, also on a GPU")
    parser.add_argument("--no-ddp", action="store_true", help="skip the 2-rank train.py run")
    parser.add_argument("--ddp-steps", type=int, default=6)
    parser.add_argument("--ddp-on-cpu", action="store_true",
                        help="run the DDP check anyway, on 2 CPU processes (gloo) at the reduced size (tests)")
    parser.add_argument("--vae", help="for the DDP run (default: the recipe's vae.pretrained)")
    parser.add_argument("--text-encoder", help="for the DDP run (default: the recipe's text_encoder.pretrained)")
    parser.add_argument("--threads", type=int, help="CPU threads (reduced mode)")
    return parser.parse_args(argv)


def peak_tflops(args, device: torch.device) -> tuple[float | None, str]:
    if args.peak_tflops:
        return args.peak_tflops, f"{args.peak_tflops:g} TFLOP/s (--peak-tflops)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_BF16_TFLOPS.items():
            if key in name:
                return value, f"{value:g} TFLOP/s ({key} dense bf16)"
        return None, f"unknown for {name!r}: pass --peak-tflops"
    return None, "none for a CPU: pass --peak-tflops"


class UNetStep:
    """The recipe's training step on random latents: Objective.loss (v-prediction, zero-terminal SNR,
    offset noise, min-SNR as configured) -> backward -> fused AdamW, under autocast."""

    def __init__(self, cfg, device, batch: int, frames: int, latent_size: int, text_width: int, dtype):
        torch.manual_seed(0)
        self.model = build_unet(cfg.unet, 4, 0, text_width).to(device)  # t2v: no condition channels
        if cfg.unet.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.learning_rate, fused=True)
        self.objective = Objective.from_config(cfg.diffusion, build_noise_scheduler(cfg.diffusion))
        self.device, self.dtype = device, dtype
        generator = torch.Generator().manual_seed(0)
        tokens = cfg.text_encoder.max_length
        self.latents = torch.randn(batch, 4, frames, latent_size, latent_size, generator=generator).to(device)
        self.text = torch.randn(batch, tokens, text_width, generator=generator).to(device)
        self.mask = torch.ones(batch, tokens, dtype=torch.bool, device=device)
        self.mask[:, tokens // 3:] = False  # captions are shorter than max_length: padding, as in training
        self.generator = torch.Generator(device=device).manual_seed(0)

    def __call__(self) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            loss = self.objective.loss(lambda x, t: self.model(x, t, self.text, self.mask), self.latents,
                                       self.generator)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def model_flops(cfg, batch: int, frames: int, latent_size: int, text_width: int) -> tuple[int, int]:
    """(FLOPs of one forward + backward for `batch` clips, parameters) of the config's UNet, counted on the meta
    device (no memory, no time) at batch 1 and scaled: attention as explicit matmuls (the "math" backend, which
    the counter sees whole), no gradient-checkpoint recomputation (model FLOPs, not hardware FLOPs)."""
    tokens = cfg.text_encoder.max_length
    with torch.device("meta"):
        model = build_unet(cfg.unet, 4, 0, text_width)
        model.set_attention_backend("math")
        latents = torch.randn(1, 4, frames, latent_size, latent_size)
        text, mask = torch.randn(1, tokens, text_width), torch.ones(1, tokens, dtype=torch.bool)
        with FlopCounterMode(display=False) as counter:
            model(latents, torch.zeros(1, dtype=torch.long), text, mask).float().pow(2).mean().backward()
    return counter.get_total_flops() * batch, sum(p.numel() for p in model.parameters())


def benchmark(args, device: torch.device, reduced: bool) -> dict:
    cfg = load_config(RECIPE, REDUCED if reduced else [], validate_files=False)
    latent_size = cfg.data.resolution // 8 if not reduced else 16  # SD's VAE: factor 8
    frames = cfg.data.num_frames if not reduced else 4
    batch = args.batch or (cfg.train.batch_size if not reduced else 1)
    steps = args.steps or (10 if not reduced else 2)
    text_width = CLIP_L_WIDTH if not reduced else 64
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.precision]
    step = UNetStep(cfg, device, batch, frames, latent_size, text_width, dtype)
    flops, params = model_flops(cfg, batch, frames, latent_size, text_width)
    backends = ["sdpa"] + (["xformers"] if device.type == "cuda" and xformers_available() else [])
    synchronize = torch.cuda.synchronize if device.type == "cuda" else None
    seconds = interleaved_median_seconds([step] * len(backends), steps, warmup=args.warmup,
                                         setup=lambda i: step.model.set_attention_backend(backends[i]),
                                         synchronize=synchronize)
    memory = {backend: peak_memory(step, backend, device) for backend in backends}
    peak, peak_text = peak_tflops(args, device)
    tokens = frames * latent_size * latent_size
    rows = []
    for backend, s in zip(backends, seconds):
        tflops = flops / s / 1e12
        allocated, reserved = memory[backend]
        # Four significant digits whatever the scale (a loaded CPU or an H200).
        rows.append([backend, f"{s:.4g}", f"{batch / s:.4g}", f"{batch * tokens / s:.4g}", f"{tflops:.4g}",
                     f"{100 * tflops / peak:.4g}%" if peak else "n/a", allocated, reserved])
    return {"rows": rows, "device": device_name(device), "params": params, "flops": flops, "peak": peak_text,
            "batch": batch, "steps": steps, "shape": f"4x{frames}x{latent_size}x{latent_size}", "tokens": tokens,
            "widths": list(cfg.unet.block_out_channels), "head_dim": cfg.unet.attention_head_dim,
            "layers": cfg.unet.layers_per_block, "text_width": text_width, "precision": args.precision,
            "checkpointing": cfg.unet.gradient_checkpointing}


def peak_memory(step: UNetStep, backend: str, device: torch.device) -> tuple[str, str]:
    """Peak allocated and reserved CUDA memory (GiB) over one step with `backend`, from a clean pool."""
    if device.type != "cuda":
        return "n/a", "n/a"
    step.model.set_attention_backend(backend)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize()
    gib = 2**30
    return f"{torch.cuda.max_memory_allocated(device) / gib:.2f}", f"{torch.cuda.max_memory_reserved(device) / gib:.2f}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"CPU, {torch.get_num_threads()} thread(s) (torch {torch.__version__})"


def print_table(result: dict, reduced: bool) -> None:
    r = result
    mode = "REDUCED mode (no CUDA: narrow widths, tiny latents)" if reduced else "full recipe width"
    print(f"# gpu_check: configs/t2v_256.yaml UNet, {mode}")
    print(f"device: {r['device']}")
    print(f"unet: widths {r['widths']}, {r['layers']} layer(s) per block, head dim {r['head_dim']}, cross-attention "
          f"{r['text_width']}, {r['params'] / 1e6:.1f}M parameters, gradient checkpointing {r['checkpointing']}")
    print(f"step: batch {r['batch']} x latents {r['shape']} ({r['tokens']} latent tokens per sample), "
          f"{r['precision']} autocast, loss + backward + fused AdamW, median of {r['steps']} steps")
    print(f"model FLOPs per step: {r['flops'] / 1e12:.4g} TFLOP (counted, fwd + bwd, no checkpoint recompute)")
    print(f"MFU peak: {r['peak']}")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "|".join("---" for _ in COLUMNS) + "|")
    for row in r["rows"]:
        print("| " + " | ".join(row) + " |")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    if reduced:  # what the GPU run will count, from the meta device
        cfg = load_config(RECIPE, validate_files=False)
        flops, params = model_flops(cfg, cfg.train.batch_size, cfg.data.num_frames, cfg.data.resolution // 8,
                                    CLIP_L_WIDTH)
        print(f"full-width recipe UNet (counted on the meta device): {params / 1e6:.1f}M parameters, "
              f"{flops / 1e12:.4g} TFLOP per step at batch {cfg.train.batch_size} x 4x{cfg.data.num_frames}x"
              f"{cfg.data.resolution // 8}x{cfg.data.resolution // 8}")


def ddp_check(args, on_cpu: bool = False) -> bool:
    """train.py on 2 ranks with the recipe and a replica check every step; True when it passed. On 2 GPUs: NCCL
    DDP at the recipe's size. on_cpu (--ddp-on-cpu, for tests): gloo DDP on 2 CPU processes at the reduced size."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_ddp_") as tmp:
        run = Path(tmp) / "run"
        # 25 fps FaceVid-Synth: the recipe's target_fps 6.25 reads every 4th frame (16 of 64 at full size).
        clips = dict(num_clips=4, num_frames=16, resolution=64) if on_cpu else dict(num_clips=16, num_frames=64,
                                                                                     resolution=256)
        manifest = synth.generate(Path(tmp) / "synth", fps=25, progress=False, **clips)
        overrides = [
            f"output_dir={run}", f"data.manifest={manifest}",
            f"train.max_steps={args.ddp_steps}", "train.replica_check_every=1", "train.log_every=1",
            "train.checkpoint_every=100000", "train.validate_every=0", "sample.num_inference_steps=2",
            "train.lr_warmup_steps=1",
            # tracker none: the check needs no dashboard (and train.tracker=wandb fails on wandb 0.31).
            "train.tracker=none",
        ] + ([f"vae.pretrained={args.vae}"] if args.vae else []) + (
            [f"text_encoder.pretrained={args.text_encoder}"] if args.text_encoder else [])
        if on_cpu:
            overrides += REDUCED + ["data.resolution=64", "data.num_frames=4", "data.num_workers=0",
                                    "train.batch_size=1"]
        launch = "cpu_2proc.yaml" if on_cpu else "multi_gpu.yaml"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / launch), "--num_processes", "2",
               str(REPO / "train.py"), "--config", str(RECIPE), *overrides]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1800)
        log = result.stdout + result.stderr
        checks = sum(f"step {s}: weights identical on all 2 rank(s)" in log for s in range(1, args.ddp_steps + 1))
        ok = result.returncode == 0 and "on 2 process(es)" in log and checks == args.ddp_steps
        elapsed = []
        if (run / "metrics.jsonl").is_file():
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            elapsed = [row["elapsed_s"] for row in rows if "elapsed_s" in row]
        backend = "gloo, CPU, reduced size" if on_cpu else "NCCL"
        print(f"\n# DDP: train.py on 2 ranks ({backend}), {args.ddp_steps} steps, replica check every step")
        print(f"exit code {result.returncode}; 2 processes: {'on 2 process(es)' in log}; "
              f"replicas identical at {checks} of {args.ddp_steps} steps -> {'PASS' if ok else 'FAIL'}")
        if len(elapsed) >= 3:  # the first step holds start-up (cuDNN autotuning, allocator growth)
            per_step = (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1)
            train = load_config(RECIPE, [o for o in overrides if o.startswith("train.")], validate_files=False).train
            clips = 2 * train.batch_size * train.gradient_accumulation_steps
            print(f"s/step (optimizer step, after the first): {per_step:.3f}; samples/s over both ranks: "
                  f"{clips / per_step:.2f} (2 ranks x batch {train.batch_size} x accumulation "
                  f"{train.gradient_accumulation_steps}; VAE + text encoder in the loop)")
        if not ok:
            print(log[-6000:])
        return ok


def main(argv=None) -> int:
    args = parse_args(argv)
    reduced = args.reduced or not torch.cuda.is_available()
    device = torch.device("cpu" if reduced else "cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    print_table(benchmark(args, device, reduced), reduced)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.ddp_on_cpu:
        return 0 if ddp_check(args, on_cpu=True) else 1
    if args.no_ddp or reduced:
        print("\nDDP: skipped" + (" (--no-ddp)" if args.no_ddp else " (reduced mode)"))
        return 0
    if gpus < 2:
        print(f"\nDDP: skipped (needs >= 2 CUDA GPUs; this machine has {gpus})")
        return 0
    return 0 if ddp_check(args) else 1


if __name__ == "__main__":
    sys.exit(main())
