"""What evaluate.py does once its arguments are parsed: pick the prompt set, evaluate, plot, print."""

from __future__ import annotations

from pathlib import Path

from evaluation.prompts import prompts_from_file, prompts_from_manifest
from evaluation.report import results_table
from evaluation.runner import evaluate_run, load_extractors
from facevid.curves import plot_training_curves
from facevid.schema import EvaluationConfig


def run_cli(args, config: EvaluationConfig, device: str) -> int:
    from facevid.pipeline import FaceVidPipeline

    extractors = load_extractors(config, device=device)  # a missing weight file fails before any generation
    pipeline = FaceVidPipeline.from_run(args.run, use_ema=not args.no_ema, device=device)
    if args.dataset:
        prompts = prompts_from_manifest(args.dataset, args.limit)
        eval_set = f"{Path(args.dataset).parent.name or Path(args.dataset).stem} ({len(prompts)})"
    elif args.prompts:
        prompts = prompts_from_file(args.prompts)
        eval_set = f"{Path(args.prompts).stem} ({len(prompts)})"
    else:  # held-out FaceVid-Synth prompts, built by evaluate_run
        prompts, eval_set = None, None
    print(f"evaluating {args.run} ({pipeline.weights}): {', '.join(config.metrics)}")
    result = evaluate_run(args.run, pipeline=pipeline, prompts=prompts, config=config, extractors=extractors,
                          out_dir=args.out, eval_set=eval_set, device=device)
    curves = plot_training_curves(args.run)
    print(results_table([result]))
    for name, path in {**result["files"], **({"training_curves": str(curves)} if curves else {})}.items():
        print(f"  {name}: {path}")
    return 0
