"""Classifier-free guidance rescale (sample.guidance_rescale, Lin et al. 2023): the math against a direct
computation, 0 as a no-op, and the sampling loop really stepping the scheduler with the rescaled prediction."""

import numpy as np
import pytest
import torch

from facevid.diffusion import build_sampler
from facevid.hub import resolve_pretrained
from facevid.pipeline import FaceVidPipeline, rescale_guidance
from models.text_encoder import FrozenTextEncoder
from models.unet3d import FaceVidUNet3D
from models.vae import build_tiny_vae

# Tiny models: one thread is as fast, and fair to other processes (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


def test_rescale_matches_a_direct_computation_and_zero_is_a_no_op():
    generator = torch.Generator().manual_seed(0)
    cond = torch.randn(3, 4, 2, 5, 5, generator=generator)
    guided = 3.0 * torch.randn(3, 4, 2, 5, 5, generator=generator) + 0.5  # guidance inflates the std
    assert rescale_guidance(guided, cond, 0.0) is guided
    for phi in (0.3, 0.7, 1.0):
        out = rescale_guidance(guided, cond, phi).double().numpy()
        for i in range(3):  # per video: the std over all its elements (unbiased, as torch.std)
            g, c = guided[i].double().numpy(), cond[i].double().numpy()
            expected = phi * g * (c.std(ddof=1) / g.std(ddof=1)) + (1 - phi) * g
            np.testing.assert_allclose(out[i], expected, rtol=1e-5, atol=1e-6)
    # phi = 1: every video gets exactly the conditional prediction's std
    full = rescale_guidance(guided, cond, 1.0)
    torch.testing.assert_close(full.flatten(1).std(dim=1), cond.flatten(1).std(dim=1))


@pytest.fixture(scope="module")
def tiny_pipeline():
    torch.manual_seed(0)
    unet = FaceVidUNet3D(block_out_channels=(32, 32), attention_levels=(False, True), attention_head_dim=16,
                         cross_attention_dim=384).eval()
    with torch.no_grad():  # perturb the zero-initialised layers so the prompt changes the prediction
        for param in unet.parameters():
            param.add_(0.05 * torch.randn_like(param))
    vae = build_tiny_vae([32, 32], 1, 4).eval()
    encoder = FrozenTextEncoder(resolve_pretrained("bundled:all-MiniLM-L6-v2"), 8)
    scheduler_config = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                        "beta_end": 0.012, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    return unet, vae, encoder, scheduler_config


@pytest.mark.parametrize("phi", [0.0, 0.7])
def test_sampling_steps_with_the_rescaled_guided_prediction(tiny_pipeline, phi):
    unet, vae, encoder, scheduler_config = tiny_pipeline
    pipe = FaceVidPipeline(unet, vae, encoder, scheduler_config, guidance_rescale=phi)
    outputs, stepped = [], []
    hook = unet.register_forward_hook(lambda module, args, output: outputs.append(output.clone()))
    sampler = build_sampler(scheduler_config, "ddim")
    step = sampler.step
    sampler.step = lambda prediction, t, latents: stepped.append(prediction.clone()) or step(prediction, t, latents)
    try:
        pipe(["a person talking", "a person smiling"], num_frames=2, resolution=16, num_inference_steps=2,
             guidance_scale=7.5, scheduler=sampler)
    finally:
        hook.remove()
    assert len(outputs) == len(stepped) == 2
    for output, prediction in zip(outputs, stepped):
        uncond, cond = output.chunk(2)
        guided = uncond + 7.5 * (cond - uncond)
        if phi == 0:
            assert torch.equal(prediction, guided)
            continue
        dims = (1, 2, 3, 4)
        expected = phi * guided * cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
        torch.testing.assert_close(prediction, expected + (1 - phi) * guided)
        assert not torch.allclose(prediction, guided, atol=1e-3)


def test_guidance_rescale_outside_zero_one_is_refused(tiny_pipeline):
    unet, vae, encoder, scheduler_config = tiny_pipeline
    with pytest.raises(ValueError, match=r"guidance_rescale=1.5 must be in \[0, 1\]"):
        FaceVidPipeline(unet, vae, encoder, scheduler_config, guidance_rescale=1.5)
