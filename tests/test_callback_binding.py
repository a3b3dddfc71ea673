"""Callbacks passed the way Hugging Face users pass them: ``Trainer(..., callbacks=[XCallback()])`` (instance or
class) and ``trainer.add_callback(XCallback)``, with no trainer argument.

``BatchRampTrainer`` binds them; a plain ``Trainer`` binds them through ``hf_batchsched.bind_callbacks``; an unbound
one stops ``train()`` with a one-line ``ConfigError``. Each case trains a tiny model for 4 steps and checks that the
callback did its work (its metric in ``log_history``), which it cannot do without its trainer.
"""

from __future__ import annotations

import pytest
from helpers import tiny_training_args
from transformers import PrinterCallback, Trainer

import hf_batchsched
from hf_batchsched.assets import digits_image_dataset, synthetic_lm_dataset, tiny_llama, tiny_resnet
from hf_batchsched.callback_binding import bind_callbacks
from hf_batchsched.callbacks import (
    BNRecalibrationCallback,
    FreezeBNCallback,
    LRMonitorCallback,
    NoiseScaleCallback,
    PlateauCallback,
    SharpnessProbeCallback,
    SpikeGuardCallback,
    StabilityMonitorCallback,
)
from hf_batchsched.errors import ConfigError
from hf_batchsched.trainer import BatchRampTrainer

MAX_STEPS = 4

# name -> (callback class, options for the instance form, model kind, extra TrainingArguments, metric it logs or None)
CASES = {
    "sharpness": (
        SharpnessProbeCallback,
        dict(every_n_steps=2, on_evaluate=False, num_probe_samples=4, probe_batch_size=4, num_samples=2, budget=None),
        "lm",
        {},
        "sharpness/avg",
    ),
    "stability": (StabilityMonitorCallback, dict(every_n_steps=2), "lm", {}, "stability/loss_spikes"),
    "bn_recalibration": (
        BNRecalibrationCallback,
        dict(num_batches=1, on_train_end=False),
        "bn",
        {"eval_strategy": "steps", "eval_steps": 2},
        "bn/recalibration_samples",
    ),
    "freeze_bn": (FreezeBNCallback, dict(after_step=2, unfreeze_at_end=False), "bn", {}, None),
    "noise_scale": (NoiseScaleCallback, dict(beta=0.5), "lm", {}, "batchsched/noise_scale"),
    "plateau": (
        PlateauCallback,
        dict(patience=0),
        "lm",
        {"eval_strategy": "steps", "eval_steps": 2},
        "lr/plateau_events",
    ),
    "spike_guard": (SpikeGuardCallback, dict(window=4, min_history=2), "lm", {}, "guard/skipped_steps"),
    "lr_monitor": (LRMonitorCallback, {}, "lm", {}, "lr/group_0"),
}


def make_trainer(tmp_path, kind: str, extra_args: dict, callbacks, trainer_cls=BatchRampTrainer):
    if kind == "bn":
        data = digits_image_dataset(num_samples=32)
        model = tiny_resnet(seed=0)
        extra_args = {"optim": "sgd", "learning_rate": 0.05, **extra_args}
    else:
        data = synthetic_lm_dataset(num_samples=64, seq_len=8)
        model = tiny_llama(seed=0)
    args = tiny_training_args(
        tmp_path, max_steps=MAX_STEPS, per_device_train_batch_size=8, per_device_eval_batch_size=8, **extra_args
    )
    ramp = dict(batch_schedule=8, max_micro_batch_size=4) if trainer_cls is BatchRampTrainer else {}
    trainer = trainer_cls(model=model, args=args, train_dataset=data, eval_dataset=data, callbacks=callbacks, **ramp)
    trainer.remove_callback(PrinterCallback)
    return trainer


def found(trainer, cls):
    matches = [callback for callback in trainer.callback_handler.callbacks if isinstance(callback, cls)]
    assert len(matches) == 1, trainer.callback_handler.callbacks
    return matches[0]


def check_it_worked(trainer, callback, key):
    assert callback.trainer is trainer
    if key is not None:
        assert any(key in entry for entry in trainer.state.log_history), trainer.state.log_history
    else:  # FreezeBNCallback logs nothing: its BN layers are frozen from step 2 and stay so (unfreeze_at_end=False)
        assert callback.frozen


@pytest.mark.parametrize("name", sorted(CASES))
def test_instance_in_callbacks_list_of_batch_ramp_trainer(tmp_path, name):
    cls, options, kind, extra_args, key = CASES[name]
    callback = cls(**options)
    trainer = make_trainer(tmp_path, kind, extra_args, [callback])
    assert found(trainer, cls) is callback and callback.trainer is trainer  # bound at __init__
    trainer.train()
    check_it_worked(trainer, callback, key)


@pytest.mark.parametrize("name", sorted(CASES))
def test_class_in_callbacks_list_and_add_callback(tmp_path, name):
    """``callbacks=[XCallback]``: the CallbackHandler builds it with no argument; the trainer binds it. Also the
    class given to ``add_callback`` after ``__init__``."""
    cls, _, kind, extra_args, _ = CASES[name]
    trainer = make_trainer(tmp_path, kind, extra_args, [cls])
    assert found(trainer, cls).trainer is trainer
    later = make_trainer(tmp_path / "later", kind, extra_args, None)
    later.add_callback(cls)
    assert found(later, cls).trainer is later
    later.train()
    assert later.state.global_step == MAX_STEPS


@pytest.mark.parametrize("name", sorted(set(CASES) - {"noise_scale"}))
def test_plain_trainer_with_bind_callbacks(tmp_path, name):
    cls, options, kind, extra_args, key = CASES[name]
    callback = cls(**options)
    trainer = bind_callbacks(make_trainer(tmp_path, kind, extra_args, [callback], trainer_cls=Trainer))
    trainer.train()
    check_it_worked(trainer, callback, key)


def test_unbound_callback_on_plain_trainer_is_refused_at_train(tmp_path):
    trainer = make_trainer(tmp_path, "lm", {}, [SpikeGuardCallback()], trainer_cls=Trainer)
    with pytest.raises(ConfigError, match=r"hf_batchsched.bind_callbacks\(trainer\)") as error:
        trainer.train()
    assert "\n" not in str(error.value) and trainer.state.global_step == 0


def test_binding_checks_and_old_form(tmp_path):
    # NoiseScaleCallback needs the ramp's micro-chunks: a plain Trainer is refused when it is bound
    plain = make_trainer(tmp_path, "lm", {}, [NoiseScaleCallback()], trainer_cls=Trainer)
    with pytest.raises(ConfigError, match="needs a BatchRampTrainer"):
        hf_batchsched.bind_callbacks(plain)
    # the trainer-dependent checks run at binding: evaluation off
    with pytest.raises(ConfigError, match="evaluation is off"):
        make_trainer(tmp_path / "p", "lm", {}, [PlateauCallback()])
    # one callback, two trainers
    first = make_trainer(tmp_path / "a", "lm", {}, None)
    callback = LRMonitorCallback(first)  # the original form
    first.add_callback(callback)  # the same trainer again: nothing to do
    assert callback.trainer is first
    with pytest.raises(ConfigError, match="already bound to another trainer"):
        make_trainer(tmp_path / "b", "lm", {}, [callback])
    # options given positionally where the trainer goes
    with pytest.raises(ConfigError, match="first argument"):
        SharpnessProbeCallback(("avg",))
