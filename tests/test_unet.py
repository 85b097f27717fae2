"""Tests for the attention kernels and the FaceVidUNet3D backbone (tiny configs, CPU)."""

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bench.activations import SavedForBackward
from models import attention as attention_module
from models.attention import ATTENTION_BACKENDS, Attention, attention
from models.unet3d import FaceVidUNet3D

CONTEXT_DIM = 24

TINY = {
    "block_out_channels": (16, 32),
    "attention_levels": (False, True),
    "attention_head_dim": 8,
    "cross_attention_dim": CONTEXT_DIM,
    "norm_num_groups": 8,
}


@pytest.fixture(autouse=True)
def single_thread(request):
    """The tiny models here are overhead-bound: one thread is as fast and does not stall when other processes
    hold the CPU cores (multi-threaded tiny ops then wait on descheduled threads). Timing runs keep all threads."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(**overrides) -> FaceVidUNet3D:
    torch.manual_seed(0)
    return FaceVidUNet3D(**{**TINY, **overrides}).eval()


def randomize_zero_layers(model: FaceVidUNet3D) -> FaceVidUNet3D:
    """Perturb every weight so the zero-initialised temporal layers take part in the computation."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def make_inputs(
    batch=2, channels=4, frames=3, height=8, width=8, context_len=6, condition_channels=0, seed=0
):
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "sample": torch.randn(batch, channels, frames, height, width, generator=generator),
        "timestep": torch.randint(0, 1000, (batch,), generator=generator),
        "encoder_hidden_states": torch.randn(batch, context_len, CONTEXT_DIM, generator=generator),
    }
    if condition_channels:
        inputs["condition"] = torch.randn(
            batch, condition_channels, frames, height, width, generator=generator
        )
    return inputs


def padding_mask(batch: int, length: int) -> torch.Tensor:
    """Row i keeps its first length - 2 * i tokens (at least one)."""
    lengths = torch.tensor([max(1, length - 2 * i) for i in range(batch)])
    return torch.arange(length)[None, :] < lengths[:, None]


# ------------------------------------------------------------------------------------ attention


@pytest.mark.parametrize("use_mask", [False, True])
def test_sdpa_matches_math_reference(use_mask):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 5, 8, generator=generator)
    k, v = (torch.randn(3, 2, 7, 8, generator=generator) for _ in range(2))
    mask = padding_mask(3, 7) if use_mask else None
    torch.testing.assert_close(
        attention(q, k, v, mask, backend="sdpa"), attention(q, k, v, mask, backend="math"), atol=1e-5, rtol=0
    )
    assert torch.equal(attention(q, k, v, mask, backend="auto"), attention(q, k, v, mask, backend="sdpa"))


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_padded_keys_are_ignored(backend):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 5, 8, generator=generator)
    k, v = (torch.randn(3, 2, 7, 8, generator=generator) for _ in range(2))
    mask = padding_mask(3, 7)
    padded = ~mask[:, None, :, None]
    k2 = torch.where(padded, 100 * torch.randn(k.shape, generator=generator), k)
    v2 = torch.where(padded, 100 * torch.randn(v.shape, generator=generator), v)
    torch.testing.assert_close(attention(q, k, v, mask, backend), attention(q, k2, v2, mask, backend))


def test_attention_backend_errors():
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="valid backends are auto, sdpa, math, xformers"):
        attention(q, q, q, backend="flash")
    # xformers is CUDA-only: a CPU tensor must get a clear error (whether or not xformers is installed).
    with pytest.raises(RuntimeError, match="xformers"):
        attention(q, q, q, backend="xformers")


def test_xformers_path_layout_and_mask(monkeypatch):
    """Runs the xformers code path against a stand-in with xformers' documented semantics: (B, L, heads, d)
    inputs and an additive (B, heads, Lq, Lk) attn_bias (the real kernels are CUDA-only)."""

    def memory_efficient_attention(query, key, value, attn_bias=None):
        assert query.shape[1:3] == (5, 2) and key.shape[1:3] == (7, 2), "expects (B, L, heads, d)"
        scores = torch.einsum("bqhd,bkhd->bhqk", query, key) / math.sqrt(query.shape[-1])
        if attn_bias is not None:
            assert attn_bias.shape == (3, 2, 5, 7)
            scores = scores + attn_bias
        return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), value)

    fake = types.ModuleType("xformers")
    fake.ops = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake.ops)

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 5, 8, generator=generator)
    k, v = (torch.randn(3, 2, 7, 8, generator=generator) for _ in range(2))
    for mask in (None, padding_mask(3, 7)):
        torch.testing.assert_close(
            attention_module._xformers_attention(q, k, v, mask), attention(q, k, v, mask, backend="math")
        )


def test_auto_is_sdpa_even_where_xformers_could_run(monkeypatch):
    """auto = torch SDPA on every device (it dispatches to flash / memory-efficient kernels on CUDA);
    xformers only when asked for by name."""
    monkeypatch.setattr(attention_module, "xformers_available", lambda: True)
    for device in ("cpu", "cuda"):
        assert attention_module.resolve_attention_backend("auto", torch.device(device)) == "sdpa"
    assert attention_module.resolve_attention_backend("xformers", torch.device("cuda")) == "xformers"


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("use_mask", [False, True])
def test_large_batches_are_chunked_with_identical_results(backend, use_mask, monkeypatch):
    """Batches above MAX_BATCH_HEADS (batch x heads) are split, as CUDA kernels cap that grid dimension at
    65,535; each row attends alone, so the result is exactly the unchunked one."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(7, 2, 5, 8, generator=generator)
    k, v = (torch.randn(7, 2, 6, 8, generator=generator) for _ in range(2))
    mask = padding_mask(7, 6) if use_mask else None
    whole = attention(q, k, v, mask, backend)
    calls = []
    kernel = attention_module._attend
    monkeypatch.setattr(attention_module, "_attend", lambda q, *args: calls.append(len(q)) or kernel(q, *args))
    monkeypatch.setattr(attention_module, "MAX_BATCH_HEADS", 6)  # 6 // 2 heads = 3 rows per chunk
    chunked = attention(q, k, v, mask, backend)
    assert calls == [3, 3, 1]
    assert torch.equal(chunked, whole)


def test_attention_module_cross_attention_shape():
    module = Attention(query_dim=16, heads=2, head_dim=8, context_dim=CONTEXT_DIM)
    out = module(torch.randn(2, 10, 16), torch.randn(2, 6, CONTEXT_DIM), padding_mask(2, 6))
    assert out.shape == (2, 10, 16)


# ------------------------------------------------------------------------------------ UNet shapes


@pytest.mark.parametrize(
    "config",
    [
        {},
        {
            "block_out_channels": (16, 32, 32),
            "attention_levels": (True, False, True),
            "temporal_attention_levels": (False, True, True),
            "layers_per_block": 2,
            "temporal_feed_forward": True,
            "temporal_position_encoding": "none",
        },
        {"condition_channels": 3, "out_channels": 2},
    ],
    ids=["two_levels", "three_levels", "conditioned"],
)
@pytest.mark.parametrize("frames", [1, 5])
def test_output_shape(config, frames):
    model = make_model(**config)
    inputs = make_inputs(
        frames=frames, height=8, width=12, condition_channels=model.config.condition_channels
    )
    with torch.no_grad():
        out = model(**inputs)
    assert out.shape == (2, model.config.out_channels, frames, 8, 12)
    assert torch.isfinite(out).all()


def test_scalar_timestep_matches_batched_timestep():
    model = make_model()
    inputs = make_inputs()
    with torch.no_grad():
        scalar = model(**{**inputs, "timestep": 7})
        batched = model(**{**inputs, "timestep": torch.tensor([7, 7])})
    torch.testing.assert_close(scalar, batched)


def test_bad_spatial_size_raises_clear_error():
    model = make_model(block_out_channels=(16, 32, 32), attention_levels=(False, True, True))
    with pytest.raises(ValueError, match=r"divisible by 4.*H=10, W=8"):
        model(**make_inputs(height=10, width=8))


def test_inputs_are_validated():
    model = make_model()
    inputs = make_inputs()
    with pytest.raises(ValueError, match="condition_channels=0"):
        model(**make_inputs(condition_channels=2))
    with pytest.raises(ValueError, match="condition must have shape"):
        make_model(condition_channels=2)(**inputs)
    with pytest.raises(ValueError, match=rf"encoder_hidden_states must be \(B=2, L, {CONTEXT_DIM}\)"):
        model(**{**inputs, "encoder_hidden_states": torch.randn(2, 6, CONTEXT_DIM + 1)})
    with pytest.raises(ValueError, match="encoder_attention_mask must be"):
        model(**inputs, encoder_attention_mask=torch.ones(2, 5))


# ------------------------------------------------------------------------------------ UNet behaviour


def test_unet_backends_agree_and_padding_is_ignored():
    model = randomize_zero_layers(make_model())
    inputs = make_inputs(context_len=6)
    mask = padding_mask(2, 6)
    with torch.no_grad():
        model.set_attention_backend("sdpa")
        sdpa = model(**inputs, encoder_attention_mask=mask)
        sdpa_unmasked = model(**inputs)
        model.set_attention_backend("math")
        reference = model(**inputs, encoder_attention_mask=mask)
        reference_unmasked = model(**inputs)
        noisy_padding = torch.where(mask[..., None], inputs["encoder_hidden_states"], 50.0)
        with_noisy_padding = model(
            **{**inputs, "encoder_hidden_states": noisy_padding}, encoder_attention_mask=mask
        )
    torch.testing.assert_close(sdpa, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(sdpa_unmasked, reference_unmasked, atol=1e-5, rtol=0)
    torch.testing.assert_close(with_noisy_padding, reference, atol=1e-5, rtol=0)
    assert not torch.allclose(sdpa, sdpa_unmasked, atol=1e-3)  # the mask does change what is attended to


def test_pooled_text_conditioning_starts_neutral_and_reads_only_real_tokens():
    plain = make_model()
    pooled = make_model(pooled_text_conditioning=True)
    missing, unexpected = pooled.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("text_pool_embedding.") for k in missing)
    inputs, mask = make_inputs(context_len=6), padding_mask(2, 6)
    with torch.no_grad():
        # Zero-initialised output layer: adding it to a trained UNet changes nothing at first.
        torch.testing.assert_close(pooled(**inputs, encoder_attention_mask=mask),
                                   plain(**inputs, encoder_attention_mask=mask), atol=0, rtol=0)
        randomize_zero_layers(pooled)
        # Masked tokens enter neither cross-attention nor the mean; the pooled path does change the output.
        pooled.set_attention_backend("math")
        reference = pooled(**inputs, encoder_attention_mask=mask)
        noisy_padding = torch.where(mask[..., None], inputs["encoder_hidden_states"], 50.0)
        torch.testing.assert_close(
            pooled(**{**inputs, "encoder_hidden_states": noisy_padding}, encoder_attention_mask=mask), reference,
            atol=1e-5, rtol=0)
        pooled.text_pool_embedding.linear_2.weight.zero_()
        pooled.text_pool_embedding.linear_2.bias.zero_()
        assert not torch.allclose(pooled(**inputs, encoder_attention_mask=mask), reference, atol=1e-3)


def test_set_attention_backend_switches_every_layer():
    model = make_model()
    model.set_attention_backend("math")
    backends = {m.backend for m in model.modules() if isinstance(m, Attention)}
    assert backends == {"math"} and "attention_backend" not in model.config  # a run-time choice, never saved
    with pytest.raises(ValueError, match="valid backends"):
        model.set_attention_backend("fast")
    model.reset_attention_backend()
    assert {m.backend for m in model.modules() if isinstance(m, Attention)} == {"auto"}
    assert set(ATTENTION_BACKENDS) == {"auto", "sdpa", "math", "xformers"}


def test_xformers_on_a_machine_without_it_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = make_model()
    with pytest.warns(UserWarning, match="'xformers' was requested but .*using 'auto'"):
        model.enable_xformers_memory_efficient_attention()  # diffusers-style switch maps onto our backends
    assert {m.backend for m in model.modules() if isinstance(m, Attention)} == {"auto"}


def test_a_model_saved_with_xformers_loads_and_runs_on_cpu(tmp_path, monkeypatch):
    """Trained on a GPU with xformers, sampled on a CPU machine: the backend is neither saved nor, from a config
    saved before it was ignored, restored."""
    monkeypatch.setattr(attention_module, "xformers_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # "the training machine"
    model = randomize_zero_layers(make_model(attention_backend="xformers"))
    assert {m.backend for m in model.modules() if isinstance(m, Attention)} == {"xformers"}
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "attention_backend" not in config
    config["attention_backend"] = "xformers"  # what earlier versions saved
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.undo()  # "the CPU machine"
    loaded = FaceVidUNet3D.from_pretrained(tmp_path).eval()
    assert {m.backend for m in loaded.modules() if isinstance(m, Attention)} == {"auto"}
    model.set_attention_backend("sdpa")
    inputs = make_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs), model(**inputs))


def test_frames_are_independent_at_init():
    model = make_model(block_out_channels=(16, 32, 32), attention_levels=(False, True, True))
    inputs = make_inputs(frames=4)
    with torch.no_grad():
        video = model(**inputs)
        per_frame = torch.cat(
            [model(**{**inputs, "sample": inputs["sample"][:, :, f : f + 1]}) for f in range(4)], dim=2
        )
    torch.testing.assert_close(video, per_frame, atol=1e-5, rtol=0)
    # Once the temporal layers are trained (here: perturbed), frames do interact.
    randomize_zero_layers(model)
    with torch.no_grad():
        mixed = model(**inputs)
        mixed_first_frame = model(**{**inputs, "sample": inputs["sample"][:, :, :1]})
    assert not torch.allclose(mixed[:, :, :1], mixed_first_frame, atol=1e-4)


def _loss_grads_and_saved_bytes(model: FaceVidUNet3D, inputs: dict):
    """Loss, gradients, and bytes of activations autograd keeps for backward (parameters excluded)."""
    model.zero_grad(set_to_none=True)
    with SavedForBackward(model) as saved:
        loss = model(**inputs).pow(2).mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.detach(), grads, saved.bytes


def test_gradient_checkpointing_same_gradients_less_memory():
    model = randomize_zero_layers(
        make_model(block_out_channels=(16, 32, 32), attention_levels=(False, True, True))
    )
    model.train()
    inputs = make_inputs(frames=3, height=16, width=16)
    inputs["encoder_attention_mask"] = padding_mask(2, 6)

    loss, grads, plain_bytes = _loss_grads_and_saved_bytes(model, inputs)
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    ckpt_loss, ckpt_grads, ckpt_bytes = _loss_grads_and_saved_bytes(model, inputs)

    torch.testing.assert_close(ckpt_loss, loss, atol=1e-5, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)
    print(
        f"\nsaved activations: {plain_bytes / 2**20:.2f} MiB plain, {ckpt_bytes / 2**20:.2f} MiB checkpointed"
    )
    assert ckpt_bytes < plain_bytes / 2


def test_save_pretrained_round_trip(tmp_path):
    model = randomize_zero_layers(make_model(condition_channels=2, attention_backend="math"))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = FaceVidUNet3D.from_pretrained(tmp_path).eval()

    assert loaded.config.condition_channels == 2
    assert tuple(loaded.config.block_out_channels) == TINY["block_out_channels"]
    loaded.set_attention_backend("math")  # the backend is chosen where the model runs, not saved
    inputs = make_inputs(condition_channels=2)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs), model(**inputs))


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("layout", ["modelscope", "facevid"])
def test_state_dict_saved_before_diffusers_blocks_loads_and_computes_the_same(layout):
    """tests/fixtures/unet_state_before_diffusers_blocks.safetensors was written by the code before the UNet took
    diffusers' TemporalConvLayer, GEGLU and Upsample2D (commit 2142d8b): for each layout a tiny model's weights
    (every weight perturbed, so zero-initialised layers take part, then rounded to fp16), fixed inputs and that
    code's output. The keys must load strictly and the output must not move."""
    path = FIXTURES / "unet_state_before_diffusers_blocks.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        config = json.loads(handle.metadata()[layout])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    model = FaceVidUNet3D(**config).eval()
    state = {key[len(layout) + 1:]: value.float() for key, value in tensors.items() if key.startswith(layout + ".")}
    model.load_state_dict(state, strict=True)
    inputs = {key.partition(".")[2]: value for key, value in tensors.items() if key.startswith("input.")}
    with torch.no_grad():
        output = model(**inputs)
    torch.testing.assert_close(output, tensors[f"output.{layout}"], rtol=0, atol=1e-5)


def test_diffusers_attention_and_resnet_blocks_compute_the_same_but_rename_keys():
    """Why FaceVidUNet3D keeps its own Attention and ResnetBlock (docs/performance.md, "Why these blocks"): rebuilt
    on diffusers' Attention (with a processor keeping FaceVid's backend and chunking) or ResnetBlock2D, the model
    computes the same, but saved checkpoints and the default LoRA targets would no longer fit it. If diffusers
    ever keeps these key names, this test fails and the choice should be revisited."""
    from bench.backbone_vs_diffusers import BackendProcessor, with_diffusers_attention, with_diffusers_resnets
    from models.lora import LoRAPatternError, lora_targets

    model = randomize_zero_layers(make_model(temporal_feed_forward=True))
    inputs = make_inputs()
    inputs["encoder_attention_mask"] = padding_mask(2, 6)  # padding: the processor's mask path runs
    keys = set(model.state_dict())
    rebuilt = {"attention": with_diffusers_attention(model, BackendProcessor()),
               "resnet": with_diffusers_resnets(model)}
    with torch.no_grad():
        expected = model(**inputs)
        for other in rebuilt.values():
            torch.testing.assert_close(other(**inputs), expected, rtol=0, atol=1e-6)
    renamed = {name: (sorted(keys - set(other.state_dict())), sorted(set(other.state_dict()) - keys))
               for name, other in rebuilt.items()}
    gone, new = renamed["attention"]
    assert gone and all(k.rsplit(".", 2)[-2] == "to_out" for k in gone)
    assert new == sorted(k.replace(".to_out.", ".to_out.0.") for k in gone)
    gone, new = renamed["resnet"]
    assert gone and new == sorted(k.replace(".shortcut.", ".conv_shortcut.") for k in gone)
    assert lora_targets(model, ["*.to_out"])
    with pytest.raises(LoRAPatternError, match="to_out"):
        lora_targets(rebuilt["attention"], ["*.to_out"])
