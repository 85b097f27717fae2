"""Frozen text encoder: any transformers encoder (CLIP text, T5 encoder, BERT-style) by hub id or path."""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

logger = logging.getLogger("facevid")


def _load_encoder_model(path: str, subfolder: str | None):
    kwargs = {"subfolder": subfolder} if subfolder else {}
    config = AutoConfig.from_pretrained(path, **kwargs)
    # AutoModel would build the full CLIP (vision tower too) or the T5 decoder; we need the text half.
    if config.model_type in ("clip", "clip_text_model"):
        return CLIPTextModel.from_pretrained(path, **kwargs)
    if config.model_type in ("t5", "mt5", "umt5"):
        return T5EncoderModel.from_pretrained(path, **kwargs)
    return AutoModel.from_pretrained(path, **kwargs)


class FrozenTextEncoder(nn.Module):
    """Tokenizes prompts to a fixed length and returns (token embeddings (B, L, D), mask (B, L) bool)."""

    def __init__(self, pretrained: str, max_length: int = 77, subfolder: str | None = None):
        super().__init__()
        tokenizer_kwargs = {"subfolder": subfolder} if subfolder else {}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(pretrained, **tokenizer_kwargs)
        except (OSError, ValueError):
            # diffusers-style pipelines keep the tokenizer in a sibling "tokenizer" folder.
            self.tokenizer = AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer")
        self.model = _load_encoder_model(pretrained, subfolder).eval().requires_grad_(False)
        self.max_length = max_length
        self.pretrained = pretrained
        self._warned_truncation = False

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size if hasattr(self.model.config, "hidden_size") else self.model.config.d_model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True):  # always frozen: keep dropout off whatever the caller asks
        return super().train(False)

    def _warn_if_truncated(self, prompts: list[str], mask: torch.Tensor) -> None:
        """Words past max_length never reach the model: say so (once), since the prompt then says less.
        Only prompts that filled every position can have been cut, so only those are tokenised again."""
        if self._warned_truncation:
            return
        full = [p for p, row in zip(prompts, mask.all(dim=1).tolist()) if row]
        if not full:
            return
        lengths = [len(ids) for ids in self.tokenizer(full, truncation=False)["input_ids"]]
        too_long = [(n, p) for n, p in zip(lengths, full) if n > self.max_length]
        if too_long:
            longest, example = max(too_long)
            logger.warning("%d of %d prompts are longer than text_encoder.max_length=%d tokens and are cut "
                           "(longest %d tokens: %r); raise text_encoder.max_length to keep their ends",
                           len(too_long), len(prompts), self.max_length, longest, example[:120])
            self._warned_truncation = True

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        self._warn_if_truncated(list(prompts), tokens["attention_mask"].bool())  # on the host: no device sync
        tokens = tokens.to(self.device)
        mask = tokens["attention_mask"].bool()
        hidden = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        return hidden, mask
