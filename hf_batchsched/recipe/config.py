"""The recipe's config: one dataclass per concern, read with ``transformers.HfArgumentParser`` next to
``TrainingArguments`` (``hf_batchsched.recipe.parsing``), and the grouped list of every key (``--help``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import TrainingArguments

__all__ = [
    "CALLBACK_SECTIONS",
    "PEFT_METHODS",
    "SECTION_FIELDS",
    "BatchSchedArguments",
    "CallbackArguments",
    "DataArguments",
    "ModelArguments",
    "PeftArguments",
    "RecipeArguments",
    "config_keys",
    "dataclass_types",
]

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
            (``hf_batchsched.assets``), which needs no network.
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
            or tokens (``hf_batchsched.schedules.batch_config.batch_schedule_from_config``); an int is constant.
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
    training: TrainingArguments


def dataclass_types() -> tuple:
    """The dataclasses of a recipe config, in ``RecipeArguments`` order (``TrainingArguments`` last)."""
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
        for group, cls in zip(names, dataclass_types(), strict=True)
    }
