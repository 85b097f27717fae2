from pathlib import Path

import pytest

from facevid.config import load_config, save_config
from facevid.schema import ConfigError


@pytest.fixture
def manifest(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text("")
    return path


def base(manifest, tmp_path, *extra):
    return [f"data.manifest={manifest}", f"output_dir={tmp_path / 'run'}", "stage=vae", *extra]


def test_defaults_validate(manifest, tmp_path):
    cfg = load_config(None, base(manifest, tmp_path))
    assert cfg.data.caption_dropout == 0.1
    assert cfg.text_encoder.pretrained == "bundled:all-MiniLM-L6-v2"


def test_unknown_key_names_key_and_valid_keys(manifest, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, base(manifest, tmp_path, "train.batchsize=3"))
    assert "train.batchsize" in str(err.value)
    assert "batch_size" in str(err.value)  # what would be valid


def test_wrong_type_names_key(manifest, tmp_path):
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(None, base(manifest, tmp_path, "train.max_steps=many"))


def test_bad_choice_lists_valid_values(manifest, tmp_path):
    with pytest.raises(ConfigError, match="epsilon, v_prediction"):
        load_config(None, base(manifest, tmp_path, "diffusion.prediction_type=x0"))


def test_resolution_must_fit_vae_and_unet(manifest, tmp_path):
    vae_dir = tmp_path / "vae"
    vae_dir.mkdir()
    (vae_dir / "config.json").write_text('{"block_out_channels": [32, 64, 64]}')  # factor 4
    with pytest.raises(ConfigError, match=r"data.resolution.*multiple of 8"):
        load_config(None, [f"data.manifest={manifest}", f"output_dir={tmp_path}", f"vae.pretrained={vae_dir}",
                           "data.resolution=36", "unet.block_out_channels=[64,128]"])


def test_missing_manifest_and_missing_vae(tmp_path):
    with pytest.raises(ConfigError, match="data.manifest.*not found"):
        load_config(None, [f"data.manifest={tmp_path / 'nope.jsonl'}", f"output_dir={tmp_path}", "stage=vae"])
    (tmp_path / "m.jsonl").write_text("")
    with pytest.raises(ConfigError, match="vae.pretrained.*not found"):
        load_config(None, [f"data.manifest={tmp_path / 'm.jsonl'}", f"output_dir={tmp_path}",
                           "vae.pretrained=runs/missing/vae"])


def test_impossible_values(manifest, tmp_path):
    for override, key in [("train.batch_size=0", "train.batch_size"), ("data.caption_dropout=1.5", "caption_dropout"),
                          ("train.ema_decay=1.0", "ema_decay"), ("unet.attention_levels=[true]", "attention_levels"),
                          ("diffusion.zero_terminal_snr=true", "zero_terminal_snr"),
                          ("diffusion.frame_noise_correlation=1.0", "frame_noise_correlation"),
                          ("vae.kl_weight=-1e-6", "vae.kl_weight"),
                          ("plugin.module=no_such_module", "plugin.module.*cannot be imported"),
                          ("plugin.options={motion_std: 0.1}", "plugin.options.*set plugin.module")]:
        extra = ["diffusion.prediction_type=epsilon"] if "zero_terminal" in override else []
        with pytest.raises(ConfigError, match=key):
            load_config(None, base(manifest, tmp_path, override, *extra))


def test_override_syntax_error(manifest, tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, base(manifest, tmp_path, "train.max_steps"))


def test_base_file_and_round_trip(manifest, tmp_path):
    (tmp_path / "parent.yaml").write_text(f"data:\n  manifest: {manifest}\n  num_frames: 6\nstage: vae\n"
                                          f"output_dir: {tmp_path}\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\ntrain:\n  max_steps: 7\n")
    cfg = load_config(tmp_path / "child.yaml", ["data.num_frames=5"])
    assert (cfg.data.num_frames, cfg.train.max_steps, cfg.stage) == (5, 7, "vae")
    save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml")
    assert again == cfg


def test_saved_config_names_local_files_absolutely(manifest, tmp_path, monkeypatch):
    """A run's config.yaml must find its VAE / manifest from any working directory (sample.py, evaluate.py)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-vae").mkdir()
    cfg = load_config(None, base(manifest.name, tmp_path, "vae.pretrained=my-vae"))  # both relative to tmp_path
    save_config(cfg, tmp_path / "run" / "config.yaml")
    monkeypatch.chdir(tmp_path / "run")
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.vae.pretrained == str((tmp_path / "my-vae").resolve())
    assert saved.data.manifest == str(manifest.resolve())
    assert saved.text_encoder.pretrained == cfg.text_encoder.pretrained  # a bundled: / hub name stays as it is


def test_shipped_configs_parse(tmp_path, monkeypatch):
    configs = Path(__file__).resolve().parents[1] / "configs"
    monkeypatch.chdir(tmp_path)  # a fresh clone: no runs/ yet
    # Without its FaceVid-Synth clips (the Makefile generates them first) a config says how to make them.
    with pytest.raises(ConfigError, match="data.manifest.*not found.*python -m data.synth"):
        load_config(configs / "demo_vae.yaml")
    for folder in ("facevid_synth", "facevid_synth_random"):
        (tmp_path / "outputs" / folder).mkdir(parents=True)
        (tmp_path / "outputs" / folder / "manifest.jsonl").write_text("")
    cfg = load_config(configs / "demo_vae.yaml")
    long_vae = load_config(configs / "demo_long_vae.yaml")
    assert cfg.stage == "vae" and cfg.plugin.options["vae_edge_loss_weight"] > 0
    # demo-long's VAE: the demo's recipe (edge term, same steps) on its own data (random motion timing).
    assert (long_vae.vae, long_vae.train, long_vae.plugin) == (cfg.vae, cfg.train, cfg.plugin)
    assert long_vae.output_dir != cfg.output_dir and long_vae.data.manifest != cfg.data.manifest
    # The t2v configs need their VAE stage's output first, and say so.
    for t2v, vae_dir in [("demo.yaml", cfg.output_dir), ("demo_long.yaml", long_vae.output_dir)]:
        with pytest.raises(ConfigError, match=f"vae.pretrained.*{vae_dir}/vae.*not found"):
            load_config(configs / t2v)


def test_vae_without_resnet_blocks_needs_equal_widths(manifest, tmp_path):
    load_config(None, base(manifest, tmp_path, "vae.layers_per_block=0", "vae.block_out_channels=[64,64,64]"))
    with pytest.raises(ConfigError, match=r"vae.block_out_channels.*same width"):
        load_config(None, base(manifest, tmp_path, "vae.layers_per_block=0", "vae.block_out_channels=[32,64,64]"))


def test_yaml_booleans_do_not_sneak_into_string_keys(manifest, tmp_path):
    """YAML 1.1 reads `no` / `off` as false; string keys must get what was written (issue 21, item 1)."""
    cfg = load_config(None, base(manifest, tmp_path, "train.mixed_precision=no", "sample.negative_prompt=no",
                                 "train.validation_prompts=[yes, on]"))
    assert cfg.train.mixed_precision == "no"
    assert cfg.sample.negative_prompt == "no" and cfg.train.validation_prompts == ["yes", "on"]
    # "off" / false mean the key's off choice.
    for value in ("off", "false", "OFF"):
        cfg = load_config(None, base(manifest, tmp_path, f"train.mixed_precision={value}",
                                     f"train.tracker={value}", f"data.cache={value}"))
        assert (cfg.train.mixed_precision, cfg.train.tracker, cfg.data.cache) == ("no", "none", "none")
    (tmp_path / "c.yaml").write_text(f"data:\n  manifest: {manifest}\n  flip: yes\n  cache: off\n"
                                     f"output_dir: {tmp_path}\nstage: vae\ntrain:\n  mixed_precision: no\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.train.mixed_precision, cfg.data.cache, cfg.data.flip) == ("no", "none", True)
    # Boolean keys still read yes / on / off.
    assert load_config(None, base(manifest, tmp_path, "data.flip=on")).data.flip is True
    assert load_config(None, base(manifest, tmp_path, "data.flip=off")).data.flip is False
    with pytest.raises(ConfigError, match="train.mixed_precision.*auto, no, fp16, bf16"):
        load_config(None, base(manifest, tmp_path, "train.mixed_precision=fp8"))


def _tiny_text_encoder(folder: Path, kind: str, positions: int = 32) -> Path:
    """A random text encoder saved in the real transformers format (config.json + safetensors)."""
    import transformers as tf

    small = dict(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=positions)
    model = {"bert": lambda: tf.BertModel(tf.BertConfig(**small)),
             "clip": lambda: tf.CLIPTextModel(tf.CLIPTextConfig(**small)),
             "t5": lambda: tf.T5EncoderModel(tf.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=37, num_layers=1,
                                                         num_heads=2))}[kind]()
    model.save_pretrained(folder)
    return folder


def test_text_encoder_max_length_must_fit_its_positions(manifest, tmp_path):
    """Item 3: a max_length past the encoder's position table crashed inside transformers at the first batch."""
    bert = _tiny_text_encoder(tmp_path / "bert", "bert", positions=32)
    clip = _tiny_text_encoder(tmp_path / "clip", "clip", positions=77)
    t5 = _tiny_text_encoder(tmp_path / "t5", "t5")
    with pytest.raises(ConfigError, match=r"text_encoder.max_length' = 48 .*at most 32"):
        load_config(None, base(manifest, tmp_path, f"text_encoder.pretrained={bert}", "text_encoder.max_length=48"))
    with pytest.raises(ConfigError, match=r"text_encoder.max_length' = 100 .*at most 77"):
        load_config(None, base(manifest, tmp_path, f"text_encoder.pretrained={clip}", "text_encoder.max_length=100"))
    with pytest.raises(ConfigError, match=r"text_encoder.max_length' = 600 .*at most 512"):
        load_config(None, base(manifest, tmp_path, "text_encoder.max_length=600"))  # the bundled MiniLM
    # A pipeline folder's text_encoder/ subfolder, and the limit itself, are fine; T5 has no limit.
    load_config(None, base(manifest, tmp_path, f"text_encoder.pretrained={tmp_path}",
                           "text_encoder.subfolder=clip", "text_encoder.max_length=77"))
    with pytest.raises(ConfigError, match="at most 77"):
        load_config(None, base(manifest, tmp_path, f"text_encoder.pretrained={tmp_path}",
                               "text_encoder.subfolder=clip", "text_encoder.max_length=78"))
    load_config(None, base(manifest, tmp_path, f"text_encoder.pretrained={t5}", "text_encoder.max_length=1000"))


def test_offline_hub_id_fails_at_once_naming_key_id_and_fix(manifest, tmp_path, monkeypatch):
    """Item 9: offline, a hub id missing from the local cache retried for minutes, then a raw OSError."""
    import time

    from huggingface_hub import constants

    hub_cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = [f"data.manifest={manifest}", f"output_dir={tmp_path / 'run'}", "vae.pretrained=stabilityai/sd-vae-ft-mse"]
    started = time.time()
    with pytest.raises(ConfigError) as err:
        load_config(None, args)
    assert time.time() - started < 5
    message = str(err.value)
    assert "vae.pretrained" in message and "stabilityai/sd-vae-ft-mse" in message
    assert "HF_HUB_OFFLINE" in message and "local folder" in message and "download" in message
    # The same id in the Hugging Face cache (its real layout: refs/main -> snapshots/<commit>/) is accepted.
    repo = hub_cache / "models--stabilityai--sd-vae-ft-mse"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "config.json").write_text('{"block_out_channels": [128, 256, 512, 512]}')
    assert load_config(None, args).vae.pretrained == "stabilityai/sd-vae-ft-mse"
    # A text encoder hub id too, with TRANSFORMERS_OFFLINE alone.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(ConfigError, match="text_encoder.pretrained' = 'openai/clip-vit-base-patch32'"):
        load_config(None, args + ["text_encoder.pretrained=openai/clip-vit-base-patch32"])


def test_unreachable_hub_fails_in_seconds(manifest, tmp_path, monkeypatch):
    """Item 9, online: an uncached hub id with the hub out of reach must not retry for minutes."""
    import socket
    import time

    from huggingface_hub import constants

    with socket.socket() as sock:  # a port that refuses connections
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    started = time.time()
    with pytest.raises(ConfigError, match=r"vae.pretrained.*cannot be reached.*local folder"):
        load_config(None, [f"data.manifest={manifest}", f"output_dir={tmp_path / 'run'}",
                           "vae.pretrained=stabilityai/sd-vae-ft-mse"])
    assert time.time() - started < 10


def test_a_mistyped_manifest_is_refused_and_nothing_is_generated(tmp_path):
    """Item 10: a mistyped manifest path once filled an existing folder with FaceVid-Synth. Training never
    generates data now (the demo runs `python -m data.synth` first): the typo is an error, the folder untouched."""
    data = tmp_path / "my_data"
    data.mkdir()
    (data / "manifest.jsonl").write_text("")
    (data / "clip.mp4").write_bytes(b"")

    with pytest.raises(ConfigError, match=r"data.manifest.*manifst.jsonl.*not found.*python -m data.synth"):
        load_config(None, [f"data.manifest={data / 'manifst.jsonl'}", f"output_dir={tmp_path / 'run'}", "stage=vae"])
    assert sorted(p.name for p in data.iterdir()) == ["clip.mp4", "manifest.jsonl"]
