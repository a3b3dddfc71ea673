"""``hf-batchsched finetune --config recipe.yaml [--key value ...]``: the bundled recipe in one process.

The same steps as ``recipes/finetune.py`` (``hf_batchsched.recipe.finetune``); use ``accelerate launch`` on that
script for several GPUs.
"""

from __future__ import annotations

import argparse

__all__ = ["HELP", "add_arguments", "run"]

HELP = "Fine-tune a causal LM from a recipe config (one process; see recipes/ for accelerate launch)."


# Unknown arguments are config overrides (``--learning_rate 1e-4``); the dispatcher passes them as ``args.extra``.
PASSES_UNKNOWN_ARGS = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="recipe YAML, e.g. recipes/configs/demo_cpu.yaml")
    parser.epilog = EPILOG
    parser.epilog_factory = _epilog_with_keys  # the key list imports transformers: built only for --help


EPILOG = (
    "Any other --key value overrides that config key, e.g. --learning_rate 1e-4 --max_steps 10 (keys in full, no "
    "abbreviations). --resume_from_checkpoint true resumes from the newest complete checkpoint in output_dir (or give "
    "a checkpoint path); --allow_schedule_change_on_resume true lets it continue with a changed batch plan. "
    "--couple lr=sqrt,wd,betas makes the LR, AdamW weight decay and Adam betas follow the batch size."
)


def _epilog_with_keys() -> str:
    from ..recipe import config_keys

    groups = "; ".join(f"{group}: {', '.join(keys)}" for group, keys in config_keys().items())
    return f"{EPILOG} Config keys: {groups}."


def run(args: argparse.Namespace) -> int:
    from ..recipe import finetune, parse_args

    finetune(parse_args(["--config", args.config, *getattr(args, "extra", [])]))
    return 0
