"""Checks of a parsed recipe config that need no model: choices, ranges, the batch schedule, LR policy and coupling
configs, and each callback section's keys against its callback's signature. Each raises ``ConfigError`` naming the
key."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping

from ..errors import ConfigError, check_choice
from .config import CALLBACK_SECTIONS, PEFT_METHODS, RecipeArguments

__all__ = ["check_qlora_device", "validate"]


def check_qlora_device(peft: str | None) -> None:
    import torch

    if peft == "qlora" and not torch.cuda.is_available():
        raise ConfigError(
            "peft: qlora needs a CUDA GPU (bitsandbytes 4-bit NF4); this machine has none: use 'peft: lora' on CPU"
        )


def callback_class(section: str):
    module_name, class_name = CALLBACK_SECTIONS[section].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def section_kwargs(section: str, value) -> dict:
    if value is True or value == "{}" or value == "":
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"config section {section!r} must be a mapping of the callback's arguments, got {value!r}")
    return dict(value)


def _check_callback_kwargs(section: str, kwargs: dict) -> None:
    signature = inspect.signature(callback_class(section).__init__)
    params = list(signature.parameters.values())[1:]
    accepted = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"trainer"}
    unknown = sorted(set(kwargs) - accepted)
    if section == "sharpness":  # extra keys are estimator options, checked against the chosen metrics
        from ..probes.sharpness import validate_sharpness_options

        metrics = kwargs.get("metrics", ("avg",))
        options = {key: kwargs[key] for key in unknown}
        named_error(lambda: validate_sharpness_options(metrics, options, callback_keys=sorted(accepted)), section)
    elif unknown:
        raise ConfigError(
            f"config section {section!r} got unknown key(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(sorted(accepted))}"
        )


def validate(args: RecipeArguments, *, check_device: bool = True) -> None:
    """Check what can be checked without loading a model; raise ``ConfigError`` naming the bad key."""
    check_choice("peft method (config key 'peft')", args.peft.peft, PEFT_METHODS)
    if check_device:
        check_qlora_device(args.peft.peft)
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
        from ..schedules.batch_config import batch_schedule_from_config

        schedule = named_error(lambda: batch_schedule_from_config(args.schedule.batch_schedule), "batch_schedule")
        if getattr(schedule, "lr_batch_exponent", 0) and args.schedule.lr_policy is not None:
            raise ConfigError(
                "config key 'lr_policy': the seesaw batch_schedule sets the LR itself from its own lr_policy; remove "
                "the top-level lr_policy (put the base policy inside batch_schedule)"
            )
    if args.schedule.lr_policy is not None:
        from ..schedules.lr_config import lr_policy_from_config

        named_error(lambda: lr_policy_from_config(args.schedule.lr_policy), "lr_policy")
    if args.schedule.couple is not None:
        from ..coupling import Coupling

        named_error(lambda: Coupling.parse(args.schedule.couple), "couple")
        if args.schedule.batch_schedule is None:
            raise ConfigError("config key 'couple' needs a 'batch_schedule' (the batch it follows); add one")
    if args.training.deepspeed and (args.schedule.batch_schedule is not None or args.schedule.lr_policy is not None):
        raise ConfigError("batch_schedule and lr_policy need BatchRampTrainer, which does not support DeepSpeed yet")
    for section in CALLBACK_SECTIONS:
        value = getattr(args.callbacks, section)
        if value is not None:
            _check_callback_kwargs(section, section_kwargs(section, value))


def named_error(build, key: str):
    """Run ``build()``, turning its errors into a ``ConfigError`` that names ``key``."""
    try:
        return build()
    except ConfigError as error:
        raise ConfigError(f"config key {key!r}: {error}") from None
    except (TypeError, ValueError, KeyError) as error:
        raise ConfigError(f"config key {key!r}: {error}") from None
