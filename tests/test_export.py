"""export.py round trip: start from a pretrained UNet3DConditionModel, fine-tune, export, load the folder with
diffusers' DiffusionPipeline.from_pretrained in a fresh process, and get the frames FaceVidPipeline (sample.py)
makes for the same seed and scheduler. Also image-to-video, which exports through FaceVidDiffusersPipeline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import task_runs
import torch

from facevid.pipeline import FaceVidPipeline, load_first_frame

export = task_runs.entry_point("export")
STEPS, GUIDANCE, SEED = 3, 2.0, 5

# Runs in a fresh interpreter outside the repository: only diffusers, plus the FaceVid checkout on PYTHONPATH for
# the trust_remote_code folder (FaceVid runs from its checkout; `pip install -e .` installs no package).
LOADER = """
import sys, numpy as np, torch
from diffusers import DiffusionPipeline
out = sys.argv[1]
t2v = DiffusionPipeline.from_pretrained(out + "/t2v")
frames = t2v("a person with red hair talking", num_frames=4, height=16, width=16, guidance_scale={g},
             num_inference_steps={s}, generator=torch.Generator().manual_seed({seed}), output_type="np").frames
np.save(out + "/t2v.npy", frames)
assert "facevid" not in sys.modules  # a standard diffusers folder: FaceVid's code is not needed
i2v = DiffusionPipeline.from_pretrained(out + "/i2v", trust_remote_code=True)
frames = i2v("a person talking", image=torch.load(out + "/image.pt"), num_inference_steps={s},
             guidance_scale={g}, seed={seed}).frames
np.save(out + "/i2v.npy", frames)
print(type(t2v).__name__, type(t2v.unet).__name__, type(i2v).__name__, type(i2v.unet).__name__)
""".format(g=GUIDANCE, s=STEPS, seed=SEED)


def run_fresh_interpreter(code: str, tmp_path) -> subprocess.CompletedProcess:
    """Run `code` in a new Python process in tmp_path (argv[1] = tmp_path), offline, one thread, with its own
    diffusers modules cache; fails the test with the child's stderr when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """A t2v run started from a (tiny) ModelScope-format UNet3DConditionModel."""
    unet = task_runs.tiny_unet3d(tmp_path_factory)
    return task_runs.trained_run(tmp_path_factory, "t2v_from_unet3d", f"unet.pretrained={unet}")


@pytest.fixture(scope="module")
def i2v_run(tmp_path_factory):
    return task_runs.trained_run(tmp_path_factory, "i2v", "task=i2v")


def test_export_loads_in_a_fresh_process_and_matches_sample_py(pretrained_run, i2v_run, tmp_path_factory, tmp_path):
    assert export.main(["--run", str(pretrained_run), "--out", str(tmp_path / "t2v")]) == 0
    assert export.main(["--run", str(i2v_run), "--out", str(tmp_path / "i2v")]) == 0
    t2v_index = json.loads((tmp_path / "t2v" / "model_index.json").read_text())
    assert t2v_index["_class_name"] == "TextToVideoSDPipeline" and t2v_index["unet"][1] == "UNet3DConditionModel"
    assert json.loads((tmp_path / "i2v" / "model_index.json").read_text())["unet"][1] == "FaceVidUNet3D"
    clip = task_runs.synth_manifest(tmp_path_factory).parent / "clips" / "synth_00001.mp4"
    image = load_first_frame(clip, 16, frame=4)
    torch.save(image, tmp_path / "image.pt")

    result = run_fresh_interpreter(LOADER, tmp_path)
    assert "TextToVideoSDPipeline UNet3DConditionModel FaceVidDiffusersPipeline FaceVidUNet3D" in result.stdout

    kwargs = dict(num_frames=4, resolution=16, num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=SEED)
    ours = FaceVidPipeline.from_run(pretrained_run)(["a person with red hair talking"], **kwargs)
    theirs = (np.load(tmp_path / "t2v.npy") * 255).round().astype(np.uint8)  # diffusers returns [0, 1] floats
    # Observed identical; one grey level allows for rounding of the float -> uint8 step.
    assert theirs.shape == ours.shape and np.abs(theirs.astype(int) - ours.astype(int)).max() <= 1
    ours = FaceVidPipeline.from_run(i2v_run)(["a person talking"], images=image[None], **kwargs)
    theirs = np.load(tmp_path / "i2v.npy")
    # The loader runs on 1 thread, this process on more: float sums may round one pixel a grey level apart.
    assert theirs.shape == ours.shape and np.abs(theirs.astype(int) - ours.astype(int)).max() <= 1


def test_export_refuses_unet3d_format_for_an_i2v_run(i2v_run, tmp_path, capsys):
    assert export.main(["--run", str(i2v_run), "--out", str(tmp_path / "x"), "--format", "unet3d"]) == 2
    err = capsys.readouterr().err
    assert "cannot be exported as UNet3DConditionModel" in err and "condition_channels=5" in err
    assert not (tmp_path / "x").exists()


def test_export_keeps_the_objective_and_a_plugin_unet(tmp_path_factory, tmp_path, capsys):
    """A run trained with frame-correlated noise and the demo's plug-ins (motion scaling and preconditioning, the
    text-layout UNet) samples with all of them, and so does its export; the standard TextToVideoSDPipeline format
    (independent noise per frame, latents decoded as sampled, the UNet's output read as a plain prediction, no
    extra layers) is refused for it, with the reasons. The run also switches on the UNet's optional temporal
    layers from the config, which the export must carry."""
    run = task_runs.trained_run(tmp_path_factory, "t2v_correlated", "diffusion.frame_noise_correlation=0.5",
                                "plugin.module=demo", "plugin.options.motion_scale=4", "plugin.options.motion_std=0.4",
                                "plugin.options.text_layout=true", "plugin.options.text_layout_size=4",
                                "unet.temporal_conv=true", "unet.temporal_feed_forward=true")
    ours = FaceVidPipeline.from_run(run)
    spec = ours.objective.to_dict()
    assert spec["noise_prior"] == {"type": "mixed_frames", "correlation": 0.5}
    assert spec["parameterization"]["motion_scale"] == 4.0 and spec["parameterization"]["motion_std"] == 0.4
    assert type(ours.unet).__name__ == "DemoUNet3D" and ours.unet.config.text_layout_size == 4
    assert ours.unet.config.temporal_conv and ours.unet.config.temporal_feed_forward
    assert export.main(["--run", str(run), "--out", str(tmp_path / "x"), "--format", "unet3d"]) == 2
    err = capsys.readouterr().err
    assert "frame_noise_correlation=0.5" in err and "demo.aids:MotionPreconditionedV" in err and "DemoUNet3D" in err
    assert export.main(["--run", str(run), "--out", str(tmp_path / "out")]) == 0  # auto -> FaceVid format

    loader = (f"import numpy as np\nfrom diffusers import DiffusionPipeline\n"
              f"pipe = DiffusionPipeline.from_pretrained({str(tmp_path / 'out')!r}, trust_remote_code=True)\n"
              f"assert pipe.config.objective == {spec!r}\n"
              f"assert type(pipe.unet).__name__ == 'DemoUNet3D'\n"
              f"np.save('frames.npy', pipe('a person talking', num_frames=4, resolution=16, "
              f"num_inference_steps={STEPS}, guidance_scale={GUIDANCE}, seed={SEED}).frames)\n")
    run_fresh_interpreter(loader, tmp_path)
    expected = ours(["a person talking"], num_frames=4, resolution=16, num_inference_steps=STEPS,
                    guidance_scale=GUIDANCE, seed=SEED)
    # One grey level for the thread count (see the test above); the same noise and scaling or it would be far off.
    assert np.abs(np.load(tmp_path / "frames.npy").astype(int) - expected.astype(int)).max() <= 1


def test_a_from_scratch_run_with_the_modelscope_layout_exports_as_a_standard_pipeline(tmp_path_factory, tmp_path):
    """unet.layout=modelscope trains, from scratch, a UNet that is exactly a UNet3DConditionModel: export's auto
    format writes a TextToVideoSDPipeline that diffusers loads and samples as sample.py does. The same run in the
    FaceVid format carries its sample.guidance_rescale, which TextToVideoSDPipeline has no option for."""
    from diffusers import DiffusionPipeline

    run = task_runs.trained_run(tmp_path_factory, "t2v_modelscope_layout", "unet.layout=modelscope",
                                "sample.guidance_rescale=0.7")
    assert export.main(["--run", str(run), "--out", str(tmp_path / "t2v")]) == 0
    index = json.loads((tmp_path / "t2v" / "model_index.json").read_text())
    assert index["_class_name"] == "TextToVideoSDPipeline" and index["unet"][1] == "UNet3DConditionModel"
    assert "--guidance-rescale 0" in (tmp_path / "t2v" / "README.md").read_text()

    prompt = "a person with red hair talking"
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "t2v")
    theirs = pipe(prompt, num_frames=4, height=16, width=16, guidance_scale=GUIDANCE, num_inference_steps=STEPS,
                  generator=torch.Generator().manual_seed(SEED), output_type="np").frames
    theirs = (np.asarray(theirs) * 255).round().astype(np.uint8)
    ours = FaceVidPipeline.from_run(run)([prompt], num_frames=4, resolution=16, num_inference_steps=STEPS,
                                         guidance_scale=GUIDANCE, seed=SEED, guidance_rescale=0.0)
    # One grey level for the float -> uint8 rounding (see the first test).
    assert theirs.shape == ours.shape and np.abs(theirs.astype(int) - ours.astype(int)).max() <= 1

    assert export.main(["--run", str(run), "--out", str(tmp_path / "facevid"), "--format", "facevid"]) == 0
    assert json.loads((tmp_path / "facevid" / "model_index.json").read_text())["guidance_rescale"] == 0.7
