"""Test-only builders (product code builds its models and data with ``hf_batchsched.assets``)."""

from __future__ import annotations

__all__ = ["tiny_training_args"]


def tiny_training_args(output_dir, **overrides):
    """``TrainingArguments`` for a short, quiet, reproducible CPU run; ``overrides`` replace any default.

    Defaults: ``use_cpu``, no reporting, no saving, no progress bar, ``seed=0``, ``logging_steps=1``,
    ``learning_rate=1e-3``, ``per_device_train_batch_size=4``, one epoch.

    >>> args = tiny_training_args("/tmp/tiny-args", max_steps=3)
    >>> args.max_steps, args.report_to, args.save_strategy.value
    (3, [], 'no')
    """
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)
