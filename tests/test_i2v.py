"""Image-to-video and unconditional runs (task=i2v / uncond) on tiny real runs: first-frame fidelity, the cached
and uncached posterior paths feeding the same condition, sampling without a prompt, and the refusal of requests a
run's task cannot serve."""

import numpy as np
import pytest
import task_runs
import torch
from PIL import Image

from data.manifest import read_manifest
from data.video import tensor_to_frames
from facevid.pipeline import FaceVidPipeline, load_first_frame
from facevid.tasks import TaskMismatchError
from models.vae import decode_latents, sample_latents

sample = task_runs.entry_point("sample")
SAMPLING = dict(num_frames=4, resolution=16, num_inference_steps=3, guidance_scale=2.0)


# Tiny models: one thread is as fast, and fair to other processes (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def i2v_run(tmp_path_factory):
    return task_runs.trained_run(tmp_path_factory, "i2v", "task=i2v")


@pytest.fixture(scope="module")
def uncond_run(tmp_path_factory):
    return task_runs.trained_run(tmp_path_factory, "uncond", "task=uncond")


@pytest.fixture(scope="module")
def t2v_run(tmp_path_factory):
    return task_runs.trained_run(tmp_path_factory, "t2v")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    manifest = task_runs.synth_manifest(tmp_path_factory)
    return read_manifest(manifest)[0][0].video


def test_i2v_run_records_its_task(i2v_run):
    assert "task: i2v" in (i2v_run / "config.yaml").read_text()
    pipe = FaceVidPipeline.from_run(i2v_run)
    assert pipe.task == "i2v" and pipe.unet.config.condition_channels == pipe.unet.config.in_channels + 1


@pytest.mark.parametrize("scheduler", ["dpm++", "ddim"])
def test_i2v_first_frame_is_the_image_after_a_vae_round_trip(i2v_run, clip, scheduler):
    pipe = FaceVidPipeline.from_run(i2v_run)
    images = torch.stack([load_first_frame(clip, 16, frame=2), load_first_frame(clip, 16, frame=6)])
    videos = pipe(["a person talking", "a person nodding"], images=images, scheduler=scheduler, seed=1, **SAMPLING)
    round_trip = decode_latents(pipe.vae, pipe.encode_first_frames(images))
    for video, expected in zip(videos, round_trip):
        # Decoded in a batch of a different size: at most one grey level of float noise.
        assert np.abs(video[0].astype(int) - tensor_to_frames(expected)[0].astype(int)).max() <= 1
        assert not np.array_equal(video[1], video[0])  # the other frames are generated


def test_image_file_and_video_frame_load_alike(clip, tmp_path):
    frame = load_first_frame(clip, 32, frame=3)  # the clips are 32 px: no resampling
    png = tmp_path / "face.png"
    Image.fromarray(tensor_to_frames(frame[:, None])[0]).save(png)
    assert torch.equal(load_first_frame(png, 32), frame)
    with pytest.raises(ValueError, match="needs a video"):
        load_first_frame(png, 32, frame=1)


def _stage(task: str, tmp_path_factory, tmp_path, *overrides: str):
    return task_runs.built_stage(task, tmp_path_factory, tmp_path, *overrides)


def test_i2v_condition_comes_from_the_trained_latents_cached_or_not(tmp_path_factory, tmp_path):
    stage, model, batch = _stage("i2v", tmp_path_factory, tmp_path)
    mean, std, text, mask = stage.encode_batch(batch)
    cached = {"latent_mean": mean, "latent_std": std, "text_embeds": text, "text_mask": mask, "caption": []}
    conditions = []

    def recording_model(*args, condition=None):
        conditions.append(condition)
        return model(*args, condition=condition)

    losses = [stage.compute_loss(recording_model, b, torch.Generator().manual_seed(0))[0] for b in (batch, cached)]
    assert torch.equal(losses[0], losses[1]) and torch.equal(conditions[0], conditions[1])
    # The condition is frame 0 of the very posterior sample being denoised, plus a mask marking frame 0.
    latents = sample_latents(mean, std, stage.vae.config.scaling_factor, torch.Generator().manual_seed(0))
    condition = conditions[0]
    assert condition.shape == (2, 5, 4, 8, 8)
    assert torch.equal(condition[:, :4, 0], latents[:, :, 0]) and not condition[:, :4, 1:].any()
    assert condition[:, 4, 0].eq(1).all() and not condition[:, 4, 1:].any()


def test_uncond_training_ignores_captions(tmp_path_factory, tmp_path):
    stage, model, batch = _stage("uncond", tmp_path_factory, tmp_path)
    other = {**batch, "caption": ["a person with red hair, talking"] * 2}
    a, b = (stage.compute_loss(model, x, torch.Generator().manual_seed(0))[0] for x in (batch, other))
    assert torch.equal(a, b)


def test_uncond_samples_without_a_prompt(uncond_run):
    pipe = FaceVidPipeline.from_run(uncond_run)
    assert pipe.task == "uncond"
    two = pipe(num_videos=2, seed=3, **SAMPLING)
    one = pipe(num_videos=1, seed=3, **{**SAMPLING, "guidance_scale": 7.0})  # no guidance for one condition
    assert two.shape == (2, 4, 16, 16, 3)
    assert np.array_equal(two[0], one[0]) and not np.array_equal(two[0], two[1])
    with pytest.raises(TaskMismatchError, match="takes no prompt"):
        pipe(["a person talking"], **SAMPLING)


def test_sample_cli_for_each_task(i2v_run, uncond_run, clip, tmp_path, capsys):
    common = ["--steps", "2", "--frames", "4"]
    assert sample.main(["--run", str(i2v_run), "--image", str(clip), "--image-frame", "5", "--prompt",
                        "a person talking", "--num-videos", "2", "--out", str(tmp_path / "i2v"), *common]) == 0
    assert sample.main(["--run", str(uncond_run), "--num-videos", "3", "--out", str(tmp_path / "u"), *common]) == 0
    assert len(list((tmp_path / "i2v").glob("*.mp4"))) == 2 and len(list((tmp_path / "u").glob("*.mp4"))) == 3
    assert "3 video(s)" in capsys.readouterr().out


@pytest.mark.parametrize("run, args, message", [
    ("t2v", ["--prompt", "a person talking", "--image", "CLIP"],
     "is a text-to-video (t2v) model: it takes no conditioning image"),
    ("t2v", [], "give at least one prompt"),
    ("i2v", ["--prompt", "a person talking"], "is an image-to-video (i2v) model: give the first frame with --image"),
    ("uncond", ["--prompt", "a person talking"], "is an unconditional (uncond) model: it takes no prompt"),
    ("uncond", ["--image", "CLIP"], "takes no prompt and no image, but got an image"),
    ("i2v", ["--image", "PNG", "--image-frame", "2"], "--image-frame needs a video"),
])
def test_sample_cli_refuses_a_request_the_task_cannot_serve(request, run, args, message, clip, tmp_path, capsys):
    png = tmp_path / "face.png"
    Image.new("RGB", (16, 16)).save(png)
    args = [{"CLIP": str(clip), "PNG": str(png)}.get(a, a) for a in args]
    run_dir = request.getfixturevalue(f"{run}_run")
    assert sample.main(["--run", str(run_dir), *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and not (tmp_path / "out").exists(), err


def test_i2v_trains_and_validates_from_the_latent_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("i2v_cache")
    run = task_runs.trained_run(tmp_path_factory, "i2v_cached", "task=i2v", "data.cache=auto",
                                f"data.cache_dir={cache}")
    # Validation decoded the cached first-frame latents to images and sampled from them.
    assert (run / "unet_ema").is_dir() and len(list((run / "samples").rglob("*.mp4"))) == 4
