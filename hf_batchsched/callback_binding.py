"""How an ``hf_batchsched`` callback attaches to a trainer and keeps its state in the trainer's checkpoints.

A leaf (imports only ``errors``), so that the trainer package and every callback can use it without an import cycle.

Binding
-------
How a callback finds its trainer: given at construction, or bound later by :func:`bind_callbacks`.

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

Checkpoint state
----------------
Callback state that travels with Trainer checkpoints: one place for every stateful ``hf_batchsched`` callback.

A callback stores a JSON-ready dict (its ``state_dict()``) in ``TrainerState.stateful_callbacks[key]`` whenever it
changes (at the latest in ``on_step_end``, which runs before the Trainer saves a checkpoint), and reads it back in
``on_train_begin``: on ``train(resume_from_checkpoint=...)`` the Trainer has loaded ``trainer_state.json`` by then.

``key`` is ``"hf_batchsched.<ClassName>"``, never a bare class name, so the Trainer's own
``restore_callback_states_from_checkpoint`` (which would rebuild callbacks without their ``trainer`` argument)
leaves it alone; the callbacks therefore work with that option on or off.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

__all__ = [
    "TrainerBoundCallback",
    "bind_callbacks",
    "check_chunk_listeners_added",
    "load_callback_state",
    "save_callback_state",
]


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
        note = getattr(trainer, "note_bound_callback", None)  # BatchRampMixin: refuses at train() one never added
        if callable(note):
            note(self)
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


def check_chunk_listeners_added(bound: list, callbacks: list) -> None:
    """Refuse a callback ``bound`` to a trainer that listens to the micro-chunk events but is not in its
    ``callbacks`` list (it would never hear them)."""
    for callback in bound:
        listens = hasattr(callback, "on_micro_chunk_end") or hasattr(callback, "on_step_batch_end")
        if listens and callback not in callbacks:
            raise ConfigError(
                f"{type(callback).__name__} is bound to this trainer but not in its callback list, so it would "
                "hear no micro-chunk event; call trainer.add_callback(callback) so it can also log and save its "
                "state"
            )


def save_callback_state(state: Any, key: str, value: dict) -> None:
    """Store ``value`` (JSON-ready) in ``TrainerState.stateful_callbacks[key]``: it is written to every
    checkpoint's ``trainer_state.json`` and read back on ``train(resume_from_checkpoint=...)``.

    >>> from transformers import TrainerState
    >>> state = TrainerState()
    >>> save_callback_state(state, "hf_batchsched.Demo", {"n": 1})
    >>> load_callback_state(state, "hf_batchsched.Demo"), load_callback_state(state, "hf_batchsched.Other")
    ({'n': 1}, None)
    """
    if state.stateful_callbacks is None:
        state.stateful_callbacks = {}
    state.stateful_callbacks[key] = value


def load_callback_state(state: Any, key: str) -> dict | None:
    """The value stored by :func:`save_callback_state` in the (possibly resumed) ``TrainerState``, or ``None``."""
    stored = state.stateful_callbacks
    return stored.get(key) if isinstance(stored, dict) else None
