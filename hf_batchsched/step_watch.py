"""``StepWatch``: the current optimizer step's training loss and pre-clipping gradient norm, for callbacks that act
before the optimizer step (``SpikeGuardCallback``). An opt-in, reversible wrapper of two public calls on one trainer
instance; it reads no Trainer internals.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["StepWatch"]


class StepWatch:
    """The current optimizer step's training loss and pre-clipping gradient norm, for callbacks acting before it.

    Callback events carry neither: at ``on_pre_optimizer_step`` the gradients are already clipped to
    ``max_grad_norm``, and the Trainer's running loss (the private ``_tr_loss``) has a NaN step replaced by the mean of
    earlier ones when ``logging_nan_inf_filter`` is on (the default). ``StepWatch(trainer)`` wraps, on this trainer
    instance only, the two public calls that produce them: ``trainer.training_step`` (each return value, the loss
    the Trainer accumulates, NaN included, is summed on the device) and ``trainer.accelerator.clip_grad_norm_``
    (through which the Trainer clips, or with ``max_grad_norm=0`` measures, the gradients; its return value is the
    norm before clipping). It is opt-in and reversible: ``remove()`` puts both attributes back as they were.

    ``reset()`` at the start of a step; then ``loss`` is the sum of the step's ``training_step`` returns (a 0-dim
    tensor, ``None`` if none ran) and ``grad_norm`` the last pre-clipping norm (``None`` if no clip ran, e.g. a
    Trainer path that does not clip through accelerate).

    Example (as ``SpikeGuardCallback`` uses it)::

        watch = StepWatch(trainer)  # on_train_begin
        watch.reset()  # on_step_begin
        loss, grad_norm = watch.loss, watch.grad_norm  # on_pre_optimizer_step
        watch.remove()  # on_train_end
    """

    def __init__(self, trainer):
        self.loss: torch.Tensor | None = None
        self.grad_norm: float | None = None
        self._patched = []
        self._wrap(trainer, "training_step", self._on_training_step)
        self._wrap(trainer.accelerator, "clip_grad_norm_", self._on_clip)

    def _wrap(self, owner, name: str, record) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            record(result)
            return result

        self._patched.append((owner, name, vars(owner).get(name)))
        setattr(owner, name, wrapper)

    def _on_training_step(self, loss) -> None:
        loss = torch.as_tensor(loss).detach().float().reshape(())
        self.loss = loss if self.loss is None else self.loss + loss.to(self.loss.device)

    def _on_clip(self, norm) -> None:
        if norm is not None:
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor (FSDP2)
            self.grad_norm = float(norm)

    def reset(self) -> None:
        self.loss, self.grad_norm = None, None

    def remove(self) -> None:
        for owner, name, previous in reversed(self._patched):
            if previous is None:
                vars(owner).pop(name, None)
            else:
                setattr(owner, name, previous)
        self._patched = []
