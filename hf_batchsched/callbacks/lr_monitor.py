"""Log the learning rate of every parameter group, not only group 0.

The Trainer logs ``learning_rate`` from ``lr_scheduler.get_last_lr()[0]``: with per-group LRs (LoRA+'s B matrices,
an embedding or head group, layer-wise decay) the other groups are invisible. ``LRMonitorCallback`` records the LR
each group used in the last optimizer update (at ``on_optimizer_step``, so it matches the Trainer's own
``learning_rate``, which is also read before the scheduler steps) and logs them through ``trainer.log`` with every
training log, so they reach every ``report_to`` integration.

| name | meaning |
|---|---|
| ``lr/group_<i>`` | LR of parameter group ``i`` in the last optimizer update |
"""

from __future__ import annotations

from transformers import TrainerCallback

from ..callback_binding import TrainerBoundCallback
from ..trainer import log_metrics

__all__ = ["LRMonitorCallback", "param_group_lrs"]


def param_group_lrs(optimizer) -> list[float]:
    """The current learning rate of every parameter group of ``optimizer`` (functional twin of the callback).

    >>> import torch
    >>> params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    >>> param_group_lrs(torch.optim.SGD([{"params": params[:1]}, {"params": params[1:], "lr": 0.16}], lr=0.01))
    [0.01, 0.16]
    """
    return [float(group["lr"]) for group in optimizer.param_groups]


class LRMonitorCallback(TrainerBoundCallback, TrainerCallback):
    """Logs ``lr/group_<i>`` for every optimizer parameter group at each logging step.

    Args:
        trainer (`transformers.Trainer`, *optional*): the trainer whose optimizer is monitored; without it the
            callback is bound by ``BatchRampTrainer`` or ``hf_batchsched.bind_callbacks(trainer)``.

    Example::

        trainer = BatchRampTrainer(..., callbacks=[LRMonitorCallback()])  # or trainer.add_callback(LRMonitorCallback)
    """

    def __init__(self, trainer=None):
        self.last_lrs: list[float] | None = None
        if trainer is not None:
            self.bind(trainer)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.last_lrs = param_group_lrs(self.trainer.optimizer)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # With every training log of the Trainer (the one with "loss", whatever the logging strategy), as a
        # separate entry at the same step.
        if logs and "loss" in logs and self.last_lrs is not None:
            log_metrics(self.trainer, {f"lr/group_{i}": lr for i, lr in enumerate(self.last_lrs)})
