"""One way for every ``hf_batchsched`` callback to log: :func:`log_metrics`.

Why a helper (transformers 5.x, checked against ``trainer.py`` and ``trainer_callback.py``):

- ``Trainer.log(logs)`` appends to ``state.log_history`` and fires ``on_log``; ``CallbackHandler.on_log`` sets
  ``control.should_log = False`` before calling the callbacks. It touches no other flag (``should_evaluate`` is
  cleared by ``on_evaluate``, ``should_save`` by ``on_save``, all three by ``on_step_begin``).
- ``DefaultFlowCallback`` (always first in the list) sets ``should_log`` in ``on_step_end`` (``logging_steps``,
  ``logging_first_step``) and in ``on_epoch_end`` (``logging_strategy="epoch"``); the Trainer then reads it in
  ``_maybe_log_save_evaluate``, which runs right *after* those two events and writes the ``loss``/``grad_norm``/
  ``learning_rate`` entry.
- So a callback that calls ``trainer.log`` from ``on_step_end`` or ``on_epoch_end`` on a logging step cancels the
  Trainer's own training log for that step (the accumulated loss then goes out, averaged, at the next logging
  step). Earlier events of a step (``on_step_begin``, ``on_pre_optimizer_step``, ``on_optimizer_step``,
  ``on_substep_end``) run while ``should_log`` is still ``False``; ``on_log`` and ``on_evaluate`` run after the
  training log was written. Logging from those is harmless, and the helper is a plain ``trainer.log`` there.

:func:`log_metrics` logs through ``transformers.Trainer.log`` (so the values reach every ``report_to`` integration,
and ``log_history``) and puts ``should_log`` back when it was set before the call. It calls the base class's ``log``,
not a subclass's override: trl's trainers (``SFTTrainer``, ...) merge the metrics they gather during the step
(``entropy``, ``mean_token_accuracy``, ``num_tokens``) into *every* ``log`` call and clear them only afterwards, so
an extra entry logged through their ``log`` would repeat them (from ``on_log``) or take them away from the training
log (from ``on_step_end``); through the base ``log`` each metric appears once per step, in the Trainer's own entry.

DDP: call it on every rank, like the Trainer's own ``self.log`` (which runs on every rank): it runs no collective,
writes no file, and keeps ``log_history`` the same on all ranks; the ``report_to`` integrations and the console
printer write only where ``state.is_world_process_zero``. Values must already agree across ranks (reduce them
before) if they should mean the same thing everywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from transformers import Trainer

__all__ = ["log_metrics"]


def _plain(value: Any) -> Any:
    """A Python number for a one-element tensor (integrations such as MLflow reject tensors), else ``value``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def log_metrics(trainer: Any, logs: Mapping[str, Any]) -> None:
    """Log ``logs`` through ``trainer.log`` from any callback event without cancelling the Trainer's own log.

    Args:
        trainer (`transformers.Trainer`):
            The trainer (``transformers.Trainer.log`` is called on it; anything else with ``log(dict)`` has its own
            ``log`` called; ``control`` is read when present).
        logs (`Mapping[str, float]`):
            Metric name to value; one-element tensors are turned into Python numbers. Nothing is logged when empty.

    Example:

    >>> from types import SimpleNamespace
    >>> from transformers.trainer_callback import TrainerControl
    >>> trainer = SimpleNamespace(control=TrainerControl(should_log=True), history=[])
    >>> def log(logs):  # what Trainer.log does to the flag, through CallbackHandler.on_log
    ...     trainer.history.append(logs)
    ...     trainer.control.should_log = False
    >>> trainer.log = log
    >>> log_metrics(trainer, {"sharpness/avg": torch.tensor(0.25)})
    >>> trainer.history, trainer.control.should_log
    ([{'sharpness/avg': 0.25}], True)
    """
    if not logs:
        return
    control = getattr(trainer, "control", None)
    pending = bool(getattr(control, "should_log", False))
    log = functools.partial(Trainer.log, trainer) if isinstance(trainer, Trainer) else trainer.log
    log({key: _plain(value) for key, value in logs.items()})
    if pending:
        # Trainer.log may have replaced trainer.control with what the on_log callbacks returned: set both.
        control.should_log = True
        trainer.control.should_log = True
