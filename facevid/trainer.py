"""The training loop, shared by every stage: Accelerate, optimizer, EMA, checkpoints, resume, logging.

What is trained and how its loss is computed lives in a `Stage` (facevid/stages.py); this file owns
everything around it, so the VAE stage and the text-to-video stage checkpoint, resume and log alike.

Exact resume: the data order depends only on (seed, epoch) (data/sampler.py), each clip's random
choices only on (seed, epoch, index) (data/dataset.py), and all training noise comes from one
torch.Generator per rank whose state is checkpointed. A resumed run therefore repeats the same
batches and the same noise as an uninterrupted one.

Failures: an optimizer step whose loss or gradients are NaN/inf is never applied, and more than
train.max_nonfinite_steps of them in a row stop the run (NonFiniteLossError); weights are checked finite
before every checkpoint, so rotation never trades the last good checkpoint for a NaN one. A checkpoint that
cannot be written (full disk) raises CheckpointWriteError and leaves the previous one as the latest.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, gather_object, set_seed
from diffusers.optimization import get_scheduler
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from data.buckets import bucketed_training_data, collate_bucketed, parse_buckets, saved_or_new_plan
from data.cache import LatentCache, text_key
from data.dataset import (
    CachedClipDataset,
    CachedJointDataset,
    JointImageVideoDataset,
    VideoClipDataset,
    collate_clips,
    collate_joint,
)
from data.manifest import SkippedItem, append_skip_report, read_manifest
from data.sampler import JointBatchSampler, ShardedEpochSampler, training_loader
from facevid.cache_builder import build_cache, check_cache
from facevid.compile import compile_model
from facevid.config import ConfigError, RunConfig, save_config, validate_clips
from facevid.curves import plot_training_curves
from facevid.ema import new_ema, trainable_parameters
from facevid.engine import DataParallelEngine, build_engine, patient_barrier, process_group_kwargs, rank_share
from facevid.rank_zero import on_main_process
from facevid.stages import training_fps
from facevid.trainable import select_trainable

logger = logging.getLogger("facevid")

CHECKPOINT_PREFIX = "step-"
PARTIAL_PREFIX = ".tmp-"  # a checkpoint being written; renamed to its final name once complete


class NonFiniteLossError(RuntimeError):
    """The loss, the gradients or the weights became NaN/inf: the run stops rather than train on garbage."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (typically a full disk); the previous one is intact."""


@dataclass
class TrainerState:
    """Counters saved with every checkpoint (trainer_state.json)."""

    global_step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    tracker_run_id: str | None = None
    skipped_clips: int = 0
    world_size: int = 1


def build_accelerator(cfg: RunConfig, run_dir: Path) -> Accelerator:
    """One Accelerator for every machine: the CPU case must say cpu=True, or
    `accelerate launch --multi_gpu` on a CPU box starts independent, non-distributed processes."""
    on_gpu = torch.cuda.is_available()
    precision = cfg.train.mixed_precision
    if precision == "auto":
        precision = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(
        cpu=not on_gpu,
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=None if cfg.train.tracker == "none" else cfg.train.tracker,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        kwargs_handlers=[process_group_kwargs(cfg.train.process_group_timeout_s),
                         # Image batches skip the temporal layers: DDP must expect parameters without a gradient.
                         DistributedDataParallelKwargs(find_unused_parameters=cfg.data.image_batch_share > 0)],
    )


def _ignore_stop_signals_in_worker(_worker_id: int) -> None:
    # Ctrl-C and SIGTERM reach the whole process group; only the main process decides when to stop
    # (after saving a checkpoint). A worker killed by the signal would crash the run instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def setup_logging(accelerator: Accelerator) -> None:
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


@torch.no_grad()
def weights_checksum(params, chunk: int = 1 << 22) -> torch.Tensor:
    """(sum, sum of squares) of every value, in float64, on the parameters' device. Summed a chunk of each
    parameter at a time, so at most `chunk` float64 values exist at once (32 MB), never a float64 copy of the
    model or of one large parameter; no host sync either."""
    total = None
    for param in params:
        for piece in param.detach().reshape(-1).split(chunk):
            piece = piece.double()
            part = torch.stack([piece.sum(), piece.square().sum()])
            total = part if total is None else total + part
    return total


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (DTensor) tensor; any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _row_step(line: str) -> float:
    """A log row's step; rows without one (older files) count as step -inf, a torn last line as +inf."""
    try:
        return json.loads(line).get("step", float("-inf"))
    except ValueError:
        return float("inf")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one has a .tmp- name and is never listed)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


class Trainer:
    """Trains `stage`. `evaluation` (needed when eval.every > 0; train.py builds evaluation.training's) is a
    callback the trainer knows only by its two methods: prepare(dataset, device), called once before step 1
    so that a missing weight file fails at once, and evaluation(stage, model, step) -> {name: number}."""

    def __init__(self, cfg: RunConfig, stage, evaluation=None):
        if cfg.eval.every and evaluation is None:
            raise ValueError(f"eval.every={cfg.eval.every} needs an evaluation callback: pass "
                             "evaluation.training.TrainingEvaluation(cfg) to the Trainer (train.py does)")
        self.cfg = cfg
        self.stage = stage
        self.evaluation = evaluation
        self.run_dir = Path(cfg.output_dir)
        self.state = TrainerState()
        self._stop_requested = False
        self._nonfinite_in_a_row = self._nonfinite_in_window = 0  # skipped optimizer steps (not checkpointed)
        self._previous_handlers: dict = {}  # SIGTERM / SIGINT handlers to put back when fit() returns

    # ------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        cfg = self.cfg
        self.accelerator = acc = build_accelerator(cfg, self.run_dir)
        setup_logging(acc)
        self.engine = build_engine(acc, cfg.train)  # DDP or FSDP2, from the launch config (facevid/engine.py)
        set_seed(cfg.seed)  # model initialisation is identical on every rank and every run
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            self._remove_partial_checkpoints()
        logger.info("stage %s on %d process(es), engine %s, device %s, mixed precision %s",
                    cfg.stage, acc.num_processes, self.engine.name, acc.device, acc.mixed_precision)

        self._prepare_data()
        self.model = self.stage.build(acc, self.dataset)
        if self.evaluation is not None and acc.is_main_process:
            self.evaluation.prepare(self.dataset, acc.device)
        select_trainable(self.model, cfg)  # train.trainable: freezes the rest (or adds LoRA adapters), logs counts
        compile_model(self.model, cfg.train.compile)  # train.compile: in place, so parameter names stay clean
        trainable = trainable_parameters(self.model)  # the only parameters the optimizer and the EMA see
        self.optimizer = torch.optim.AdamW(
            trainable, lr=cfg.train.learning_rate, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
            weight_decay=cfg.train.weight_decay,
            fused=True,  # one kernel for all parameters: several times faster than the per-tensor loop
        )
        # Accelerate steps a prepared scheduler once per process per optimizer step, hence the factor (also under
        # DeepSpeed: a plain torch scheduler is not handed to its engine).
        self.lr_scheduler = get_scheduler(
            cfg.train.lr_scheduler, self.optimizer,
            num_warmup_steps=cfg.train.lr_warmup_steps * acc.num_processes,
            num_training_steps=cfg.train.max_steps * acc.num_processes,
        )
        self.ema = None
        if cfg.train.ema_decay is not None:
            self.ema = new_ema(trainable, cfg.train.ema_decay)
            self.ema.to(acc.device)
            acc.register_for_checkpointing(self.ema)
        self.model, self.optimizer, self.lr_scheduler = self.engine.prepare(
            self.model, self.optimizer, self.lr_scheduler, self.ema)
        # All training noise (timesteps, Gaussian noise, caption dropout, posterior samples) comes from here.
        self.generator = torch.Generator(device=acc.device).manual_seed(cfg.seed * 1009 + acc.process_index)

    def _prepare_data(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        manifest = Path(cfg.data.manifest)
        records, skipped = read_manifest(manifest)
        self.manifest_skipped = skipped
        self._resolve_playback_fps(records)
        if skipped and acc.is_main_process:
            logger.warning("%d manifest entries skipped:\n  %s", len(skipped), "\n  ".join(map(str, skipped[:20])))
            append_skip_report(self.run_dir / "skipped_clips.jsonl", skipped, kind="manifest")
        if not records:
            raise RuntimeError(f"no usable clip in {manifest} ({len(skipped)} skipped)")
        images = sum(r.is_image for r in records)
        if images and not cfg.data.image_batch_share:
            logger.warning("%d still image(s) in %s are left out: set data.image_batch_share > 0 to train on them "
                           "in image batches", images, manifest)
            records = [r for r in records if not r.is_image]
        logger.info("dataset: %d clips from %s", len(records), manifest)
        self.heldout = None  # clips kept out of training for val/loss (at data.resolution, also with buckets)
        if cfg.train.val_loss_clips:
            if cfg.train.val_loss_clips >= len(records):
                raise ConfigError(f"config key 'train.val_loss_clips' = {cfg.train.val_loss_clips} is invalid: "
                                  f"{manifest} has only {len(records)} usable clips; hold out fewer")
            records, heldout = records[: -cfg.train.val_loss_clips], records[-cfg.train.val_loss_clips:]
            self.heldout = self._dataset(heldout)
            logger.info("val/loss: the manifest's last %d clips are held out of training", len(heldout))
        batch_size, collate = None, collate_clips  # batch_size None: the sampler yields whole batches
        if cfg.data.image_batch_share:
            self.dataset, self.sampler = self._joint_data(records)
            collate = collate_joint
        elif cfg.data.buckets:
            self.dataset, self.sampler = self._bucketed_data(records)
            collate = collate_bucketed
        else:
            self.dataset = self._dataset(records)
            batch_size = cfg.train.batch_size
            self.sampler = ShardedEpochSampler(
                len(self.dataset), cfg.train.batch_size, num_replicas=acc.num_processes,
                rank=acc.process_index, seed=cfg.seed,
            )
        d = cfg.data
        self.loader = training_loader(
            self.dataset, self.sampler, collate, batch_size, num_workers=d.num_workers,
            persistent_workers=d.persistent_workers, prefetch_factor=d.prefetch_factor,
            pin_memory=acc.device.type == "cuda" if d.pin_memory is None else d.pin_memory,
            seed=cfg.seed, worker_init_fn=_ignore_stop_signals_in_worker,
        )

    def _dataset(self, records):
        cfg = self.cfg
        if cfg.data.cache != "none":
            return self._cached_dataset(records)
        # A window longer than every clip would fail at the first batch; rank 0 reads the headers, all ranks fail.
        on_main_process(self.accelerator, lambda: validate_clips(cfg, records))
        return VideoClipDataset(
            records, num_frames=cfg.data.num_frames, frame_stride=cfg.data.frame_stride,
            resolution=cfg.data.resolution, seed=cfg.seed, target_fps=cfg.data.target_fps, flip=cfg.data.flip,
        )

    def _joint_data(self, records):
        """data.image_batch_share: image and video batches (data/sampler.py JointBatchSampler); image batches
        take the still images, or random clip frames when the manifest has none."""
        cfg, acc = self.cfg, self.accelerator
        if cfg.data.cache == "none":
            dataset = JointImageVideoDataset(
                records, num_frames=cfg.data.num_frames, frame_stride=cfg.data.frame_stride,
                resolution=cfg.data.resolution, seed=cfg.seed, target_fps=cfg.data.target_fps, flip=cfg.data.flip,
            )
        else:  # still images are cached as 1-frame windows (facevid/cache_builder.py)
            dataset = self._cached_dataset(records, CachedJointDataset)
        records = dataset.records
        videos = [i for i, r in enumerate(records) if not r.is_image]
        images = [i for i, r in enumerate(records) if r.is_image] or videos
        share = cfg.data.image_batch_share
        if share < 1 and not videos:
            raise ConfigError(f"config key 'data.image_batch_share' = {share} is invalid: {cfg.data.manifest} holds "
                              "still images only, so there is no video batch to make; set it to 1.0")
        sampler = JointBatchSampler(videos, images, cfg.train.batch_size, share, num_replicas=acc.num_processes,
                                    rank=acc.process_index, seed=cfg.seed)
        logger.info("joint image + video training: %d video clip(s), %d image(s)%s, %.0f%% image batches, %d steps "
                    "per epoch", len(videos), len(records) - len(videos),
                    "" if len(records) > len(videos) else " (image batches use clip frames)", 100 * share,
                    sampler.batches_per_epoch)
        return dataset, sampler

    def _bucketed_data(self, records):
        """data.buckets: each clip at the largest bucket it fills; buckets.json says where every clip went."""
        cfg, acc = self.cfg, self.accelerator
        d = cfg.data
        # Rank 0 probes the clips (or reuses the plan this run saved before) and shares the plan.
        plan, reused = on_main_process(acc, lambda: saved_or_new_plan(
            Path(cfg.output_dir) / "buckets.json", records, parse_buckets(list(d.buckets)), d.frame_stride,
            d.target_fps, d.bucket_max_crop))
        dataset, sampler, report = bucketed_training_data(
            records, list(cfg.data.buckets), cfg.train.batch_size, acc.num_processes, acc.process_index, cfg.seed,
            cfg.data.frame_stride, cfg.data.target_fps, cfg.data.bucket_max_crop, cfg.data.flip, plan=plan)
        if reused:
            logger.info("buckets: plan reused from %s (same clips and settings): no clip probed",
                        Path(cfg.output_dir) / "buckets.json")
        if acc.is_main_process:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.output_dir) / "buckets.json").write_text(json.dumps(report, indent=2) + "\n")
            logger.info("buckets: clips per bucket %s, %d steps per epoch", report["clips_per_bucket"],
                        report["steps_per_epoch"])
            if report["unfit"]:
                logger.warning("%d clip(s) fit no bucket and are left out (all listed in buckets.json):\n  %s",
                               report["unfit"], "\n  ".join(f"{u['source']}: {u['reason']}"
                                                           for u in report["unfit_clips"][:20]))
            if report["buckets_smaller_than_global_batch"]:
                logger.warning("buckets with fewer clips than one global batch (%d) never form a batch; their "
                               "%d clip(s) are not trained on: %s", report["global_batch"],
                               report["clips_in_small_buckets"], report["buckets_smaller_than_global_batch"])
        return dataset, sampler

    def _resolve_playback_fps(self, records) -> None:
        """sample.fps null = the fps the model is trained at; config.yaml then records it for sample.py."""
        cfg = self.cfg
        if cfg.sample.fps is not None:
            return
        cfg.sample.fps = training_fps(cfg, records)
        logger.info("videos play at %.4g fps, the rate the model is trained at (sample.fps)", cfg.sample.fps)
        if self.accelerator.is_main_process:
            save_config(cfg, self.run_dir / "config.yaml")

    def _cached_dataset(self, records, dataset_class=CachedClipDataset) -> CachedClipDataset:
        cfg, acc = self.cfg, self.accelerator
        if cfg.data.cache == "auto":
            build_cache(cfg, acc)  # encodes only what is missing; every rank takes a share
        check_cache(cfg)
        encoder, max_length = cfg.text_encoder.pretrained, cfg.text_encoder.max_length
        dataset = dataset_class(records, LatentCache(cfg.data.cache_dir),
                                    partial(text_key, encoder_id=encoder, max_length=max_length),
                                    seed=cfg.seed, flip=cfg.data.flip)
        logger.info("training from the latent cache in %s (%d clips)", cfg.data.cache_dir, len(dataset))
        if dataset.missing and acc.is_main_process:
            logger.warning("%d clip(s) of the manifest are not in the cache and are left out:\n  %s",
                           len(dataset.missing), "\n  ".join(map(str, dataset.missing[:20])))
            append_skip_report(self.run_dir / "skipped_clips.jsonl", dataset.missing, kind="cache")
        return dataset

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        # A checkpoint of NaN weights would be useless, and rotation would delete the last good one for it.
        if self._any_rank(not self._weights_finite()):
            raise self._nonfinite_error("the model's weights are not finite (NaN or inf) at checkpoint time")
        root = self.run_dir / "checkpoints"
        name = f"{CHECKPOINT_PREFIX}{self.state.global_step:08d}"
        final, tmp = root / name, root / f"{PARTIAL_PREFIX}{name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        error = None
        try:
            self.engine.save_state(tmp, self.ema)
            torch.save(self.generator.get_state(), tmp / f"noise_generator_{acc.process_index}.pt")
            if acc.is_main_process:
                (tmp / "trainer_state.json").write_text(json.dumps(asdict(self.state), indent=2))
        except (OSError, RuntimeError) as err:  # RuntimeError: torch's zip writer on a full disk ("unexpected pos")
            error = err
        if self._any_rank(error is not None):  # also the barrier: every rank learns of a failure on any rank
            raise self._checkpoint_write_error(tmp, error) from error
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # atomic: a crash before this line leaves the previous checkpoint intact
            for old in list_checkpoints(self.run_dir)[: -self.cfg.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            logger.info("checkpoint saved: %s", final)
        acc.wait_for_everyone()
        return final

    def _checkpoint_write_error(self, tmp: Path, error: BaseException | None) -> CheckpointWriteError:
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint only takes space from the full disk
        cause = f"{type(error).__name__}: {error}" if error is not None else "it failed on another rank"
        previous = list_checkpoints(self.run_dir)
        kept = (f"the previous checkpoint {previous[-1].name} is intact" if previous
                else "there is no earlier checkpoint")
        return CheckpointWriteError(f"checkpoint at step {self.state.global_step} could not be written to "
                                    f"{tmp.parent}: disk full? ({cause}) — {kept}")

    def _remove_partial_checkpoints(self) -> None:
        """A save interrupted by kill -9 or a crash leaves a .tmp- folder that nothing would ever remove."""
        root = self.run_dir / "checkpoints"
        for leftover in sorted(root.glob(f"{PARTIAL_PREFIX}*")) if root.is_dir() else []:
            shutil.rmtree(leftover, ignore_errors=True)
            logger.warning("removed a partial checkpoint left by an interrupted save: %s", leftover)

    def _resolve_resume(self) -> Path | None:
        if self.cfg.resume is None:
            return None
        if self.cfg.resume == "latest":
            found = list_checkpoints(self.run_dir)
            if not found:
                logger.info("resume=latest: no checkpoint in %s yet, starting fresh", self.run_dir)
                return None
            return found[-1]
        return Path(self.cfg.resume)

    def _load_checkpoint(self, path: Path) -> None:
        acc = self.accelerator
        logger.info("resuming from %s", path)
        self.engine.load_state(path, self.ema)
        saved = json.loads((path / "trainer_state.json").read_text())
        self.state = TrainerState(**saved)
        if acc.is_main_process:
            self._drop_rows_after(self.state.global_step)
        generator_file = path / f"noise_generator_{acc.process_index}.pt"
        if self.state.world_size == acc.num_processes and generator_file.is_file():
            self.generator.set_state(torch.load(generator_file, weights_only=True))
        else:
            logger.warning("checkpoint was written by %d process(es), now %d: training noise is re-seeded "
                           "(the run continues, but not bit-identically)", self.state.world_size, acc.num_processes)
            self.generator.manual_seed(self.cfg.seed * 1009 + acc.process_index + self.state.global_step)
            self.state.world_size = acc.num_processes

    def _drop_rows_after(self, step: int) -> None:
        """Rows logged after the checkpoint (by a run killed before its next one) are logged again by the
        resumed run: drop them, so every step appears once in metrics.jsonl and skipped_clips.jsonl."""
        for name in ("metrics.jsonl", "skipped_clips.jsonl"):
            path = self.run_dir / name
            if not path.is_file():
                continue
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [line for line in lines if _row_step(line) <= step]
            if len(kept) < len(lines):
                rewritten = path.with_name(f"{PARTIAL_PREFIX}{name}")
                rewritten.write_text("".join(kept), encoding="utf-8")
                os.replace(rewritten, path)  # a kill now leaves the old file, never half of it
                logger.info("%s: dropped %d row(s) logged after step %d", name, len(lines) - len(kept), step)

    # ------------------------------------------------------- non-finite values
    def _any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any: ranks must take the same branch around collectives."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return flag
        return acc.reduce(torch.tensor(float(flag), device=acc.device), "sum").item() > 0

    @torch.no_grad()
    def _weights_finite(self) -> bool:
        """This rank's weights (its shards, under a sharding engine) hold no NaN/inf."""
        params = [_local(p) for p in self.accelerator.unwrap_model(self.model).parameters()]
        return bool(torch.stack([p.isfinite().all() for p in params]).all())

    def _step_finite(self, grad_norm, losses_finite: torch.Tensor) -> bool:
        """Whether this optimizer step's loss and gradients are finite. Checked once per optimizer step, not
        per micro-step: the one host sync reads a scalar the clipping computed anyway, while the skip decision
        must be made before the optimizer touches the weights."""
        if grad_norm is not None and self.accelerator.scaler is None:
            # The norm of the all-reduced gradients: NaN if any rank's loss was, and the same on every rank.
            return bool(torch.isfinite(torch.as_tensor(_local(grad_norm))))  # DeepSpeed returns a float
        # fp16 (its GradScaler skips overflowing steps by itself and lowers the scale: not an error), or an
        # engine that clips internally: judge the loss, agreed across ranks.
        return not self._any_rank(not bool(losses_finite))

    def _count_nonfinite_step(self, step_finite: bool) -> None:
        """After each optimizer step: a skipped (non-finite) step is counted and reported; one more in a row
        than train.max_nonfinite_steps stops the run."""
        limit = self.cfg.train.max_nonfinite_steps
        self._nonfinite_in_a_row = 0 if step_finite else self._nonfinite_in_a_row + 1
        if step_finite:
            return
        self._nonfinite_in_window += 1
        step = self.state.global_step + 1
        if self._nonfinite_in_a_row > limit:
            raise self._nonfinite_error(f"the loss or its gradients are not finite (NaN or inf) for "
                                        f"{self._nonfinite_in_a_row} optimizer step(s) in a row "
                                        f"(train.max_nonfinite_steps={limit})", step=step)
        logger.warning("step %d: non-finite loss or gradients, step skipped (%d in a row, at most %d)",
                       step, self._nonfinite_in_a_row, limit)

    def _nonfinite_error(self, what: str, step: int | None = None) -> NonFiniteLossError:
        t = self.cfg.train
        found = list_checkpoints(self.run_dir)
        where = (f"The last good checkpoint is {found[-1]}: resume from it with resume=latest and a lower "
                 f"train.learning_rate (now {t.learning_rate:g})" if found
                 else f"No checkpoint was written yet: start again with a lower train.learning_rate (now "
                      f"{t.learning_rate:g})")
        return NonFiniteLossError(
            f"step {self.state.global_step if step is None else step}: {what}; stopped without saving. {where}. "
            f"A rare bad batch can instead be skipped with train.max_nonfinite_steps (now {t.max_nonfinite_steps})")

    # --------------------------------------------------------------- trackers
    def _init_trackers(self) -> None:
        acc, cfg = self.accelerator, self.cfg
        if cfg.train.tracker == "none":
            return
        init_kwargs = {}
        if cfg.train.tracker == "wandb":
            import wandb

            # Offline unless the user is logged in; its files go inside the run directory.
            os.environ.setdefault("WANDB_DIR", str(self.run_dir.resolve()))
            if not os.environ.get("WANDB_API_KEY") and not wandb.api.api_key:
                os.environ.setdefault("WANDB_MODE", "offline")
            if self.state.tracker_run_id is None:
                # wandb's own id helper moved between releases; any 8 lowercase hex characters are a valid run id.
                self.state.tracker_run_id = secrets.token_hex(4)
            init_kwargs["wandb"] = {"id": self.state.tracker_run_id, "resume": "allow",
                                    "name": self.run_dir.name, "dir": str(self.run_dir.resolve())}
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                for k, v in _flatten(OmegaConf.to_container(OmegaConf.structured(cfg))).items()}
        project = cfg.train.wandb_project if cfg.train.tracker == "wandb" else "tb"
        acc.init_trackers(project, config=flat, init_kwargs=init_kwargs)

    def log_media(self, media: dict[str, list[Path]], step: int) -> None:
        """Log validation videos (mp4) and contact sheets (png) to the active tracker."""
        acc = self.accelerator
        if self.cfg.train.tracker == "wandb":
            import wandb

            payload = {}
            for key, paths in media.items():
                payload[key] = [wandb.Video(str(p)) if p.suffix == ".mp4" else wandb.Image(str(p)) for p in paths]
            acc.get_tracker("wandb", unwrap=True).log(payload, step=step)
        elif self.cfg.train.tracker == "tensorboard":
            import numpy as np
            from PIL import Image

            writer = acc.get_tracker("tensorboard", unwrap=True)
            for key, paths in media.items():
                for i, p in enumerate(pp for pp in paths if pp.suffix == ".png"):
                    writer.add_image(f"{key}/{i}", np.asarray(Image.open(p).convert("RGB")), step,
                                     dataformats="HWC")

    # ------------------------------------------------------------------- loop
    def _request_stop(self, signum, _frame) -> None:
        logger.warning("received %s: saving a checkpoint after this step, then exiting",
                       signal.Signals(signum).name)
        self._stop_requested = True

    def _validate(self, samples: bool = True, evaluate: bool = False) -> None:
        """With the EMA weights: val/loss, validation samples (stage.validate), the evaluation callback.

        Every rank takes part where the stage allows it (val/loss always; the t2v stage's samples, split across
        ranks), each with its own weights or shards; what runs on rank 0 alone gets a full model from the engine.
        """
        acc = self.accelerator
        step = self.state.global_step
        out_dir = self.run_dir / "samples" / f"step-{step:08d}"
        shared_samples = samples and getattr(self.stage, "distributed_validation", False)
        with self.engine.ema_weights(acc.unwrap_model(self.model), self.ema) as model:
            metrics = self._validation_loss(model)
            media, sample_metrics = self.stage.validate(model, out_dir, step) if shared_samples else ({}, {})
            metrics.update(sample_metrics)
        if (samples and not shared_samples) or evaluate:
            full_model, ema = self.engine.consolidated(self.model, self.ema)  # every rank; rank 0 gets it
            if acc.is_main_process:
                with DataParallelEngine.ema_weights(full_model, ema) as model:  # a plain model
                    if samples and not shared_samples:
                        media, sample_metrics = self.stage.validate(model, out_dir, step)
                        metrics.update(sample_metrics)
                    if evaluate:
                        metrics.update(self.evaluation(self.stage, model, step))
        if acc.is_main_process:
            if metrics:
                acc.log(metrics, step=step)
                self._write_metrics({"step": step, **metrics})
            self.log_media(media, step)
            if samples:
                logger.info("validation samples written to %s %s", out_dir, metrics or "")
            plot_training_curves(self.run_dir)  # RUN/plots/training_curves.png: loss, lr, metrics so far
        patient_barrier(acc)  # rank 0 may have evaluated alone for a long time

    @torch.no_grad()
    def _validation_loss(self, model) -> dict[str, float]:
        """Mean loss on the held-out clips with the same timesteps and noise at every validation (each batch
        seeds its own generator), so its changes are the model's. Batches are split across ranks."""
        if self.heldout is None:
            return {}
        acc, batch_size = self.accelerator, self.cfg.train.batch_size
        self.heldout.set_epoch(0)  # the same frame windows every time
        batches = [range(i, min(i + batch_size, len(self.heldout))) for i in range(0, len(self.heldout), batch_size)]
        mine, real = rank_share(len(batches), acc)
        totals = torch.zeros(2, device=acc.device, dtype=torch.float64)  # loss * clips, clips
        for k, b in enumerate(mine):
            batch = collate_clips([self.heldout[i] for i in batches[b]])
            generator = torch.Generator(device=acc.device).manual_seed(self.cfg.seed * 7919 + b)
            with acc.autocast():
                loss, _ = self.stage.compute_loss(model, batch, generator)
            if k < real:  # padding batches only keep the ranks' forwards in step
                totals += torch.tensor([loss.item() * len(batches[b]), len(batches[b])], device=acc.device,
                                       dtype=torch.float64)
        totals = acc.reduce(totals, "sum")
        return {"val/loss": float(totals[0] / totals[1])}

    @torch.no_grad()
    def _check_replicas_agree(self) -> None:
        """Data-parallel ranks must hold identical weights after every optimizer step."""
        acc = self.accelerator
        if not self.engine.replicated:
            logger.info("step %d: replica check skipped: %s shards the weights (ranks differ by design)",
                        self.state.global_step, self.engine.name)
            return
        checksum = weights_checksum(acc.unwrap_model(self.model).parameters()).to(acc.device)
        every_rank = acc.gather(checksum[None]).cpu()
        if not torch.equal(every_rank, every_rank[:1].expand_as(every_rank)):
            raise RuntimeError(f"step {self.state.global_step}: ranks' weights differ (checksums {every_rank.tolist()})")
        logger.info("step %d: weights identical on all %d rank(s)", self.state.global_step, acc.num_processes)

    def _write_metrics(self, row: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    def _report_skipped(self, skipped: list[SkippedItem]) -> None:
        """End of epoch: gather every rank's skipped clips, report each file once, keep a log."""
        everything = gather_object([(s.source, s.reason) for s in skipped])
        if not self.accelerator.is_main_process or not everything:
            return
        unique = dict(everything)
        self.state.skipped_clips += len(unique)
        with open(self.run_dir / "skipped_clips.jsonl", "a", encoding="utf-8") as handle:
            for source, reason in unique.items():
                handle.write(json.dumps({"step": self.state.global_step, "epoch": self.state.epoch, "video": source,
                                         "reason": reason}) + "\n")
        lines = "\n  ".join(f"{s}: {r}" for s, r in list(unique.items())[:20])
        logger.warning("epoch %d: %d clip(s) skipped (unreadable, corrupt or too short):\n  %s%s",
                       self.state.epoch, len(unique), lines, "\n  ..." if len(unique) > 20 else "")

    def fit(self) -> Path:
        """Train to train.max_steps (or until stopped); returns the run directory."""
        try:
            return self._fit()
        finally:  # also after an error (NaN loss, full disk): Ctrl-C must work again in the caller
            for sig, handler in self._previous_handlers.items():
                signal.signal(sig, handler)
            # Persistent workers would otherwise live as long as this Trainer object (torch's own clean-up).
            workers = getattr(getattr(self, "loader", None), "_iterator", None)
            if workers is not None:
                workers._shutdown_workers()

    def _fit(self) -> Path:
        self._setup()
        acc, cfg = self.accelerator, self.cfg
        resume_from = self._resolve_resume()
        if resume_from is not None:
            self._load_checkpoint(resume_from)
        self.state.world_size = acc.num_processes
        self._init_trackers()
        self._previous_handlers = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}

        max_steps = cfg.train.max_steps
        progress = tqdm(total=max_steps, initial=self.state.global_step, desc=f"train {cfg.stage}",
                        disable=not acc.is_main_process, dynamic_ncols=True)
        self.model.train()
        # running_loss = (sum, count) of the window's finite micro-batch losses, kept on the device: reading a
        # loss every micro-step would make the host wait for the device each time.
        running_loss, running_count, window_start = torch.zeros(2, device=acc.device), 0, time.time()
        fit_start = window_start
        window_finite = None  # whether every micro-batch loss since the last optimizer step was finite (device)
        stopped_early = False
        while self.state.global_step < max_steps and not stopped_early:
            self.sampler.set_epoch(self.state.epoch, start_batch=self.state.batches_in_epoch)
            self.dataset.set_epoch(self.state.epoch)
            epoch_skipped: list[SkippedItem] = []
            for batch in self.loader:
                self.state.batches_in_epoch += 1
                epoch_skipped.extend(batch["skipped"])
                with acc.accumulate(self.model):
                    with acc.autocast():
                        loss, extra_logs = self.stage.compute_loss(self.model, batch, self.generator)
                    acc.backward(loss)
                    loss_finite = torch.isfinite(loss.detach())
                    window_finite = loss_finite if window_finite is None else window_finite & loss_finite
                    step_finite = True
                    if acc.sync_gradients:
                        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.train.max_grad_norm)
                        step_finite = self._step_finite(grad_norm, window_finite)
                    # A non-finite step is never applied. Under fp16 the GradScaler skips it by itself, and must
                    # see it (to lower its scale and reset its per-step state).
                    if step_finite or acc.scaler is not None:
                        self.optimizer.step()
                    if acc.sync_gradients:
                        self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                running_loss += torch.stack([torch.where(loss_finite, loss.detach().float(), 0.0),
                                             loss_finite.float()])
                running_count += 1
                if not acc.sync_gradients:
                    continue

                window_finite = None
                self._count_nonfinite_step(step_finite)  # raises past train.max_nonfinite_steps in a row
                self.state.global_step += 1
                step = self.state.global_step
                if self.ema is not None and step_finite:
                    self.ema.step(trainable_parameters(acc.unwrap_model(self.model)))
                progress.update(1)
                if step % cfg.train.log_every == 0 or step == max_steps:
                    mean_loss = acc.reduce(running_loss[0] / running_loss[1], "mean").item()  # NaN if none finite
                    rate = running_count / max(time.time() - window_start, 1e-9)
                    logs = {"loss": mean_loss, "lr": self.lr_scheduler.get_last_lr()[0],
                            **{k: float(v) for k, v in extra_logs.items()}}
                    if self._nonfinite_in_window:
                        logs["nonfinite_steps"] = self._nonfinite_in_window
                    progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{logs['lr']:.2e}", it_s=f"{rate:.2f}")
                    acc.log(logs, step=step)
                    if acc.is_main_process:
                        self._write_metrics({"step": step, "epoch": self.state.epoch,
                                             "elapsed_s": round(time.time() - fit_start, 3), **logs})
                    running_loss, running_count, window_start = torch.zeros(2, device=acc.device), 0, time.time()
                    self._nonfinite_in_window = 0

                if cfg.train.replica_check_every and step % cfg.train.replica_check_every == 0:
                    self._check_replicas_agree()
                if self._stop_requested:
                    acc.set_trigger()
                stop_now = acc.check_trigger()
                if step % cfg.train.checkpoint_every == 0 or step == max_steps or stop_now:
                    self.save_checkpoint()
                validate_now = bool(cfg.train.validate_every) and step % cfg.train.validate_every == 0
                evaluate_now = bool(cfg.eval.every) and step % cfg.eval.every == 0
                if (validate_now or evaluate_now) and step < max_steps:
                    self._validate(samples=validate_now, evaluate=evaluate_now)
                if stop_now:
                    logger.warning("stopped at step %d on request; resume with resume=latest", step)
                    stopped_early = True
                    break
                if step >= max_steps:
                    break
            else:  # the epoch ran to its end
                self._report_skipped(epoch_skipped)
                self.state.epoch += 1
                self.state.batches_in_epoch = 0
                continue
            self._report_skipped(epoch_skipped)
        progress.close()

        if not stopped_early:
            self._validate(samples=True, evaluate=bool(cfg.eval.every))
            model, ema = self.engine.consolidated(self.model, self.ema)
            if acc.is_main_process:
                self.stage.save_final(model, ema, self.run_dir)
        acc.wait_for_everyone()
        acc.end_training()
        return self.run_dir


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
