"""How a callback finds its trainer: given at construction, or bound later by :func:`bind_callbacks`.

Hugging Face users pass callbacks as ``Trainer(..., callbacks=[SharpnessProbeCallback()])`` (an instance, or the
class, which the ``CallbackHandler`` instantiates without arguments) or ``trainer.add_callback(...)``; neither form
hands the callback the trainer, and no callback event passes it either (``on_train_begin`` gets ``model``,
``optimizer``, ``lr_scheduler``, ``train_dataloader``, ``processing_class``). So every ``hf_batchsched`` callback
takes the trainer as an optional first argument and checks the options it can check at once; what depends on the
trainer (its model, datasets, evaluation settings) is checked when it is bound:

- ``XCallback(trainer, ...)``: bound at construction (the original form);
- ``BatchRampTrainer`` (any ``BatchRampMixin`` trainer) binds the callbacks of its list at the end of ``__init__``
  and each callback given to ``add_callback`` afterwards;
- a plain ``Trainer``: ``bind_callbacks(trainer)`` after creating it. A callback still unbound at ``train()`` stops it
  at ``on_train_begin`` with a one-line ``ConfigError`` saying this.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

__all__ = ["TrainerBoundCallback", "bind_callbacks"]


class TrainerBoundCallback:
    """Base of the callbacks that need their trainer (mixed in before ``transformers.TrainerCallback``)."""

    _trainer: Any = None

    @property
    def trainer(self) -> Any:
        """The bound trainer; a ``ConfigError`` that says how to bind it when there is none."""
        if self._trainer is None:
            name = type(self).__name__
            raise ConfigError(
                f"{name} has no trainer: with a plain transformers.Trainer call "
                f"hf_batchsched.bind_callbacks(trainer) after creating it, or pass it as {name}(trainer, ...); "
                "BatchRampTrainer binds its callbacks itself"
            )
        return self._trainer

    @property
    def is_bound(self) -> bool:
        return self._trainer is not None

    def bind(self, trainer: Any) -> TrainerBoundCallback:
        """Attach ``trainer`` and run the checks that need it; binding the same trainer again does nothing."""
        if self._trainer is trainer:
            return self
        name = type(self).__name__
        if self._trainer is not None:
            raise ConfigError(f"this {name} is already bound to another trainer; create one {name} per trainer")
        if not (hasattr(trainer, "args") and hasattr(trainer, "model") and hasattr(trainer, "log")):
            raise ConfigError(
                f"{name} needs a transformers.Trainer as its first argument, got {type(trainer).__name__}; pass the "
                "other options by keyword"
            )
        self._trainer = trainer
        try:
            self._bind(trainer)
        except BaseException:
            self._trainer = None
            raise
        return self

    def _bind(self, trainer: Any) -> None:
        """The checks and set-up that need the trainer (``self.trainer`` is set when this runs)."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer  # noqa: B018 - raises the one-line ConfigError when the callback was never bound


def bind_callbacks(trainer: Any) -> Any:
    """Bind the ``hf_batchsched`` callbacks of ``trainer``'s callback list that have no trainer yet; returns it.

    Needed for callbacks given to a plain ``transformers.Trainer`` without the trainer argument (``BatchRampTrainer``
    calls it itself)::

        trainer = bind_callbacks(Trainer(model=model, args=args, train_dataset=data,
                                         callbacks=[SharpnessProbeCallback(every_n_steps=200)]))
    """
    for callback in list(trainer.callback_handler.callbacks):
        if isinstance(callback, TrainerBoundCallback):
            callback.bind(trainer)
    return trainer
