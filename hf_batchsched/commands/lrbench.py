"""``hf-batchsched lrbench``: compare LR policies as short fine-tunes (see ``hf_batchsched.bench.lrbench``)."""

from __future__ import annotations

import argparse
import os

__all__ = ["HELP", "add_arguments", "run"]

HELP = "Benchmark LR policies as short fine-tunes of one task or recipe; writes a ranked table and LR/loss plots."

EXAMPLE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "lrbench.yaml")
# The same comparison on a recipe's fine-tune (recipes/configs/demo_cpu.yaml: small Llama + LoRA + batch ramp).
EXAMPLE_RECIPE_CONFIG = os.path.join(os.path.dirname(EXAMPLE_CONFIG), "lrbench_recipe.yaml")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=EXAMPLE_CONFIG,
        help="YAML config (task or recipe, training, candidates, rank_by); default: the tiny synthetic example",
    )
    parser.add_argument("--output-dir", default="outputs/lrbench", help="where results.* and the plots go")
    parser.add_argument("--rank-by", default=None, help="override the config's rank_by (metric, utility, expression)")
    parser.add_argument("--halving", action="store_true", help="successive halving (overrides the config)")
    parser.add_argument("--max-steps", type=int, default=None, help="override training.max_steps (first-round budget)")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    import yaml
    from transformers.utils import logging as hf_logging

    from ..bench.lrbench import run_lrbench
    from ..errors import ConfigError

    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()  # a recipe task tokenises its data once per run: no bars in the output
    if not os.path.isfile(args.config):
        raise FileNotFoundError(f"config file {args.config!r} does not exist")
    with open(args.config) as file:
        config = yaml.safe_load(file) or {}
    if not isinstance(config, dict):
        raise ConfigError(f"{args.config} must hold a YAML mapping")
    if args.rank_by is not None:
        config["rank_by"] = args.rank_by
    if args.halving:
        config["halving"] = True
    if args.max_steps is not None:
        config.setdefault("training", {})["max_steps"] = args.max_steps
    outcome = run_lrbench(config, args.output_dir, config_dir=os.path.dirname(os.path.abspath(args.config)))
    with open(outcome["files"]["results.md"]) as file:
        print(file.read())
    print("wrote " + ", ".join(sorted(outcome["files"].values())))
    return 0
