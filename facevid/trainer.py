"""The training loop, shared by every stage: optimizer, EMA, accumulation, the step, validation, stopping.

What is trained and how its loss is computed lives in a `Stage` (facevid/stages/); around the loop, each
concern has its module: the engine and accelerator (facevid/engine.py), the data (facevid/training_data.py),
checkpoints (facevid/checkpoints.py), NaN/inf and replica checks (facevid/health.py), logs and trackers
(facevid/run_log.py). So the VAE stage and the text-to-video stage checkpoint, resume and log alike.

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

import logging
import signal
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from data.dataset import collate_clips
from data.manifest import SkippedItem
from facevid.checkpoints import (
    Checkpointer,
    TrainerState,
    remove_partial_checkpoints,
    resolve_resume,
)
from facevid.compile import compile_model
from facevid.config import save_config
from facevid.curves import plot_training_curves
from facevid.ema import new_ema, trainable_parameters
from facevid.engine import (
    DataParallelEngine,
    any_rank,
    build_accelerator,
    build_engine,
    patient_barrier,
    rank_share,
)
from facevid.health import (
    NonFiniteSteps,
    check_replicas_agree,
    step_finite,
    weights_finite,
)
from facevid.run_log import (
    drop_rows_after,
    init_trackers,
    log_media,
    report_skipped,
    setup_logging,
    write_metrics,
)
from facevid.schema import RunConfig
from facevid.trainable import select_trainable
from facevid.training_data import build_training_data

logger = logging.getLogger("facevid")

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
        self.nonfinite = NonFiniteSteps(self.run_dir, cfg.train)  # skipped optimizer steps (not checkpointed)
        self._previous_handlers: dict = {}  # SIGTERM / SIGINT handlers to put back when fit() returns

    # ------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        cfg = self.cfg
        self.accelerator = acc = build_accelerator(cfg, self.run_dir)
        setup_logging(acc)
        self.engine = build_engine(acc, cfg.train)  # DDP, FSDP2 or ZeRO, from the launch config
        set_seed(cfg.seed)  # model initialisation is identical on every rank and every run
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            remove_partial_checkpoints(self.run_dir)
        logger.info("stage %s on %d process(es), engine %s, device %s, mixed precision %s",
                    cfg.stage, acc.num_processes, self.engine.name, acc.device, acc.mixed_precision)

        data = build_training_data(cfg, acc, self.run_dir)
        self.dataset, self.sampler, self.loader, self.heldout = data.dataset, data.sampler, data.loader, data.heldout
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
        self.checkpointer = Checkpointer(self.run_dir, acc, self.engine, cfg.train.keep_checkpoints)

    def save_checkpoint(self) -> Path:
        # A checkpoint of NaN weights would be useless, and rotation would delete the last good one for it.
        if any_rank(self.accelerator, not weights_finite(self.accelerator.unwrap_model(self.model))):
            raise self.nonfinite.error("the model's weights are not finite (NaN or inf) at checkpoint time",
                                       self.state.global_step)
        return self.checkpointer.save(self.state, self.ema, self.generator)

    def _resume(self) -> None:
        path = resolve_resume(self.cfg.resume, self.run_dir)
        if path is None:
            return
        self.state = self.checkpointer.load(path, self.ema, self.generator, self.cfg.seed)
        if self.accelerator.is_main_process:
            drop_rows_after(self.run_dir, self.state.global_step)

    # -------------------------------------------------------------- validation
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
                write_metrics(self.run_dir, {"step": step, **metrics})
            log_media(acc, self.cfg.train.tracker, media, step)
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

    # ------------------------------------------------------------------- loop
    def _request_stop(self, signum, _frame) -> None:
        logger.warning("received %s: saving a checkpoint after this step, then exiting",
                       signal.Signals(signum).name)
        self._stop_requested = True

    def _end_epoch(self, skipped: list[SkippedItem]) -> None:
        self.state.skipped_clips += report_skipped(self.accelerator, self.run_dir, skipped, self.state.global_step,
                                                   self.state.epoch)

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
        self._resume()
        self.state.world_size = acc.num_processes
        self.state.tracker_run_id = init_trackers(acc, cfg, self.run_dir, self.state.tracker_run_id)
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
                    finite = True
                    if acc.sync_gradients:
                        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.train.max_grad_norm)
                        finite = step_finite(acc, grad_norm, window_finite)
                    # A non-finite step is never applied. Under fp16 the GradScaler skips it by itself, and must
                    # see it (to lower its scale and reset its per-step state).
                    if finite or acc.scaler is not None:
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
                self.nonfinite.count(finite, self.state.global_step + 1)  # raises past max_nonfinite_steps in a row
                self.state.global_step += 1
                step = self.state.global_step
                if self.ema is not None and finite:
                    self.ema.step(trainable_parameters(acc.unwrap_model(self.model)))
                progress.update(1)
                if step % cfg.train.log_every == 0 or step == max_steps:
                    mean_loss = acc.reduce(running_loss[0] / running_loss[1], "mean").item()  # NaN if none finite
                    rate = running_count / max(time.time() - window_start, 1e-9)
                    logs = {"loss": mean_loss, "lr": self.lr_scheduler.get_last_lr()[0],
                            **{k: float(v) for k, v in extra_logs.items()}}
                    if self.nonfinite.in_window:
                        logs["nonfinite_steps"] = self.nonfinite.in_window
                    progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{logs['lr']:.2e}", it_s=f"{rate:.2f}")
                    acc.log(logs, step=step)
                    if acc.is_main_process:
                        write_metrics(self.run_dir, {"step": step, "epoch": self.state.epoch,
                                             "elapsed_s": round(time.time() - fit_start, 3), **logs})
                    running_loss, running_count, window_start = torch.zeros(2, device=acc.device), 0, time.time()
                    self.nonfinite.in_window = 0

                if cfg.train.replica_check_every and step % cfg.train.replica_check_every == 0:
                    check_replicas_agree(acc, self.engine, acc.unwrap_model(self.model), step)
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
                self._end_epoch(epoch_skipped)
                self.state.epoch += 1
                self.state.batches_in_epoch = 0
                continue
            self._end_epoch(epoch_skipped)
        progress.close()

        if not stopped_early:
            self._validate(samples=True, evaluate=bool(cfg.eval.every))
            model, ema = self.engine.consolidated(self.model, self.ema)
            if acc.is_main_process:
                self.stage.save_final(model, ema, self.run_dir)
        acc.wait_for_everyone()
        acc.end_training()
        return self.run_dir
