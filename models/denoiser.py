"""The contract every FaceVid denoiser (backbone) keeps, in one place: FaceVidUNet3D and FaceVidDiT implement it,
and the trainer, cache, objective, samplers, tasks and export rely on nothing else.

    model(sample, timestep, encoder_hidden_states, encoder_attention_mask=None, condition=None) -> prediction

plus the config attributes in_channels, out_channels, condition_channels and cross_attention_dim, the
`spatial_factor` property (what data.resolution is checked against), set_attention_backend(name), gradient
checkpointing and diffusers' save_pretrained / from_pretrained. A backbone may take extra keyword arguments of
its own (FaceVidUNet3D: `temporal`), which callers pass only to the backbones that document them.
"""

from __future__ import annotations

import torch

from models.attention import Attention, usable_attention_backend


class VideoDenoiser:
    """Mixin that documents and checks the denoiser contract (listed before ModelMixin in a backbone's bases).
    It holds no state: the inputs are checked against the subclass's config, the timestep embedded by its
    `time_proj` / `time_embedding` modules."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None, condition: torch.Tensor | None = None,
                **backbone_options) -> torch.Tensor:
        """
        Args:
            sample: noisy latents (B, in_channels, F, H, W), any F >= 1; H and W multiples of spatial_factor.
            timestep: scalar or (B,).
            encoder_hidden_states: text states (B, L, cross_attention_dim).
            encoder_attention_mask: optional (B, L), 1/True = real token, 0/False = padding (ignored).
            condition: (B, condition_channels, F, H, W) when the model has condition_channels > 0
                (image-to-video's first-frame latent, facevid/tasks.py), else None.

        Returns:
            (B, out_channels, F, H, W).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement forward (models/denoiser.py)")

    @property
    def spatial_factor(self) -> int:
        """The latent's height and width must be multiples of this."""
        raise NotImplementedError(f"{type(self).__name__} must define spatial_factor (models/denoiser.py)")

    def set_attention_backend(self, backend: str) -> None:
        """Switch every attention layer to `backend` ("auto", "sdpa", "math", "xformers"); not saved with the
        model."""
        backend = usable_attention_backend(backend)
        for module in self.modules():
            if isinstance(module, Attention):
                module.backend = backend

    # ModelMixin's versions of these only know diffusers' own attention classes and would silently do nothing.
    def reset_attention_backend(self) -> None:
        self.set_attention_backend("auto")

    def enable_xformers_memory_efficient_attention(self, attention_op=None) -> None:
        self.set_attention_backend("xformers")

    def disable_xformers_memory_efficient_attention(self) -> None:
        self.set_attention_backend("auto")

    def _check_inputs(self, sample, encoder_hidden_states, encoder_attention_mask, condition) -> None:
        """Raises ValueError naming the input, the shape it has and the shape the contract wants."""
        config = self.config
        if sample.ndim != 5:
            raise ValueError(f"sample must be (B, C, F, H, W), got shape {tuple(sample.shape)}.")
        factor = self.spatial_factor
        height, width = sample.shape[-2:]
        if height % factor or width % factor:
            raise ValueError(
                f"sample height and width must be divisible by {factor} (the model's spatial_factor), "
                f"got H={height}, W={width}; e.g. use H={max(factor, height // factor * factor)}, "
                f"W={max(factor, width // factor * factor)}."
            )
        batch_size = sample.shape[0]
        text_shape = tuple(encoder_hidden_states.shape)
        if len(text_shape) != 3 or text_shape[0] != batch_size or text_shape[2] != config.cross_attention_dim:
            raise ValueError(
                f"encoder_hidden_states must be (B={batch_size}, L, {config.cross_attention_dim}), "
                f"got {text_shape}."
            )
        if encoder_attention_mask is not None and tuple(encoder_attention_mask.shape) != text_shape[:2]:
            raise ValueError(
                f"encoder_attention_mask must be (B, L) = {text_shape[:2]}, "
                f"got {tuple(encoder_attention_mask.shape)}."
            )
        if config.condition_channels == 0 and condition is not None:
            raise ValueError("condition was given but the model was built with condition_channels=0.")
        if config.condition_channels > 0:
            expected = (batch_size, config.condition_channels, *sample.shape[2:])
            if condition is None or tuple(condition.shape) != expected:
                got = None if condition is None else tuple(condition.shape)
                raise ValueError(f"condition must have shape {expected}, got {got}.")

    def _embed_timestep(self, timestep, batch_size: int, dtype: torch.dtype, device) -> torch.Tensor:
        timesteps = torch.as_tensor(timestep, device=device)
        if timesteps.ndim == 0 or timesteps.numel() == 1:
            timesteps = timesteps.reshape(1).expand(batch_size)
        if timesteps.shape != (batch_size,):
            raise ValueError(
                f"timestep must be a scalar or have shape ({batch_size},), got {tuple(timesteps.shape)}."
            )
        # Timesteps returns float32; match the model dtype before the MLP.
        return self.time_embedding(self.time_proj(timesteps).to(dtype))
