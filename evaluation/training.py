"""Evaluation during training (eval.every): the callback train.py hands to the Trainer, so that the training
code (facevid/) never imports evaluation.

    Trainer(cfg, stage, evaluation=TrainingEvaluation(cfg) if cfg.eval.every else None)
"""

from __future__ import annotations

import logging
from pathlib import Path

from evaluation.prompts import heldout_prompts, prompts_from_file
from evaluation.runner import evaluate_run, flat_metrics, load_extractors
from facevid.schema import ConfigError, RunConfig

logger = logging.getLogger("facevid")


class TrainingEvaluation:
    """eval.metrics on fixed prompts (eval.prompts_file, or eval.synth_heldout held-out FaceVid-Synth prompts
    against the training clips), with the weights the trainer hands it (the EMA weights)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def prepare(self, dataset, device) -> None:
        """Prompts and feature networks, loaded once before step 1, so that a missing weight file or an unusable
        prompt set fails now rather than at the first evaluation."""
        e = self.cfg.eval
        self.device = str(device)
        if e.prompts_file:
            self.prompts, self.eval_set = prompts_from_file(e.prompts_file), Path(e.prompts_file).stem
        else:
            try:
                self.prompts = heldout_prompts(e.synth_heldout, [r.attributes for r in dataset.records],
                                               e.heldout_seed)
            except ValueError as err:
                raise ConfigError(f"config key 'eval.synth_heldout' = {e.synth_heldout} is unusable with "
                                  f"{self.cfg.data.manifest}: {err}; give eval.prompts_file instead") from None
            self.eval_set = f"FaceVid-Synth held-out ({len(self.prompts)})"
        self.extractors = load_extractors(e, device=self.device)

    def __call__(self, stage, model, step: int) -> dict[str, float]:
        """Writes RUN/eval/<set>-step-N/ and returns the headline numbers for the tracker."""
        pipe = stage.pipeline(model)
        pipe.run_config = self.cfg
        result = evaluate_run(self.cfg.output_dir, pipeline=pipe, prompts=self.prompts, config=self.cfg.eval,
                              extractors=self.extractors, step=step, eval_set=self.eval_set, device=self.device,
                              model_name=f"{Path(self.cfg.output_dir).name} (step {step})")
        logger.info("evaluation at step %d written to %s", step, Path(result["files"]["metrics_json"]).parent)
        return flat_metrics(result)
