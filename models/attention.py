"""Multi-head attention with switchable kernels (PyTorch SDPA, plain math, xformers).

`attention()` is the single place where attention scores are computed, so every layer of the UNet
(spatial, cross and temporal attention) can change kernel with one setting. The "math" backend is the
readable reference the fast backends are tested against.

Backend choice is a run-time matter, never a property of saved weights:
- "auto" is torch SDPA on every device. On CUDA, SDPA itself dispatches to the flash or memory-efficient
  (cutlass, the kernel xformers also uses) kernels, so xformers brings no kernel SDPA lacks; whether it is
  faster for a given model and GPU is measured by bench/attention_backends.py, and a run that finds it faster
  asks for it by name (unet.attention_backend: xformers).
- "xformers" requested where it cannot run (not installed, or no CUDA device) falls back to "auto" with a
  warning (`usable_attention_backend`), so a model trained with xformers still samples on a CPU machine.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

ATTENTION_BACKENDS = ("auto", "sdpa", "math", "xformers")

# CUDA attention kernels put the batch (in some, batch x heads) on a grid dimension capped at 65,535 blocks:
# xformers' memory-efficient attention and older SDPA kernels fail above it. Temporal attention runs with batch
# B*H*W (classifier-free guidance over 8 videos at 512 px: 16 x 64 x 64 = 65,536), so attention() splits the
# batch into chunks of at most this many (batch x heads) rows.
MAX_BATCH_HEADS = 65_535


@functools.cache
def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def validate_attention_backend(backend: str) -> str:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"Unknown attention backend {backend!r}; valid backends are {', '.join(ATTENTION_BACKENDS)}."
        )
    return backend


def resolve_attention_backend(backend: str, device: torch.device) -> str:
    """Turn "auto" into a concrete backend for tensors on `device`: torch SDPA everywhere (see the module
    docstring for why not xformers)."""
    validate_attention_backend(backend)
    return "sdpa" if backend == "auto" else backend


def usable_attention_backend(backend: str) -> str:
    """`backend`, or "auto" with a warning when it is "xformers" and this machine cannot run xformers."""
    validate_attention_backend(backend)
    if backend == "xformers" and not (xformers_available() and torch.cuda.is_available()):
        missing = "xformers is not installed" if not xformers_available() else "no CUDA device is available"
        warnings.warn(f"attention backend 'xformers' was requested but {missing}; using 'auto' (torch SDPA) "
                      "instead. The weights are the same whichever backend runs them.", stacklevel=2)
        return "auto"
    return backend


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v.

    Args:
        q: (B, heads, Lq, d). k, v: (B, heads, Lk, d).
        key_padding_mask: optional bool (B, Lk), True = attend to this key. Every row needs at least one True,
            otherwise its softmax is undefined (NaN).
        backend: one of ATTENTION_BACKENDS.

    Returns:
        (B, heads, Lq, d).
    """
    backend = resolve_attention_backend(backend, q.device)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(device=q.device, dtype=torch.bool)
    chunk = max(1, MAX_BATCH_HEADS // q.shape[1])
    if q.shape[0] <= chunk:
        return _attend(q, k, v, key_padding_mask, backend)
    # Every batch row attends independently, so the chunks' results are exactly the whole batch's.
    return torch.cat([
        _attend(q[i : i + chunk], k[i : i + chunk], v[i : i + chunk],
                None if key_padding_mask is None else key_padding_mask[i : i + chunk], backend)
        for i in range(0, q.shape[0], chunk)
    ])


def _attend(q, k, v, key_padding_mask, backend: str) -> torch.Tensor:
    """attention() for one chunk of the batch, on a concrete backend."""
    if backend == "sdpa":
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend == "math":
        return _math_attention(q, k, v, key_padding_mask)
    _check_xformers_usable(q.device)
    return _xformers_attention(q, k, v, key_padding_mask)


def _math_attention(q, k, v, key_padding_mask):
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v)


def _check_xformers_usable(device: torch.device) -> None:
    if not xformers_available():
        raise RuntimeError(
            "attention backend 'xformers' was requested but xformers is not installed "
            "(pip install 'facevid[xformers]' on a CUDA machine), or use backend 'sdpa'."
        )
    if device.type != "cuda":
        raise RuntimeError(
            f"attention backend 'xformers' needs CUDA tensors, got tensors on {device}; use backend 'sdpa'."
        )


def _xformers_attention(q, k, v, key_padding_mask):
    import xformers.ops

    batch, heads, len_q, _ = q.shape
    len_k = k.shape[2]
    attn_bias = None
    if key_padding_mask is not None:
        # xformers wants an additive (B, heads, Lq, Lk) bias and does not broadcast it itself; its kernels
        # also need bias rows to start at 8-element aligned addresses, hence the padded allocation then slice.
        padded_len = math.ceil(len_k / 8) * 8
        bias = q.new_zeros(batch, 1, 1, padded_len)[..., :len_k]
        bias.masked_fill_(~key_padding_mask[:, None, None, :], float("-inf"))
        attn_bias = bias.expand(batch, heads, len_q, len_k)
    # xformers uses the (B, L, heads, d) layout; transposing is a free view of our (B, heads, L, d) tensors.
    out = xformers.ops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=attn_bias
    )
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention over token sequences (B, L, query_dim).

    Self-attention when `context` is None, otherwise cross-attention to `context` (B, Lk, context_dim).
    """

    def __init__(
        self,
        query_dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        dropout: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        inner_dim = heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.backend = validate_attention_backend(backend)
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, query_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        context = hidden_states if context is None else context
        q, k, v = (
            rearrange(proj(x), "b l (h d) -> b h l d", h=self.heads)
            for proj, x in ((self.to_q, hidden_states), (self.to_k, context), (self.to_v, context))
        )
        out = attention(q, k, v, key_padding_mask=key_padding_mask, backend=self.backend)
        out = rearrange(out, "b h l d -> b l (h d)")
        return self.dropout(self.to_out(out))
