"""Attention backends side by side: one training step (forward + backward + AdamW) of the demo UNet with each
backend, the same weights and inputs, the backends interleaved step by step so load from other processes hits
them alike.

    .venv/bin/python bench/attention_backends.py [--threads 2] [--batch 4] [--repeats 10] [--latent-size 16]

On a CPU the candidates are torch SDPA ("sdpa") and the plain matmul-softmax-matmul ("math"); on CUDA xformers
is added when installed. "auto" is SDPA everywhere (models/attention.py): a run where this bench shows xformers
faster sets unet.attention_backend: xformers. The demo's attention runs over short sequences (8 frames in temporal attention, 16-64
tokens in spatial attention, 48 text tokens), where the kernel launch cost matters more than the FLOPs.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.timing import interleaved_median_seconds  # noqa: E402
from demo.aids import DemoUNet3D  # noqa: E402
from models.attention import xformers_available  # noqa: E402

# configs/demo.yaml's UNet, 4-channel latents of 8 frames and 48 MiniLM tokens.
DEMO_UNET = dict(in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), attention_levels=(False, True, True),
                 attention_head_dim=32, cross_attention_dim=384, pooled_text_conditioning=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--latent-size", type=int, default=16,
                        help="latent side: 16 = a 64 px clip (the README's figures), 8 = the 32 px demo")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = ["sdpa", "math"] + (["xformers"] if device.type == "cuda" and xformers_available() else [])

    side = args.latent_size
    unet_kwargs = {**DEMO_UNET, "text_layout_size": side}  # the demo's layout grid is the latent's own size
    torch.manual_seed(0)
    reference = DemoUNet3D(**unet_kwargs).to(device)
    models = {}
    for backend in backends:
        model = DemoUNet3D(**unet_kwargs).to(device)
        model.load_state_dict(reference.state_dict())
        model.set_attention_backend(backend)
        models[backend] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(args.batch, 4, 8, side, side, generator=generator).to(device)
    timestep = torch.randint(0, 1000, (args.batch,), generator=generator).to(device)
    text = torch.randn(args.batch, 48, 384, generator=generator).to(device)
    mask = torch.ones(args.batch, 48, dtype=torch.bool, device=device)
    mask[:, 40:] = False  # some padding, as real captions have

    def train_step(backend: str) -> None:
        model, optimizer = models[backend]
        model(sample, timestep, text, mask).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with torch.no_grad():
        outputs = {b: models[b][0](sample, timestep, text, mask) for b in backends}
    medians = interleaved_median_seconds([partial(train_step, b) for b in backends], args.repeats, warmup=2,
                                         synchronize=torch.cuda.synchronize if device.type == "cuda" else None)
    times = dict(zip(backends, medians))

    print(f"device {device}, {args.threads} thread(s), batch {args.batch} clips of 8x{side}x{side} latents, "
          f"median of {args.repeats} training steps")
    base = times["sdpa"]
    print("| backend | s / step | clips / s | vs sdpa | max |output - sdpa output| |")
    print("|---|---|---|---|---|")
    for backend in backends:
        median = times[backend]
        diff = (outputs[backend] - outputs["sdpa"]).abs().max().item()
        print(f"| {backend} | {median:.3f} | {args.batch / median:.1f} | {base / median:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
