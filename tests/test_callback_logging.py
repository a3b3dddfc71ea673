"""Every logging callback keeps the Trainer's own training log: ``loss`` is in ``log_history`` at every logging step.

In transformers 5.x ``Trainer.log`` fires ``on_log``, and ``CallbackHandler.on_log`` sets ``control.should_log =
False``. A callback that calls ``trainer.log`` from ``on_step_end`` (or ``on_epoch_end``) on a logging step runs
before the Trainer's ``_maybe_log_save_evaluate`` and, without ``hf_batchsched.trainer.log_metrics``,
silently cancels the Trainer's ``loss``/``grad_norm``/``learning_rate`` entry for that step. Each case below trains
a tiny model for 4 steps with ``logging_steps=1`` and the callback logging on (some of) those same steps.
"""

from __future__ import annotations

import pathlib
import re
from types import SimpleNamespace

import pytest
from helpers import tiny_training_args
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import TrainerControl

from hf_batchsched.assets import digits_image_dataset, synthetic_lm_dataset, tiny_llama, tiny_resnet
from hf_batchsched.callbacks import (
    BNRecalibrationCallback,
    LRMonitorCallback,
    NoiseScaleCallback,
    PlateauCallback,
    SharpnessProbeCallback,
    SpikeGuardCallback,
    StabilityMonitorCallback,
)
from hf_batchsched.trainer import BatchRampTrainer, log_metrics

MAX_STEPS = 4
ROOT = pathlib.Path(__file__).resolve().parents[1]
# the metric tables live on the docs pages the README links
README = "\n".join(page.read_text() for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
PREFIXES = ("batchsched/", "sharpness/", "bn/", "stability/", "lr/", "guard/")


def undocumented(keys) -> list[str]:
    """Logged metric names the README does not document (per-layer names match a `prefix/<placeholder>` row)."""
    missing = []
    for key in keys:
        if not key.startswith(PREFIXES) or f"`{key}`" in README:
            continue
        head, _, tail = key.rpartition("/")
        stem = re.sub(r"\d+$", "<", key)
        if f"`{head}/<" not in README and not (stem.endswith("<") and f"`{stem}" in README):
            missing.append(key)
    return sorted(set(missing))


def _args(tmp_path, **overrides) -> TrainingArguments:
    return tiny_training_args(tmp_path, **{"max_steps": MAX_STEPS, "per_device_eval_batch_size": 8, **overrides})


def _lm_trainer(tmp_path, **overrides) -> Trainer:
    data = synthetic_lm_dataset(num_samples=32, seq_len=8)
    return Trainer(model=tiny_llama(seed=0), args=_args(tmp_path, **overrides), train_dataset=data, eval_dataset=data)


def _sharpness(tmp_path):
    trainer = _lm_trainer(tmp_path)
    callback = SharpnessProbeCallback(
        trainer,
        every_n_steps=2,
        on_evaluate=False,
        num_probe_samples=4,
        probe_batch_size=4,
        num_samples=4,
        budget=None,
    )
    return trainer, callback, "sharpness/avg", [2, 4]


def _stability(tmp_path):
    trainer = _lm_trainer(tmp_path)
    return trainer, StabilityMonitorCallback(trainer, every_n_steps=2), "stability/loss_spikes", [2, 4]


def _bn_recalibration(tmp_path):
    # Recalibrates in on_step_end right before each evaluation (steps 2 and 4), i.e. on logging steps.
    data = digits_image_dataset(num_samples=32)
    args = _args(tmp_path, eval_strategy="steps", eval_steps=2, optim="sgd", learning_rate=0.05)
    trainer = Trainer(model=tiny_resnet(seed=0), args=args, train_dataset=data, eval_dataset=data)
    callback = BNRecalibrationCallback(trainer, num_batches=1, on_train_end=False)
    return trainer, callback, "bn/recalibration_samples", [2, 4]


def _noise_scale(tmp_path):
    data = synthetic_lm_dataset(num_samples=64, seq_len=8)
    trainer = BatchRampTrainer(
        model=tiny_llama(seed=0), args=_args(tmp_path), train_dataset=data, batch_schedule=8, max_micro_batch_size=4
    )
    return trainer, NoiseScaleCallback(trainer, beta=0.5), "batchsched/noise_scale", [1, 2, 3, 4]


def _plateau(tmp_path):
    trainer = _lm_trainer(tmp_path, eval_strategy="steps", eval_steps=2)
    return trainer, PlateauCallback(trainer, patience=0), "lr/plateau_events", [2, 4]


def _spike_guard(tmp_path):
    trainer = _lm_trainer(tmp_path)
    return trainer, SpikeGuardCallback(trainer, window=4, min_history=2), "guard/skipped_steps", [1, 2, 3, 4]


def _lr_monitor(tmp_path):
    trainer = _lm_trainer(tmp_path)
    return trainer, LRMonitorCallback(trainer), "lr/group_0", [1, 2, 3, 4]


CASES = {
    "sharpness": _sharpness,
    "stability": _stability,
    "bn_recalibration": _bn_recalibration,
    "noise_scale": _noise_scale,
    "plateau": _plateau,
    "spike_guard": _spike_guard,
    "lr_monitor": _lr_monitor,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_trainer_loss_survives_callback_logging(name, tmp_path):
    trainer, callback, key, expected_steps = CASES[name](tmp_path)
    trainer.add_callback(callback)
    trainer.train()

    history = trainer.state.log_history
    loss_steps = [entry["step"] for entry in history if "loss" in entry]
    assert loss_steps == list(range(1, MAX_STEPS + 1)), f"the Trainer's own loss log was swallowed: {history}"
    train_logs = [entry for entry in history if "loss" in entry]
    assert all("learning_rate" in entry and "grad_norm" in entry for entry in train_logs)
    callback_steps = sorted({entry["step"] for entry in history if key in entry})
    assert set(expected_steps) <= set(callback_steps), f"{key} missing at some of steps {expected_steps}: {history}"
    logged = {k for entry in history for k in entry}
    assert key in logged
    assert not undocumented(logged), f"metric names missing from the README's tables: {undocumented(logged)}"


def test_log_metrics_restores_a_pending_log_flag():
    """Unit level: the flag ``on_log`` clears is put back when (and only when) it was set before."""
    calls = []

    class FakeTrainer:
        control = TrainerControl()
        state = SimpleNamespace(log_history=[])

        def log(self, logs):
            calls.append(dict(logs))
            self.control.should_log = False  # what CallbackHandler.on_log does

    trainer = FakeTrainer()
    trainer.control.should_log = True
    log_metrics(trainer, {"a/b": 1.0})
    assert trainer.control.should_log and calls == [{"a/b": 1.0}]
    trainer.control.should_log = False
    log_metrics(trainer, {"a/b": 2.0})
    assert not trainer.control.should_log and calls[-1] == {"a/b": 2.0}


def test_log_metrics_converts_tensors_and_skips_empty_logs():
    import torch

    calls = []
    trainer = SimpleNamespace(control=TrainerControl(), log=lambda logs: calls.append(logs))
    log_metrics(trainer, {})
    assert calls == []
    log_metrics(trainer, {"x": torch.tensor(2.5), "n": torch.tensor(3), "y": 1})
    assert calls == [{"x": 2.5, "n": 3, "y": 1}] and type(calls[0]["x"]) is float and type(calls[0]["n"]) is int


class _LogFrom(TrainerCallback):
    """Logs ``probe/x`` from ``event``, with a plain ``trainer.log`` or with ``log_metrics``."""

    def __init__(self, trainer, event: str, helper: bool):
        self.trainer, self.helper = trainer, helper
        setattr(self, event, self._log)

    def _log(self, args, state, control, **kwargs):
        logs = {"probe/x": float(state.global_step)}
        log_metrics(self.trainer, logs) if self.helper else self.trainer.log(logs)


@pytest.mark.parametrize("helper", [False, True], ids=["plain_trainer_log", "log_metrics"])
@pytest.mark.parametrize(
    ("event", "strategy"), [("on_step_end", "steps"), ("on_epoch_end", "epoch")], ids=["step_end", "epoch_end"]
)
def test_which_events_swallow_the_trainer_log(tmp_path, event, strategy, helper):
    """The mechanism in the installed transformers: a plain ``trainer.log`` from ``on_step_end`` (logging_steps) or
    ``on_epoch_end`` (logging_strategy="epoch") drops that step's training log; ``log_metrics`` keeps it. (If the
    plain case starts passing, transformers changed and the helper's docstring needs a look.)"""
    data = synthetic_lm_dataset(num_samples=8, seq_len=8)
    args = _args(tmp_path, max_steps=-1, num_train_epochs=2, logging_strategy=strategy)
    trainer = Trainer(model=tiny_llama(seed=0), args=args, train_dataset=data)
    trainer.add_callback(_LogFrom(trainer, event, helper))
    trainer.train()
    loss_steps = [entry["step"] for entry in trainer.state.log_history if "loss" in entry]
    probe_steps = {entry["step"] for entry in trainer.state.log_history if "probe/x" in entry}
    expected = [2, 4] if strategy == "epoch" else [1, 2, 3, 4]  # 8 samples at 4 per step: 2 steps per epoch
    assert set(expected) <= probe_steps
    if helper:
        assert loss_steps == expected
    else:
        assert loss_steps == [], "transformers no longer swallows the log: revisit trainer.log_metrics"
