"""Callback state that travels with Trainer checkpoints: one place for every stateful ``hf_batchsched`` callback.

A callback stores a JSON-ready dict (its ``state_dict()``) in ``TrainerState.stateful_callbacks[key]`` whenever it
changes (at the latest in ``on_step_end``, which runs before the Trainer saves a checkpoint), and reads it back in
``on_train_begin``: on ``train(resume_from_checkpoint=...)`` the Trainer has loaded ``trainer_state.json`` by then.

``key`` is ``"hf_batchsched.<ClassName>"``, never a bare class name, so the Trainer's own
``restore_callback_states_from_checkpoint`` (which would rebuild callbacks without their ``trainer`` argument)
leaves it alone; the callbacks therefore work with that option on or off.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_callback_state", "save_callback_state"]


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
