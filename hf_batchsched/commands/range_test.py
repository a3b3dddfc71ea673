"""``hf-batchsched range-test``: LR range test on the embedded tiny setup or a config's task."""

from __future__ import annotations

import argparse
import json
import os

__all__ = ["HELP", "add_arguments", "run"]

HELP = "LR range test (loss vs exponentially growing LR) with a suggested LR and a plot; model restored after."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default=None, help="lrbench-style YAML (its task and training sections); default: tiny setup"
    )
    parser.add_argument("--output-dir", default="outputs/range_test", help="where range_test.png/.json go")
    parser.add_argument("--start-lr", type=float, default=1e-6, help="LR of the first step")
    parser.add_argument("--end-lr", type=float, default=1.0, help="LR of the last step")
    parser.add_argument("--num-steps", type=int, default=60, help="optimizer updates")
    parser.add_argument("--mode", default="exp", help="exp (geometric) or linear LR growth")
    parser.add_argument("--rule", default="steepest", help="suggestion rule: steepest or minimum")
    parser.add_argument("--safety-factor", type=float, default=10.0, help="the rule's LR is divided by this")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import TrainingArguments
    from transformers.utils import logging as hf_logging

    from ..bench.lrbench_config import DEFAULT_CONFIG, load_lrbench_config
    from ..bench.lrbench_tasks import build_task_data
    from ..bench.range_test import lr_range_test
    from ..trainer import BatchRampTrainer

    hf_logging.set_verbosity_error()
    if args.config is None:
        config = load_lrbench_config({**DEFAULT_CONFIG, "candidates": [{"policy": {"name": "constant"}}]})
    else:
        import yaml

        if not os.path.isfile(args.config):
            raise FileNotFoundError(f"config file {args.config!r} does not exist")
        with open(args.config) as file:
            raw = yaml.safe_load(file) or {}
        raw.setdefault("candidates", [{"policy": {"name": "constant"}}])
        config = load_lrbench_config(raw)
    make_model, train_dataset, _ = build_task_data(config["task"], int(config["seed"]))
    training = {k: v for k, v in config["training"].items() if k != "max_steps"}
    trainer = BatchRampTrainer(
        model=make_model(),
        args=TrainingArguments(
            output_dir=args.output_dir, report_to="none", save_strategy="no", seed=int(config["seed"]), **training
        ),
        train_dataset=train_dataset,
    )
    result = lr_range_test(
        trainer,
        start_lr=args.start_lr,
        end_lr=args.end_lr,
        num_steps=args.num_steps,
        mode=args.mode,
        suggestion_rule=args.rule,
        safety_factor=args.safety_factor,
    )
    os.makedirs(args.output_dir, exist_ok=True)
    plot = result.plot(os.path.join(args.output_dir, "range_test.png"))
    with open(os.path.join(args.output_dir, "range_test.json"), "w") as file:
        json.dump(result.to_dict(), file, indent=2)
    stopped = f", diverged at step {result.diverged_at}" if result.diverged_at is not None else ""
    suggestion = f"{result.suggestion:.3g}" if result.suggestion is not None else "none (too few points)"
    print(f"LR range test: {len(result.lrs)} steps from {result.lrs[0]:.3g} to {result.lrs[-1]:.3g}{stopped}")
    print(f"suggested LR ({result.rule} / {result.safety_factor:g}): {suggestion}")
    print(f"wrote {plot}")
    return 0
