"""The ``batchsched/*`` metrics a ``BatchRampTrainer`` adds to its training logs, and the throughput figures it
corrects in the final ``train()`` log (the table of names: ``docs/batch-ramp.md``, "Metrics").
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["add_ramp_metrics"]


def add_ramp_metrics(
    logs: dict,
    clock,
    *,
    batch_size: int | None,
    micro_chunks: int | None,
    sgd_noise: Callable[[float | None], float | None],
    coupled: dict | None,
    samples_at_train_start: int,
) -> None:
    """Add to ``logs`` (in place): on a training log (one with ``loss``) after a step, the batch size, samples and
    tokens seen (``clock``: the trainer's ``TrainingClock``), micro-chunks, the SGD noise ``sgd_noise(lr)`` and the
    ``coupled`` hyperparameters; on the final log, ``train_samples`` and ``train_samples_per_second`` counted from
    the samples this ``train()`` call consumed.

    >>> from hf_batchsched.clock import TrainingClock
    >>> logs = {"loss": 1.0, "learning_rate": 0.1}
    >>> add_ramp_metrics(logs, TrainingClock(consumed_samples=24), batch_size=8, micro_chunks=2,
    ...                  sgd_noise=lambda lr: None, coupled=None, samples_at_train_start=0)
    >>> {key: value for key, value in logs.items() if key.startswith("batchsched/")}
    {'batchsched/batch_size': 8, 'batchsched/samples_seen': 24, 'batchsched/micro_chunks': 2}
    """
    if "loss" in logs and batch_size:
        logs["batchsched/batch_size"] = batch_size
        logs["batchsched/samples_seen"] = clock.consumed_samples
        if clock.consumed_tokens:
            logs["batchsched/tokens_seen"] = clock.consumed_tokens
        logs["batchsched/micro_chunks"] = micro_chunks
        noise = sgd_noise(logs.get("learning_rate"))
        if noise is not None:
            logs["batchsched/sgd_noise"] = noise
        if coupled is not None:
            logs.update(coupled)
    if "train_runtime" in logs and "train_samples_per_second" in logs:
        # The Trainer's figure is its planned samples times the share of steps run (constant-size steps); the
        # ramp's steps differ in size, so count the samples this train() call consumed.
        samples = clock.consumed_samples - samples_at_train_start
        logs["train_samples"] = samples
        if logs["train_runtime"] > 0:
            logs["train_samples_per_second"] = round(samples / logs["train_runtime"], 3)
