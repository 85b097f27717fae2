"""Stand-ins in the exact on-disk format of the real recipe's pretrained parts (configs/t2v_256.yaml), built here
with tiny random weights: nothing is downloaded.

- `sd_vae`: a diffusers AutoencoderKL folder with stabilityai/sd-vae-ft-mse's config (4 levels = factor 8, 4 latent
  channels, mid-block attention, scaling_factor 0.18215), only narrower.
- `clip_text_encoder`: a transformers CLIPTextModel folder (CLIP ViT-L/14's text half, 2 layers, narrow) with the
  real CLIP BPE tokenizer, rebuilt from the vocabulary open-clip-torch ships (`bpe_simple_vocab_16e6.txt.gz`).
- `t5_text_encoder`: a transformers T5EncoderModel folder (T5 v1.1 layout: gated GELU, no tied head) with a
  SentencePiece-style Unigram tokenizer trained here on FaceVid-Synth captions, saved as T5's tokenizer.
- `clip_model`: a full CLIPModel + CLIPProcessor folder (the CLIP-score metric's network), same tokenizer.
- `i3d_torchscript`: a TorchScript file with the FVD I3D's call signature (clearly not I3D: a small 3D conv net).

The tokenizers are real (real vocabularies and algorithms); only the networks are random.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from data import synth

# stabilityai/sd-vae-ft-mse's config.json, as published, with the widths narrowed (real: 128, 256, 512, 512 and
# 2 layers per block).
SD_VAE_CONFIG = dict(
    act_fn="silu", block_out_channels=[32, 32, 32, 32], down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32, out_channels=3, sample_size=256,
    up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215,
)
CLIP_BOS, CLIP_EOS = 49406, 49407  # <|startoftext|>, <|endoftext|> in OpenAI's CLIP vocabulary
CLIP_VOCAB_SIZE = 49408


def sd_vae(folder: Path) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(folder)
    return folder


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character map (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(keep)
    extra = 0
    for byte in range(256):
        if byte not in keep:
            keep.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """OpenAI CLIP's tokenizer from open-clip-torch's shipped BPE file (installed with --no-deps: the package
    itself does not import without torchvision, so the file is found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the CLIP stand-in needs open-clip-torch's BPE vocabulary: "
                           "pip install --no-deps open-clip-torch (the Makefile's install step does)")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    # Line 0 is a version header; CLIP keeps as many merges as fill its 49408 ids after the 2 x 256 byte
    # tokens and the 2 special tokens (48894).
    merges = [tuple(line.split()) for line in lines[1:1 + CLIP_VOCAB_SIZE - 2 * 256 - 2]]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    # Objects, not file names: transformers 5 ignores vocab_file= and silently builds a 3-token tokenizer.
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)


def _clip_text_config(hidden: int = 32, layers: int = 2) -> dict:
    # CLIP ViT-L/14's text tower, narrowed (real: 768 wide, 12 layers, 12 heads); ids as in OpenAI's vocabulary.
    return dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=CLIP_BOS, eos_token_id=CLIP_EOS, pad_token_id=CLIP_EOS)  # CLIP pads with <|endoftext|>


def clip_text_encoder(folder: Path, hidden: int = 32) -> Path:
    """A CLIPTextModel + tokenizer folder, as openai/clip-vit-large-patch14's text half is laid out."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(**_clip_text_config(hidden))).save_pretrained(folder)
    clip_tokenizer().save_pretrained(folder)
    return folder


def clip_model(folder: Path) -> Path:
    """A full CLIPModel with its CLIPProcessor (the CLIP-score network's format), random weights."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    config = CLIPConfig(text_config=_clip_text_config(), projection_dim=16,
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8))
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=clip_tokenizer()).save_pretrained(folder)
    return folder


def synth_captions(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [synth.caption_for(synth.sample_attributes(rng), rng) for _ in range(count)]


def t5_tokenizer(captions: list[str], vocab_size: int = 400):
    """T5's tokenizer format (<pad> 0, </s> 1, <unk> 2, SentencePiece-style Unigram on '▁'-marked words, 100
    sentinel ids), with the Unigram model trained here on `captions`."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tokenizer.train_from_iterator(captions, trainer)
    vocab = [tuple(entry) for entry in json.loads(tokenizer.to_str())["model"]["vocab"]]
    return T5TokenizerFast(vocab=vocab, model_max_length=512)


def t5_text_encoder(folder: Path, d_model: int = 32, captions: list[str] | None = None) -> Path:
    """A T5EncoderModel + tokenizer folder, laid out as google/t5-v1_1-* (and DeepFloyd / PixArt's T5-XXL)."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = t5_tokenizer(captions or synth_captions(300))
    # T5 v1.1: gated GELU feed-forward, untied embeddings; narrowed (real XXL: 4096 wide, 24 layers, 64 heads).
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                      num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    T5EncoderModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class StandInI3D(torch.nn.Module):
    """Test stand-in with the I3D TorchScript call signature; (B, 3, T, 224, 224) in [-1, 1] -> (B, 8)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 4, 3, stride=(2, 2, 2))
        self.head = torch.nn.Linear(4, 8)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        assert not rescale and not resize and return_features
        assert x.shape[1] == 3 and x.shape[2] >= 16 and x.shape[3] == 224 and x.shape[4] == 224
        assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
        x = torch.nn.functional.avg_pool3d(x, (1, 8, 8))
        return self.head(torch.relu(self.conv(x)).mean((2, 3, 4)))


def i3d_torchscript(path: Path) -> Path:
    torch.manual_seed(0)
    torch.jit.script(StandInI3D()).save(str(path))
    return path
