"""The bundled fine-tuning recipe's package (``recipes/finetune.py`` and ``hf-batchsched finetune``).

Files by role: ``config`` (the dataclasses), ``parsing`` (YAML, dict and command line through
``HfArgumentParser``), ``validation`` (checks that need no model), and the builders ``model``, ``data`` and
``train`` (trainer, resume, ``finetune``).

A recipe run is described by one flat config: a YAML file (``--config path.yaml``) whose top-level keys are the
fields of the dataclasses below plus any ``transformers.TrainingArguments`` field, with command-line overrides
(``--learning_rate 1e-4``) on top. Four keys hold nested sections:

- ``batch_schedule`` (dict, name or int) and ``max_micro_batch_size``: the batch ramp (``BatchRampTrainer``);
- ``lr_policy`` (dict or name): an LR policy on the training clock (``hf_batchsched.schedules.lr``);
- one key per callback of this package (``sharpness``, ``stability``, ``bn_recalibration``, ``freeze_bn``,
  ``plateau``, ``spike_guard``, ``lr_monitor``, ``noise_scale``; see ``CallbackArguments``): present (a dict of
  the callback's arguments, ``{}`` for its defaults) turns
  the callback on. On the command line a section is a JSON string (``--sharpness '{"every_n_steps": 50}'``).

Unknown keys, values of the wrong type and bad section contents raise ``ConfigError`` naming the key.

Example:

>>> args = parse_config({"peft": "lora", "learning_rate": "2e-4", "max_steps": 2, "report_to": "none"})
>>> args.peft.peft, args.training.learning_rate, args.training.max_steps
('lora', 0.0002, 2)
>>> parse_config({"lerning_rate": 1e-4})
Traceback (most recent call last):
...
hf_batchsched.errors.ConfigError: unknown config key 'lerning_rate' (did you mean 'learning_rate'?)
"""

from .config import (
    CALLBACK_SECTIONS,
    BatchSchedArguments,
    CallbackArguments,
    DataArguments,
    ModelArguments,
    PeftArguments,
    RecipeArguments,
    config_keys,
)
from .data import load_data, pad_collator
from .model import load_model_and_tokenizer
from .parsing import load_config_file, parse_args, parse_config
from .train import (
    build_callbacks,
    build_trainer,
    check_before_start,
    finetune,
    remove_if_left_empty,
    resume_checkpoint,
    seed,
)
from .validation import validate

__all__ = [
    "CALLBACK_SECTIONS",
    "BatchSchedArguments",
    "CallbackArguments",
    "DataArguments",
    "ModelArguments",
    "PeftArguments",
    "RecipeArguments",
    "build_callbacks",
    "build_trainer",
    "check_before_start",
    "config_keys",
    "finetune",
    "load_config_file",
    "load_data",
    "load_model_and_tokenizer",
    "pad_collator",
    "parse_args",
    "parse_config",
    "remove_if_left_empty",
    "resume_checkpoint",
    "seed",
    "validate",
]
