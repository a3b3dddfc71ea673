"""Batch-size ramping inside the Hugging Face ``Trainer``: ``BatchRampMixin`` and ``BatchRampTrainer``.

The global batch B(t) is a pure function of the training clock (consumed samples or tokens), realised as
accumulation at a fixed micro-batch: the DataLoader yields one step batch per optimizer step (``RampBatchSampler``),
``training_step`` runs it in micro-chunks of at most ``max_micro_batch_size`` sequences, and the loss is normalised
over the whole step batch. Options, behaviour, micro-chunk events and metrics: ``docs/batch-ramp.md``; checkpoints
and resume: ``docs/checkpoints.md``; engines: ``docs/distributed.md``.

This package is the one place that touches Trainer, accelerate or torch internals, in three files by role:
``ramp`` (``BatchRampMixin``: set-up, data, plan, checkpoints, logs; the Trainer overrides), ``steps``
(``RampStepsMixin``: one optimizer step over micro-chunks) and ``internals`` (the helpers the callbacks and the bench
use instead of reading private state: ``log_metrics``, ``set_scheduler_lrs``, ``prepare_inputs``,
``full_parameters``, ``fsdp_gradient_bytes``, ``enable_fsdp_on_cpu``). The logic that reads no internals lives in
``launch``, ``ramp_plan``, ``ramp_loader``, ``ramp_metrics``, ``chunk_checks``, ``batching``, ``loss_weights``,
``sharded_grads``, ``checkpoint`` and ``callback_binding``.

Example:

>>> from transformers import TrainingArguments
>>> from hf_batchsched.assets import tiny_llama, synthetic_lm_dataset
>>> args = TrainingArguments("/tmp/ramp-doctest", per_device_train_batch_size=4, num_train_epochs=1,
...                          report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
>>> trainer = BatchRampTrainer(model=tiny_llama(), args=args, train_dataset=synthetic_lm_dataset(32),
...                            batch_schedule=lambda consumed: 8 if consumed < 16 else 16)
>>> from transformers import PrinterCallback
>>> trainer.remove_callback(PrinterCallback)
>>> _ = trainer.train()
>>> trainer.ramp_plan, trainer.clock.optimizer_steps, trainer.clock.consumed_samples
([8, 8, 16], 3, 32)
"""

from __future__ import annotations

from ..launch import FSDP_ON_CPU_ENV
from .internals import (
    enable_fsdp_on_cpu,
    fsdp_gradient_bytes,
    full_parameters,
    log_metrics,
    prepare_inputs,
    set_scheduler_lrs,
)
from .ramp import BatchRampMixin, BatchRampTrainer
from .steps import RampStepsMixin

__all__ = [
    "FSDP_ON_CPU_ENV",
    "BatchRampMixin",
    "BatchRampTrainer",
    "enable_fsdp_on_cpu",
    "RampStepsMixin",
    "fsdp_gradient_bytes",
    "full_parameters",
    "log_metrics",
    "prepare_inputs",
    "set_scheduler_lrs",
]
