"""The shared logic of the bundled fine-tuning recipe (``recipes/finetune.py`` and ``hf-batchsched finetune``).

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

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import importlib.util
import inspect
import json
import logging
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, check_choice

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
    "config_keys",
    "finetune",
    "load_config_file",
    "load_data",
    "load_model_and_tokenizer",
    "parse_args",
    "parse_config",
    "resume_checkpoint",
    "validate",
]

logger = logging.getLogger(__name__)

PEFT_METHODS = ("none", "lora", "qlora")
# config section -> "module:Class" of the callback it turns on.
CALLBACK_SECTIONS = {
    "sharpness": "hf_batchsched.callbacks.sharpness:SharpnessProbeCallback",
    "stability": "hf_batchsched.callbacks.stability:StabilityMonitorCallback",
    "bn_recalibration": "hf_batchsched.callbacks.batchnorm:BNRecalibrationCallback",
    "freeze_bn": "hf_batchsched.callbacks.batchnorm:FreezeBNCallback",
    "plateau": "hf_batchsched.callbacks.plateau:PlateauCallback",
    "spike_guard": "hf_batchsched.callbacks.spike_guard:SpikeGuardCallback",
    "lr_monitor": "hf_batchsched.callbacks.lr_monitor:LRMonitorCallback",
    "noise_scale": "hf_batchsched.callbacks.noise_scale:NoiseScaleCallback",
}
SECTION_FIELDS = ("batch_schedule", "lr_policy", "couple", *CALLBACK_SECTIONS)


@dataclass
class ModelArguments:
    """Which causal LM to fine-tune.

    Args:
        model_name_or_path (`str`, *optional*): a hub name or local directory for ``AutoModelForCausalLM``. Unset:
            the embedded default, a small Llama built from a config with a tokenizer trained locally
            (``hf_batchsched.demo``), which needs no network.
        attn_implementation (`str`, *optional*): ``"eager"``, ``"sdpa"`` or ``"flash_attention_2"``; unset lets
            transformers choose.
        dtype (`str`, *optional*, defaults to `"auto"`): weights dtype: ``auto``, ``float32``, ``bfloat16`` or
            ``float16``.
        trust_remote_code (`bool`, *optional*, defaults to `False`): allow model code from the hub.
    """

    model_name_or_path: str | None = field(default=None, metadata={"help": "hub name or path; unset: embedded"})
    attn_implementation: str | None = field(default=None, metadata={"help": "eager, sdpa or flash_attention_2"})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the hub"})


@dataclass
class DataArguments:
    """Where the training text comes from and how it becomes token sequences.

    Args:
        dataset_name (`str`, *optional*): a hub dataset (``load_dataset(dataset_name, dataset_config)``).
        dataset_config (`str`, *optional*): its configuration name.
        data_files (`list[str]`, *optional*): local JSON/JSONL files (used when ``dataset_name`` is unset). With
            neither, the embedded default text (the demo's standard-library source code) is used.
        train_split (`str`, *optional*, defaults to `"train"`): the training split.
        eval_split (`str`, *optional*): the evaluation split; unset: ``eval_fraction`` of the training split.
        eval_fraction (`float`, *optional*, defaults to `0.05`): share held out when there is no eval split.
        text_field (`str`, *optional*, defaults to `"text"`): the column holding plain text.
        prompt_field (`str`, *optional*): with ``response_field``, train on prompt + response pairs instead.
        response_field (`str`, *optional*): the response column.
        completion_only_loss (`bool`, *optional*, defaults to `True`): with prompt/response, no loss on prompt tokens.
        max_seq_length (`int`, *optional*, defaults to `512`): tokens per sequence (longer ones are truncated).
        packing (`bool`, *optional*, defaults to `True`): plain text is concatenated and cut into full
            ``max_seq_length`` blocks (no padding); ``False`` keeps one text per sequence.
        max_train_samples (`int`, *optional*): keep at most this many training sequences.
        max_eval_samples (`int`, *optional*): keep at most this many evaluation sequences.
    """

    dataset_name: str | None = None
    dataset_config: str | None = None
    data_files: list[str] | None = None
    train_split: str = "train"
    eval_split: str | None = None
    eval_fraction: float = 0.05
    text_field: str = "text"
    prompt_field: str | None = None
    response_field: str | None = None
    completion_only_loss: bool = True
    max_seq_length: int = 512
    packing: bool = True
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


@dataclass
class PeftArguments:
    """Full fine-tuning, LoRA or QLoRA (4-bit NF4 base through bitsandbytes; needs a CUDA GPU).

    Args:
        peft (`str`, *optional*, defaults to `"none"`): ``none`` (full fine-tuning), ``lora`` or ``qlora``.
        lora_r (`int`, *optional*, defaults to `16`): adapter rank.
        lora_alpha (`int`, *optional*, defaults to `32`): adapter scale numerator (scale = alpha / r).
        lora_dropout (`float`, *optional*, defaults to `0.05`): dropout on the adapter input.
        lora_target_modules (`list[str]`, *optional*, defaults to `["all-linear"]`): modules that get adapters.
        lora_modules_to_save (`list[str]`, *optional*): modules trained in full next to the adapters
            (e.g. ``embed_tokens lm_head``).
    """

    peft: str = "none"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    lora_modules_to_save: list[str] | None = None


@dataclass
class BatchSchedArguments:
    """The batch-size ramp and the LR policy (``BatchRampTrainer``); unset keeps the plain Trainer's behaviour.

    Args:
        batch_schedule (`dict`, `str` or `int`, *optional*): global batch size as a function of consumed samples
            or tokens (``hf_batchsched.schedules.batch.batch_schedule_from_config``); an int is constant.
        max_micro_batch_size (`int`, *optional*): largest chunk per forward/backward per device; defaults to
            ``per_device_train_batch_size``.
        lr_policy (`dict` or `str`, *optional*): an LR policy config (``hf_batchsched.schedules.lr``).
        couple (`dict` or `str`, *optional*): optimizer hyperparameters that follow the batch size
            (``hf_batchsched.coupling``): ``"lr=sqrt,wd,betas"`` or ``{lr: sqrt, weight_decay: true, betas: true}``.
        allow_schedule_change_on_resume (`bool`, *optional*, defaults to `False`): with ``resume_from_checkpoint``,
            continue from the checkpoint's clock although the batch plan settings (schedule, micro-batch, world size,
            ``num_train_epochs``, ``max_steps``) changed; without it such a resume is refused.
    """

    batch_schedule: dict | str | None = None
    max_micro_batch_size: int | None = None
    lr_policy: dict | str | None = None
    couple: dict | str | None = field(default=None, metadata={"help": "coupled hyperparameters: lr=sqrt,wd,betas"})
    allow_schedule_change_on_resume: bool = False


@dataclass
class CallbackArguments:
    """One section per callback of this package; a present section (``{}`` for defaults) turns it on.

    Each section holds the keyword arguments of its callback (the trainer is passed by the recipe):

    | section | callback |
    |---|---|
    | ``sharpness`` | ``SharpnessProbeCallback`` (``sharpness/*``) |
    | ``stability`` | ``StabilityMonitorCallback`` (``stability/*``) |
    | ``bn_recalibration`` | ``BNRecalibrationCallback`` (models with BatchNorm) |
    | ``freeze_bn`` | ``FreezeBNCallback`` (models with BatchNorm) |
    | ``plateau`` | ``PlateauCallback`` (reduce the LR when the eval metric stalls) |
    | ``spike_guard`` | ``SpikeGuardCallback`` (skip updates on loss spikes) |
    | ``lr_monitor`` | ``LRMonitorCallback`` (``lr/group_*``) |
    | ``noise_scale`` | ``NoiseScaleCallback`` (``batchsched/noise_scale``; needs a ``batch_schedule``) |
    """

    sharpness: dict | str | None = None
    stability: dict | str | None = None
    bn_recalibration: dict | str | None = None
    freeze_bn: dict | str | None = None
    plateau: dict | str | None = None
    spike_guard: dict | str | None = None
    lr_monitor: dict | str | None = None
    noise_scale: dict | str | None = None


@dataclass
class RecipeArguments:
    """All of a recipe run's settings, one dataclass per concern."""

    model: ModelArguments
    data: DataArguments
    peft: PeftArguments
    schedule: BatchSchedArguments
    callbacks: CallbackArguments
    training: typing.Any  # transformers.TrainingArguments


def _dataclass_types() -> tuple:
    from transformers import TrainingArguments

    return ModelArguments, DataArguments, PeftArguments, BatchSchedArguments, CallbackArguments, TrainingArguments


def config_keys() -> dict[str, list[str]]:
    """Every config key, grouped: the recipe's sections, then all ``TrainingArguments`` fields (for ``--help``).

    >>> keys = config_keys()
    >>> keys["batch schedule and LR policy"][:2], "learning_rate" in keys["TrainingArguments"]
    (['batch_schedule', 'max_micro_batch_size'], True)
    """
    names = ("model", "data", "adapters", "batch schedule and LR policy", "callback sections (JSON)")
    names = (*names, "TrainingArguments")
    return {
        group: [item.name for item in dataclasses.fields(cls) if item.init]
        for group, cls in zip(names, _dataclass_types(), strict=True)
    }


def _field_types() -> dict[str, typing.Any]:
    types_by_name = {}
    for cls in _dataclass_types():
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            if item.init:
                types_by_name[item.name] = hints[item.name]
    return types_by_name


def _coerce(key: str, value, hint):
    """Check (and convert YAML strings like ``"1e-4"``) one config value against its field's type."""
    if key in SECTION_FIELDS:
        if isinstance(value, str) and value.strip().lower() in ("", "null", "none"):
            return None
        if isinstance(value, str) and value.strip().startswith(("{", "[")):
            try:
                return json.loads(value)
            except json.JSONDecodeError as error:
                raise ConfigError(f"config key {key!r}: invalid JSON ({error.msg}): {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (Mapping, str, int)) and value is not None:
            raise ConfigError(f"config key {key!r}: expected a section (a mapping), got {value!r}")
        return dict(value) if isinstance(value, Mapping) else value
    is_union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    args = set(typing.get_args(hint)) if is_union else {hint}
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"config key {key!r} cannot be empty (null)")
    concrete = [a for a in args if a is not type(None)]
    for target in (bool, int, float):
        if target in concrete:
            if target is bool:
                if isinstance(value, bool):
                    return value
                if isinstance(value, str) and value.lower() in ("true", "false"):
                    return value.lower() == "true"
                if len(concrete) == 1:
                    raise ConfigError(f"config key {key!r}: expected true or false, got {value!r}")
                continue
            if isinstance(value, bool):
                raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
            try:
                number = target(value) if not isinstance(value, str) or target is float else int(value)
            except (TypeError, ValueError):
                if len(concrete) == 1 or str not in concrete:
                    raise ConfigError(f"config key {key!r}: expected {target.__name__}, got {value!r}") from None
                continue
            if target is int and isinstance(value, float) and value != int(value):
                raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
            return number
    if any(typing.get_origin(a) is list or a is list for a in concrete):
        if isinstance(value, str):
            return [value]
        if not isinstance(value, Sequence):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        return list(value)
    return value


def load_config_file(path: str | Path) -> dict:
    """Read a recipe YAML config into a dict (an empty file is an empty config)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).strip().splitlines()[0]
        raise ConfigError(f"config file {str(path)!r}{where}: invalid YAML ({problem}); fix the file") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text ({error.reason}); save it as UTF-8") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping, not {type(data).__name__}")
    return data


def _check_qlora_device(peft: str | None) -> None:
    import torch

    if peft == "qlora" and not torch.cuda.is_available():
        raise ConfigError(
            "peft: qlora needs a CUDA GPU (bitsandbytes 4-bit NF4); this machine has none: use 'peft: lora' on CPU"
        )


def parse_config(config: Mapping, *, check_device: bool = True) -> RecipeArguments:
    """Build ``RecipeArguments`` from a flat config dict, checking every key and value, then ``validate`` it.

    Args:
        config (`Mapping`): config keys (fields of the recipe's dataclasses and of ``TrainingArguments``) to values.
        check_device (`bool`, *optional*, defaults to `True`): also check that this machine can run the config
            (QLoRA needs a CUDA GPU); ``False`` validates a config meant for another machine.
    """
    known = _field_types()
    values = {}
    for key, value in config.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        values[key] = _coerce(key, value, known[key])
    if check_device:  # before TrainingArguments, whose own device checks give a less helpful message
        _check_qlora_device(values.get("peft"))
    parsed = []
    for cls in _dataclass_types():
        names = {item.name for item in dataclasses.fields(cls) if item.init}
        kwargs = {key: value for key, value in values.items() if key in names}
        try:
            parsed.append(cls(**kwargs))
        except ConfigError:
            raise
        except (ValueError, TypeError) as error:
            raise ConfigError(f"invalid {cls.__name__} setting: {str(error).strip().splitlines()[0]}") from None
    args = RecipeArguments(*parsed)
    validate(args, check_device=check_device)
    return args


def parse_args(argv: Sequence[str] | None = None) -> RecipeArguments:
    """Parse ``--config path.yaml`` plus ``--key value`` overrides (HfArgumentParser syntax) into ``RecipeArguments``.

    The YAML values become the parser's defaults, so an override on the command line wins.
    """
    import argparse
    import sys

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    config = load_config_file(known.config) if known.config else {}
    # QLoRA's device check comes first: importing transformers' trainer stack may print bitsandbytes warnings.
    peft = rest[rest.index("--peft") + 1] if "--peft" in rest[:-1] else config.get("peft")
    _check_qlora_device(peft)
    types_by_name = _field_types()
    for key, value in config.items():  # check YAML keys and values before argparse sees them
        if key not in types_by_name:
            parse_config({key: value})
    from transformers import HfArgumentParser

    given = _given_options(rest)
    parser = HfArgumentParser(_dataclass_types(), allow_abbrev=False)  # --learning_rat is not --learning_rate
    parser.error = _raise_config_error  # one line and exit code 2 from the CLI, instead of argparse's usage dump
    parser.set_defaults(**{key: _coerce(key, value, types_by_name[key]) for key, value in config.items()})
    *parsed, remaining = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True)
    if remaining:
        raise ConfigError(f"unknown command-line option(s): {' '.join(remaining)}")
    merged = {}
    for obj in parsed:
        for item in dataclasses.fields(obj):
            if item.init and (item.name in config or {item.name, f"no_{item.name}"} & given):
                merged[item.name] = getattr(obj, item.name)
    return parse_config(merged)


def _raise_config_error(message: str) -> None:
    raise ConfigError(f"{message} (see --help)")


def _given_options(argv: Sequence[str]) -> set[str]:
    return {arg[2:].split("=", 1)[0].replace("-", "_") for arg in argv if arg.startswith("--")}


def _callback_class(section: str):
    module_name, class_name = CALLBACK_SECTIONS[section].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def available_callback_sections() -> list[str]:
    """The callback sections whose modules are installed (``CALLBACK_SECTIONS`` lists all known ones)."""
    return [s for s, path in CALLBACK_SECTIONS.items() if importlib.util.find_spec(path.split(":")[0]) is not None]


def _section_kwargs(section: str, value) -> dict:
    if value is True or value == "{}" or value == "":
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"config section {section!r} must be a mapping of the callback's arguments, got {value!r}")
    return dict(value)


def _check_callback_kwargs(section: str, kwargs: dict) -> None:
    if section not in available_callback_sections():
        raise ConfigError(f"config section {section!r} needs {CALLBACK_SECTIONS[section]}, which is not installed")
    signature = inspect.signature(_callback_class(section).__init__)
    params = list(signature.parameters.values())[1:]
    accepted = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"trainer"}
    unknown = sorted(set(kwargs) - accepted)
    if section == "sharpness":  # extra keys are estimator options, checked against the chosen metrics
        from .probes.sharpness import validate_sharpness_options

        metrics = kwargs.get("metrics", ("avg",))
        options = {key: kwargs[key] for key in unknown}
        _wrap(lambda: validate_sharpness_options(metrics, options, callback_keys=sorted(accepted)), section)
    elif unknown:
        raise ConfigError(
            f"config section {section!r} got unknown key(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(sorted(accepted))}"
        )


def validate(args: RecipeArguments, *, check_device: bool = True) -> None:
    """Check what can be checked without loading a model; raise ``ConfigError`` naming the bad key."""
    check_choice("peft method (config key 'peft')", args.peft.peft, PEFT_METHODS)
    if check_device:
        _check_qlora_device(args.peft.peft)
    if args.model.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"config key 'dtype': expected auto, float32, bfloat16 or float16, got {args.model.dtype!r}")
    data = args.data
    if not 0 <= data.eval_fraction < 1:
        raise ConfigError(f"config key 'eval_fraction' must be in [0, 1), got {data.eval_fraction}")
    if (data.prompt_field is None) != (data.response_field is None):
        raise ConfigError("config keys 'prompt_field' and 'response_field' go together; set both or neither")
    for key in ("max_seq_length", "lora_r", "lora_alpha", "max_micro_batch_size", "max_train_samples",
                "max_eval_samples"):  # fmt: skip
        value = getattr(args.data, key, getattr(args.peft, key, getattr(args.schedule, key, None)))
        if value is not None and value <= 0:
            raise ConfigError(f"config key {key!r} must be > 0, got {value}")
    if args.schedule.batch_schedule is not None:
        from .schedules.batch import batch_schedule_from_config

        schedule = _wrap(lambda: batch_schedule_from_config(args.schedule.batch_schedule), "batch_schedule")
        if getattr(schedule, "lr_batch_exponent", 0) and args.schedule.lr_policy is not None:
            raise ConfigError(
                "config key 'lr_policy': the seesaw batch_schedule sets the LR itself from its own lr_policy; remove "
                "the top-level lr_policy (put the base policy inside batch_schedule)"
            )
    if args.schedule.lr_policy is not None:
        from .schedules.lr import lr_policy_from_config

        _wrap(lambda: lr_policy_from_config(args.schedule.lr_policy), "lr_policy")
    if args.schedule.couple is not None:
        from .coupling import Coupling

        _wrap(lambda: Coupling.parse(args.schedule.couple), "couple")
        if args.schedule.batch_schedule is None:
            raise ConfigError("config key 'couple' needs a 'batch_schedule' (the batch it follows); add one")
    if args.training.deepspeed and (args.schedule.batch_schedule is not None or args.schedule.lr_policy is not None):
        raise ConfigError("batch_schedule and lr_policy need BatchRampTrainer, which does not support DeepSpeed yet")
    for section in CALLBACK_SECTIONS:
        value = getattr(args.callbacks, section)
        if value is not None:
            _check_callback_kwargs(section, _section_kwargs(section, value))


def _wrap(build, key: str):
    try:
        return build()
    except ConfigError as error:
        raise ConfigError(f"config key {key!r}: {error}") from None
    except (TypeError, ValueError, KeyError) as error:
        raise ConfigError(f"config key {key!r}: {error}") from None


def load_model_and_tokenizer(args: RecipeArguments, train_texts: list[str] | None = None):
    """Load (or, for the embedded default, build) the model and tokenizer, and attach LoRA/QLoRA adapters."""
    import torch

    margs, pargs = args.model, args.peft
    if margs.model_name_or_path is None:
        from . import demo

        tokenizer = demo.demo_tokenizer(train_texts if train_texts is not None else demo.demo_corpus()[0])
        model = demo.demo_model(len(tokenizer), seed=args.training.seed, attn_implementation=margs.attn_implementation)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = {"trust_remote_code": margs.trust_remote_code}
        if margs.attn_implementation:
            kwargs["attn_implementation"] = margs.attn_implementation
        if margs.dtype != "auto":
            kwargs["dtype"] = getattr(torch, margs.dtype)
        if pargs.peft == "qlora":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
        _check_model_source(margs.model_name_or_path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                margs.model_name_or_path, trust_remote_code=margs.trust_remote_code
            )
            model = AutoModelForCausalLM.from_pretrained(margs.model_name_or_path, **kwargs)
        except OSError as error:  # a hub id that is neither cached nor reachable, or a folder without the files
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(
                f"config key 'model_name_or_path': cannot load {margs.model_name_or_path!r}: {first_line}"
            ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if pargs.peft in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if pargs.peft == "qlora":
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=bool(getattr(args.training, "activation_checkpointing", False))
            )
        targets = pargs.lora_target_modules
        config = LoraConfig(
            r=pargs.lora_r,
            lora_alpha=pargs.lora_alpha,
            lora_dropout=pargs.lora_dropout,
            target_modules=targets[0] if targets == ["all-linear"] else targets,
            modules_to_save=pargs.lora_modules_to_save,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    return model, tokenizer


def _check_model_source(name: str) -> None:
    """Refuse a ``model_name_or_path`` that is neither an existing directory nor shaped like a hub id."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(
                f"config key 'model_name_or_path': {name!r} is a file; give the model's directory (with config.json) "
                "or a hub model id"
            )
        return
    looks_like_hub_id = re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?", name) is not None
    if not looks_like_hub_id:
        raise ConfigError(
            f"config key 'model_name_or_path': {name!r} does not exist (it is not a local directory, and not a hub "
            "model id such as 'org/name'); check the path"
        )


def _raw_data(args: RecipeArguments):
    """``(train, eval)`` as ``datasets.Dataset`` of raw rows (eval may be None)."""
    from datasets import Dataset, load_dataset

    data = args.data
    if data.dataset_name is None and not data.data_files:
        from .demo import demo_corpus

        train, held_out = demo_corpus()
        return Dataset.from_dict({"text": train}), Dataset.from_dict({"text": held_out})
    if data.dataset_name is not None:
        loaded = load_dataset(data.dataset_name, data.dataset_config)
    else:
        missing = [path for path in data.data_files if not Path(path).is_file()]
        if missing:
            raise ConfigError(f"config key 'data_files': no such file(s): {', '.join(missing)}")
        loaded = load_dataset("json", data_files={"train": list(data.data_files)})
    if data.train_split not in loaded:
        raise ConfigError(f"config key 'train_split': no split {data.train_split!r}; found {', '.join(loaded)}")
    if data.eval_split is not None:
        if data.eval_split not in loaded:
            raise ConfigError(f"config key 'eval_split': no split {data.eval_split!r}; found {', '.join(loaded)}")
        return loaded[data.train_split], loaded[data.eval_split]
    if data.eval_fraction == 0:
        return loaded[data.train_split], None
    split = loaded[data.train_split].train_test_split(test_size=data.eval_fraction, seed=args.training.seed)
    return split["train"], split["test"]


def _tokenize(dataset, args: RecipeArguments, tokenizer):
    data = args.data
    columns = dataset.column_names
    eos = tokenizer.eos_token or ""
    if data.prompt_field is not None:
        for key in (data.prompt_field, data.response_field):
            if key not in columns:
                raise ConfigError(f"the data has no column {key!r} (columns: {', '.join(columns)})")

        def pairs(row):
            prompt = tokenizer(row[data.prompt_field], add_special_tokens=False)["input_ids"]
            response = tokenizer(row[data.response_field] + eos, add_special_tokens=False)["input_ids"]
            ids = (prompt + response)[: data.max_seq_length]
            labels = ([-100] * len(prompt) if data.completion_only_loss else list(prompt)) + response
            return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels[: data.max_seq_length]}

        return dataset.map(pairs, remove_columns=columns)
    if data.text_field not in columns:
        raise ConfigError(
            f"config key 'text_field': the data has no column {data.text_field!r} (columns: {', '.join(columns)})"
        )
    tokenized = dataset.map(
        lambda rows: tokenizer([text + eos for text in rows[data.text_field]], add_special_tokens=False),
        batched=True,
        remove_columns=columns,
    )
    if not data.packing:
        return tokenized.map(
            lambda row: {
                "input_ids": row["input_ids"][: data.max_seq_length],
                "attention_mask": row["attention_mask"][: data.max_seq_length],
                "labels": row["input_ids"][: data.max_seq_length],
            }
        )
    block = data.max_seq_length

    def pack(rows):
        stream = [token for ids in rows["input_ids"] for token in ids]
        blocks = [stream[i : i + block] for i in range(0, len(stream) - block + 1, block)]
        masks, labels = [[1] * block for _ in blocks], [list(b) for b in blocks]
        return {"input_ids": blocks, "attention_mask": masks, "labels": labels}

    return tokenized.map(pack, batched=True, batch_size=1000, remove_columns=tokenized.column_names)


def load_data(args: RecipeArguments, tokenizer):
    """Load, split and tokenize the data: ``(train_dataset, eval_dataset or None)`` of token sequences."""
    train, held_out = _raw_data(args)
    train = _tokenize(train, args, tokenizer)
    held_out = _tokenize(held_out, args, tokenizer) if held_out is not None else None
    if args.data.max_train_samples is not None:
        train = train.select(range(min(len(train), args.data.max_train_samples)))
    if held_out is not None and args.data.max_eval_samples is not None:
        held_out = held_out.select(range(min(len(held_out), args.data.max_eval_samples)))
    if len(train) == 0:
        raise ConfigError("the training data is empty after tokenization; check text_field and max_seq_length")
    return train, held_out


def pad_collator(tokenizer):
    """A collator padding ``input_ids`` (pad id), ``attention_mask`` (0) and ``labels`` (-100) to the longest row."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collate(rows: list[dict]) -> dict:
        width = max(len(row["input_ids"]) for row in rows)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for row in rows:
            pad = width - len(row["input_ids"])
            batch["input_ids"].append(list(row["input_ids"]) + [pad_id] * pad)
            batch["attention_mask"].append(list(row["attention_mask"]) + [0] * pad)
            batch["labels"].append(list(row["labels"]) + [-100] * pad)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}

    return collate


def build_callbacks(args: RecipeArguments, trainer) -> list:
    """Instantiate every callback whose config section is present, add it to ``trainer`` and return them."""
    callbacks = []
    for section in CALLBACK_SECTIONS:
        value = getattr(args.callbacks, section)
        if value is None:
            continue
        kwargs = _section_kwargs(section, value)
        cls = _callback_class(section)
        first = next(iter(list(inspect.signature(cls.__init__).parameters)[1:]), None)
        positional = (trainer,) if first == "trainer" else ()
        callback = _wrap(functools.partial(cls, *positional, **kwargs), section)
        trainer.add_callback(callback)
        callbacks.append(callback)
    return callbacks


def _uses_batch_ramp(args: RecipeArguments) -> bool:
    return args.schedule.batch_schedule is not None or args.schedule.lr_policy is not None


def resume_checkpoint(args: RecipeArguments) -> str | None:
    """The checkpoint the run resumes from (``resume_from_checkpoint``: ``true``, ``false`` or a path), or ``None``.

    With a batch ramp it must be a complete ``BatchRampTrainer`` checkpoint (``hf_batchsched.checkpoint``); ``true``
    takes the newest complete one in ``output_dir``. Refused with a ``ConfigError`` before anything is written.
    """
    value = args.training.resume_from_checkpoint
    if isinstance(value, str) and value.strip().lower() in ("true", "false", ""):
        value = value.strip().lower() == "true"
    if value is None or value is False:
        return None
    if _uses_batch_ramp(args):
        from .checkpoint import find_resume_checkpoint

        return find_resume_checkpoint(value, args.training.output_dir).path
    if value is True:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(args.training.output_dir) if Path(args.training.output_dir).is_dir() else None
        if last is None:
            raise ConfigError(
                f"resume_from_checkpoint: true, but output_dir {args.training.output_dir!r} has no checkpoint"
            )
        return last
    if not Path(value).is_dir():
        raise ConfigError(f"resume_from_checkpoint: {value!r} does not exist or is not a checkpoint folder")
    return str(value)


def build_trainer(args: RecipeArguments, model, tokenizer, train_dataset, eval_dataset=None):
    """A ``BatchRampTrainer`` (plain ``Trainer`` when neither a batch schedule nor an LR policy is set, e.g. for
    DeepSpeed) with the package's callbacks from the config."""
    from transformers import Trainer

    kwargs = dict(
        model=model,
        args=args.training,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=pad_collator(tokenizer),
        processing_class=tokenizer,
    )
    if not _uses_batch_ramp(args):
        trainer = Trainer(**kwargs)
    else:
        from .schedules.batch import batch_schedule_from_config
        from .trainer import BatchRampTrainer

        schedule = args.schedule.batch_schedule
        trainer = BatchRampTrainer(
            **kwargs,
            batch_schedule=None if schedule is None else batch_schedule_from_config(schedule),
            max_micro_batch_size=args.schedule.max_micro_batch_size,
            lr_policy=args.schedule.lr_policy,
            couple=args.schedule.couple,
            allow_schedule_change_on_resume=args.schedule.allow_schedule_change_on_resume,
        )
    build_callbacks(args, trainer)
    return trainer


def finetune(args: RecipeArguments):
    """Run the recipe and return the trained ``Trainer`` (final metrics in ``trainer.state.log_history``):

    1. model and tokenizer (+ LoRA / QLoRA adapters), after seeding with ``seed`` (so two runs of one config start
       from the same adapter weights); the embedded small Llama when no model is named;
    2. data: hub dataset, local JSON/JSONL, or the embedded text, tokenized (and packed) to ``max_seq_length``;
    3. trainer: ``BatchRampTrainer`` with the batch ramp and LR policy, plus every configured callback;
    4. train (``resume_from_checkpoint``: ``true`` for the newest complete checkpoint in ``output_dir``, or a
       checkpoint path; checked before anything is loaded or written), evaluate, save (unless ``save_strategy: "no"``).
    """
    from .launch import check_distributed_launch

    check_distributed_launch(args.training)
    resume = resume_checkpoint(args)
    output_dir = Path(args.training.output_dir)
    created = not output_dir.exists()
    try:
        return _finetune(args, resume)
    except BaseException:
        if created:  # a run that stopped before writing anything leaves no empty output_dir behind
            _remove_empty_tree(output_dir)
        raise


def _remove_empty_tree(path: Path) -> None:
    """Remove ``path`` and its subfolders if they hold no file."""
    try:
        if not path.is_dir() or any(not item.is_dir() for item in path.rglob("*")):
            return
        for folder in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            folder.rmdir()
        path.rmdir()
    except OSError:  # another process of the launch removed it first, or wrote into it
        pass


def _finetune(args: RecipeArguments, resume: str | None):
    from transformers import enable_full_determinism, set_seed

    # Seeded before the model exists: LoRA's initial adapter weights come from the global generator.
    if args.training.full_determinism:
        enable_full_determinism(args.training.seed)
    else:
        set_seed(args.training.seed)
    model, tokenizer = load_model_and_tokenizer(args)
    train_dataset, eval_dataset = load_data(args, tokenizer)
    trainer = build_trainer(args, model, tokenizer, train_dataset, eval_dataset)
    metrics = dict(trainer.train(resume_from_checkpoint=resume).metrics)
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
    if args.training.save_strategy != "no":
        trainer.save_model()
    trainer.log_metrics("final", metrics)
    return trainer
