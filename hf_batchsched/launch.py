"""What the launch and the ``TrainingArguments`` ask of a batch-ramp trainer, checked before and after the Trainer
is built: a multi-process launch with distributed arguments, the engine accelerate really set up (DeepSpeed ZeRO
stage, FSDP version, or none), the size options, and the scheduler settings that an ``lr_policy`` replaces.

Nothing here reads Trainer internals: ``hf_batchsched.trainer`` holds those, ``enable_fsdp_on_cpu`` included (it
changes accelerate's private process state).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import numbers
import os

from torch.utils.data import IterableDataset

from .errors import ConfigError, check_integer, check_positive

logger = logging.getLogger("hf_batchsched.trainer")  # the trainer's logger: its messages keep their source

__all__ = [
    "FSDP_GRADIENT_SYNC",
    "FSDP_ON_CPU_ENV",
    "check_distributed_launch",
    "check_lr_policy_owns_lr",
    "check_ramp_options",
    "deepspeed_requested",
    "env_flag",
    "fsdp_requested",
    "no_tokens_for_policy",
    "ramp_batch_sizes",
    "ramp_data_options",
    "check_sharding_engine",
    "check_unset_or_positive",
    "copy_training_arguments",
    "scheduler_settings_replaced_by_policy",
    "train_sampling_strategy",
]

#: Environment variable that lets accelerate run FSDP on CPU processes (``1`` to enable): accelerate enables FSDP only
#: for GPU-like devices and silently runs DDP on the CPU otherwise.
FSDP_ON_CPU_ENV = "HF_BATCHSCHED_FSDP_ON_CPU"
#: ``fsdp_gradient_sync`` choices: reduce-scatter each micro-chunk's gradient, or only the last one's.
FSDP_GRADIENT_SYNC = ("every_chunk", "last_chunk")


def env_flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to ``1``/``true``/``yes``."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def fsdp_requested(args) -> bool:
    return env_flag("ACCELERATE_USE_FSDP") or bool(getattr(args, "fsdp", None))


def deepspeed_requested(args) -> bool:
    return env_flag("ACCELERATE_USE_DEEPSPEED") or bool(getattr(args, "deepspeed", None))


def check_distributed_launch(args) -> None:
    """Refuse a launch of several processes (``WORLD_SIZE > 1``: torchrun, accelerate launch) whose
    ``TrainingArguments`` are not distributed: each process would train alone (on CPU without ``use_cpu``), or
    without DDP's averaging (gloo without ``use_cpu``). ``args=None`` stands for the Trainer's default arguments."""
    from transformers.training_args import ParallelMode

    world = os.environ.get("WORLD_SIZE", "1").strip()
    if not world.isdigit() or int(world) <= 1:
        return
    mode = getattr(args, "parallel_mode", ParallelMode.NOT_PARALLEL)
    if mode in (ParallelMode.NOT_PARALLEL, ParallelMode.NOT_DISTRIBUTED):
        raise ConfigError(
            f"this is one of WORLD_SIZE={world} launched processes, but the TrainingArguments are not distributed "
            "(each process would train alone); on CPU add --use_cpu true --ddp_backend gloo "
            "(TrainingArguments(use_cpu=True, ddp_backend='gloo')), on GPUs give each process its own GPU"
        )


def check_unset_or_positive(what: str, value, default: str) -> None:
    """``None`` means "use the default"; anything else must be a positive integer (0 is not a way to unset it)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(
            f"{what} must be a positive integer, got {value!r}; leave it None for the default ({default})"
        )


def check_sharding_engine(trainer) -> str | None:
    """The engine the Trainer really runs: ``"zero0"``-``"zero3"``, ``"fsdp1"``, ``"fsdp2"`` or ``None`` (DDP/one
    process). Refuses, in one line, a launch that asked for FSDP or DeepSpeed and got plain DDP."""
    args = trainer.args
    device = "the CPU" if args.use_cpu or args.device.type == "cpu" else args.device.type
    distributed_type = trainer.accelerator.distributed_type.value
    if trainer.is_deepspeed_enabled:
        config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
        if config.get("zero_optimization", {}).get("stage", 0) not in (0, 1, 2, 3):
            raise ConfigError("unknown DeepSpeed ZeRO stage; zero_optimization.stage must be 0, 1, 2 or 3")
        if config.get("managed_gradient_accumulation") is False:
            raise ConfigError(
                "DeepSpeed managed_gradient_accumulation=false is not supported: the batch ramp marks each "
                "micro-chunk's accumulation boundary itself; remove the key from the DeepSpeed config"
            )
        return f"zero{config.get('zero_optimization', {}).get('stage', 0)}"
    if trainer.is_fsdp_enabled:
        return f"fsdp{getattr(trainer.accelerator.state.fsdp_plugin, 'fsdp_version', 1)}"
    if distributed_type == "NO":
        got = "one process without sharding (distributed_type NO)"
    else:
        got = f"plain data parallel (distributed_type {distributed_type})"
    if fsdp_requested(args):
        hint = (
            f"accelerate enables FSDP on GPUs only; set {FSDP_ON_CPU_ENV}=1 to run FSDP2 on CPU processes (gloo)"
            if device == "the CPU"
            else "check the accelerate config (distributed_type: FSDP, fsdp_config) and the launch command"
        )
        raise ConfigError(
            f"the launch asks for FSDP (ACCELERATE_USE_FSDP or --fsdp), but accelerate set up {got} on {device}: "
            f"{hint}, or launch with recipes/accelerate/multi_gpu_ddp.yaml for DDP"
        )
    if deepspeed_requested(args):
        raise ConfigError(
            f"the launch asks for DeepSpeed (ACCELERATE_USE_DEEPSPEED or --deepspeed), but accelerate set up {got} "
            f"on {device}: accelerate's --cpu / use_cpu: true turns DeepSpeed off (DeepSpeed runs CPU processes "
            "without it); remove it, or launch with recipes/accelerate/multi_gpu_ddp.yaml for DDP"
        )
    return None


def copy_training_arguments(targs):
    """A copy of the user's ``TrainingArguments`` for the trainer to change (its dict/list fields copied too)."""
    copied = copy.copy(targs)
    for field in dataclasses.fields(targs):
        value = getattr(targs, field.name, None)
        if isinstance(value, (dict, list, set)):
            setattr(copied, field.name, copy.deepcopy(value))
    return copied


def scheduler_settings_replaced_by_policy(targs) -> list[str]:
    """The ``lr_scheduler_type``/``warmup_*``/``lr_scheduler_kwargs`` the user set away from their defaults."""
    defaults = {field.name: field.default for field in dataclasses.fields(type(targs))}
    changed = []
    for name in ("lr_scheduler_type", "warmup_steps", "warmup_ratio", "lr_scheduler_kwargs"):
        if name not in defaults:
            continue
        value, default = getattr(targs, name), defaults[name]
        value = getattr(value, "value", value)
        if name == "lr_scheduler_kwargs":
            if value:
                changed.append(f"{name}={value!r}")
        elif value != getattr(default, "value", default):
            changed.append(f"{name}={value!r}")
    return changed


def check_lr_policy_owns_lr(targs, deepspeed_config: dict | None, *, seesaw: bool) -> None:
    """Refuse scheduler settings that an LR policy would silently replace: the ``TrainingArguments``' own
    ``lr_scheduler_type``/``warmup_*``/``lr_scheduler_kwargs``, or a DeepSpeed config's ``scheduler`` section
    (``deepspeed_config`` is the config under ZeRO-1/2/3, else ``None``). ``seesaw``: the policy is the seesaw batch
    schedule's own, not a user's ``lr_policy``."""
    replaced = scheduler_settings_replaced_by_policy(targs)
    if replaced and seesaw:
        raise ConfigError(
            f"the seesaw batch schedule sets the learning rate of every step, so {', '.join(replaced)} would be "
            "ignored: remove them from the TrainingArguments (a warmup goes into the seesaw config's warmup)"
        )
    if replaced:
        raise ConfigError(
            f"lr_policy sets the learning rate of every step, so {', '.join(replaced)} would be ignored: remove "
            "them from the TrainingArguments (a warmup goes into the policy: {'name': 'warmup', 'warmup': ..., "
            "'policy': ...}) or drop lr_policy"
        )
    if deepspeed_config is None or "scheduler" not in deepspeed_config:
        return
    if seesaw:
        raise ConfigError(
            "the seesaw batch schedule and the DeepSpeed config's 'scheduler' section would both set the "
            "learning rate; remove the 'scheduler' section"
        )
    raise ConfigError(
        "lr_policy and the DeepSpeed config's 'scheduler' section would both set the learning rate; "
        "remove the 'scheduler' section (the policy then drives the engine's optimizer) or the lr_policy"
    )


def train_sampling_strategy(targs) -> str:
    """The ``train_sampling_strategy`` of the arguments, refused unless the ramp's sampler implements it."""
    strategy = getattr(targs, "train_sampling_strategy", "random")
    if getattr(targs, "group_by_length", False):  # the boolean flag of transformers < 5.x
        strategy = "group_by_length"
    if strategy not in ("random", "sequential", "group_by_length"):
        raise ConfigError(
            f"train_sampling_strategy={strategy!r} is not supported with a batch ramp (the ramp draws its own "
            "step batches); use 'random', 'sequential' or 'group_by_length' (sorts each step batch by length)"
        )
    return strategy


def check_ramp_options(max_micro_batch_size, batch_size_multiple, seed) -> None:
    """The size and seed options of a batch-ramp trainer, checked before the Trainer makes ``output_dir``."""
    check_unset_or_positive("max_micro_batch_size", max_micro_batch_size, "per_device_train_batch_size")
    check_unset_or_positive("batch_size_multiple", batch_size_multiple, "the world size")
    if seed is not None:
        check_integer("seed", seed)


def ramp_batch_sizes(targs, batch_schedule, max_micro_batch_size) -> tuple[object, int]:
    """``(batch_schedule, max_micro_batch_size)`` with their defaults: no schedule is the plain Trainer's global batch
    (its ``gradient_accumulation_steps`` moves into the micro-chunks, logged); a schedule next to
    ``gradient_accumulation_steps > 1`` and ``auto_find_batch_size`` are refused. The caller sets the Trainer's
    accumulation to 1."""
    world_size, accumulation = targs.world_size, targs.gradient_accumulation_steps
    if batch_schedule is None:
        batch_schedule = targs.per_device_train_batch_size * world_size * accumulation
        if accumulation > 1:
            logger.warning(
                "BatchRampTrainer: gradient_accumulation_steps=%d is realised as micro-chunks of a constant "
                "global batch of %d; setting the Trainer's gradient_accumulation_steps to 1",
                accumulation,
                batch_schedule,
            )
    elif accumulation > 1:
        raise ConfigError(
            f"gradient_accumulation_steps={accumulation} cannot be combined with a batch_schedule: the ramp "
            "accumulates micro-chunks itself. Set gradient_accumulation_steps=1 and max_micro_batch_size to the "
            "largest chunk that fits in memory"
        )
    if targs.auto_find_batch_size:
        raise ConfigError("auto_find_batch_size is not supported with a batch ramp; set max_micro_batch_size")
    max_micro_batch_size = max_micro_batch_size or targs.per_device_train_batch_size  # 0 refused before
    check_positive("max_micro_batch_size", max_micro_batch_size)
    return batch_schedule, max_micro_batch_size


def ramp_data_options(targs, seed, batch_size_multiple, train_dataset, allow_schedule_change_on_resume):
    """``(seed, batch_size_multiple, train_sampling_strategy)`` of the ramp's data stream, with their defaults (the
    data seed, else the seed; the world size), checked: the multiple divides into ranks, the dataset is map-style,
    ``allow_schedule_change_on_resume`` is a bool."""
    world_size = targs.world_size
    ramp_seed = seed if seed is not None else (targs.data_seed if targs.data_seed is not None else targs.seed)
    check_integer("seed", ramp_seed)
    multiple = world_size if batch_size_multiple is None else int(batch_size_multiple)
    if multiple % world_size:
        raise ConfigError(
            f"batch_size_multiple={multiple} must be a multiple of world_size={world_size} so "
            "every rank gets the same number of samples"
        )
    if isinstance(train_dataset, IterableDataset):
        raise ConfigError(
            "a batch ramp needs a map-style train_dataset with a length (an IterableDataset cannot be shuffled "
            "or resumed by position); materialise it, e.g. datasets.Dataset.from_generator(...)"
        )
    strategy = train_sampling_strategy(targs)
    if not isinstance(allow_schedule_change_on_resume, bool):
        raise ConfigError(
            f"allow_schedule_change_on_resume must be True or False, got {allow_schedule_change_on_resume!r}"
        )
    return ramp_seed, multiple, strategy


def no_tokens_for_policy(lr_policy) -> ConfigError:
    """The error for an ``lr_policy`` on tokens when the training batches carry none to count."""
    return ConfigError(
        f"lr_policy {lr_policy.name!r} counts tokens, but the training batches have no attention_mask or "
        "input_ids to count them (e.g. image batches); build the policy on unit='samples' or 'fraction'"
    )
