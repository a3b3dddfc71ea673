"""What the run reports about what the library changed or dropped: skipped probes, an LR policy next to the
Trainer's scheduler settings, the user's TrainingArguments, the run's real figures (passes, batch sizes, samples per
second), the plan message at the default log level, and one log entry per trl metric per step."""

from __future__ import annotations

import json
import logging
import os

import pytest
from test_trainer_ramp import RecordingCollator, indexed_dataset, make_args
from transformers import PrinterCallback

from hf_batchsched.assets import tiny_llama
from hf_batchsched.callbacks import LRMonitorCallback, SharpnessProbeCallback
from hf_batchsched.errors import ConfigError
from hf_batchsched.trainer import BatchRampTrainer

PLAN = [8, 8, 16, 16, 16, 16]  # 80 samples over 2.5 passes of 32 rows


def schedule(consumed: float) -> int:
    return 8 if consumed < 16 else 16


def ramp_trainer(tmp_path, args=None, **kwargs):
    args = args or make_args(tmp_path, num_train_epochs=2.5, logging_steps=1, **kwargs.pop("arg_overrides", {}))
    trainer = BatchRampTrainer(
        model=tiny_llama(seed=0),
        args=args,
        train_dataset=indexed_dataset(32),
        data_collator=RecordingCollator(),
        batch_schedule=kwargs.pop("batch_schedule", schedule),
        max_micro_batch_size=4,
        **kwargs,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


# ---- sharpness probes skipped for budget ------------------------------------------------------------------------
def test_probes_skipped_for_budget_are_logged(tmp_path, caplog):
    """budget=1e-6: any measured probe cost exceeds it, so after the first probe every scheduled one is skipped."""
    trainer = ramp_trainer(tmp_path)
    options = dict(every_n_steps=1, on_evaluate=False, num_probe_samples=4, num_samples=2, budget=1e-6)
    trainer.add_callback(probe := SharpnessProbeCallback(trainer, **options))
    with caplog.at_level(logging.INFO, logger="hf_batchsched.callbacks.sharpness"):
        trainer.train()
    history = trainer.state.log_history
    assert [entry["step"] for entry in history if "sharpness/avg" in entry] == [1]
    skipped = {entry["step"]: entry["sharpness/skipped"] for entry in history if "sharpness/skipped" in entry}
    assert skipped == {step: step - 1 for step in range(2, len(PLAN) + 1)}  # the running count
    lines = [record.getMessage() for record in caplog.records if "skipped for budget" in record.getMessage()]
    assert len(lines) == len(PLAN) - 1 and all("\n" not in line for line in lines)
    assert probe.num_skipped == len(PLAN) - 1


# ---- lr_policy next to lr_scheduler_type / warmup ----------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [{"lr_scheduler_type": "cosine"}, {"warmup_steps": 3}, {"lr_scheduler_type": "constant"}],
    ids=["scheduler_type", "warmup_steps", "constant"],
)
def test_lr_policy_with_the_trainers_scheduler_settings_is_refused(tmp_path, overrides):
    policy = {"name": "FIX", "k0": 1e-3}
    with pytest.raises(ConfigError, match="lr_policy sets the learning rate of every step") as error:
        ramp_trainer(tmp_path, arg_overrides=overrides, lr_policy=policy)
    assert "\n" not in str(error.value) and next(iter(overrides)) in str(error.value)
    ramp_trainer(tmp_path, lr_policy=policy)  # the defaults are no conflict
    ramp_trainer(tmp_path, arg_overrides=overrides)  # nor the settings without a policy


# ---- the user's TrainingArguments --------------------------------------------------------------------------------
def test_users_training_arguments_are_not_changed(tmp_path):
    args = make_args(tmp_path, num_train_epochs=1, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    before = args.to_dict()
    trainer = ramp_trainer(tmp_path, args=args, batch_schedule=None)
    assert trainer.args is not args and trainer.args.gradient_accumulation_steps == 1  # the trainer's own copy
    trainer.train()
    assert args.to_dict() == before
    assert trainer.ramp_plan == [8] * 4  # 4 x 2 (accumulation) per step, as the user's arguments said


# ---- the run's real figures --------------------------------------------------------------------------------------
def test_run_reports_the_ramps_real_figures(tmp_path, caplog):
    overrides = {"save_strategy": "steps", "save_steps": 2}
    trainer = ramp_trainer(tmp_path / "full", arg_overrides=overrides)
    with caplog.at_level(logging.WARNING):  # the default level: Python shows WARNING and above without set-up
        trainer.train()
    assert trainer.ramp_plan == PLAN
    plan_lines = [r for r in caplog.records if r.getMessage().startswith("BatchRampTrainer: 6 optimizer steps")]
    assert len(plan_lines) == 1 and plan_lines[0].levelno >= logging.WARNING
    message = plan_lines[0].getMessage()
    assert "80 samples (2.5 passes over 32 rows)" in message and "global batch 8 -> 16" in message
    with open(os.path.join(tmp_path, "full", "checkpoint-6", "trainer_state.json")) as file:
        saved = json.load(file)
    assert saved["num_train_epochs"] == pytest.approx(2.5) and saved["train_batch_size"] == 4

    # Resume after 2 steps of 8: the rest is 4 steps of 16 = 64 samples, not 80 x 4/6 (constant-size steps).
    resumed = ramp_trainer(tmp_path / "resumed", arg_overrides=overrides)
    output = resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    metrics = output.metrics
    assert metrics["train_samples"] == 64
    # train_runtime is rounded to 0.1 ms and the rate to 3 decimals by transformers: 1% covers both
    assert metrics["train_samples_per_second"] == pytest.approx(64 / metrics["train_runtime"], rel=1e-2)
    assert resumed.state.log_history[-1]["train_samples"] == 64


# ---- trl metrics: one entry each per step ------------------------------------------------------------------------
def test_trl_metrics_appear_once_per_step(tmp_path):
    """SFTTrainer adds entropy / mean_token_accuracy to every log call until its own training log; the LR monitor's
    entry (from on_log) and the sharpness entry (from on_step_end, before the training log) must not take them."""
    pytest.importorskip("trl")
    from test_packed import trl_packing_trainer

    trainer = trl_packing_trainer(tmp_path, batch_schedule=4, max_micro_batch_size=2)
    options = dict(every_n_steps=2, on_evaluate=False, num_probe_samples=2, num_samples=2, budget=None)
    trainer.add_callback(LRMonitorCallback(trainer))
    trainer.add_callback(SharpnessProbeCallback(trainer, **options))
    trainer.train()
    history = trainer.state.log_history
    steps = trainer.state.global_step
    assert steps >= 3 and [e["step"] for e in history if "sharpness/avg" in e] == list(range(2, steps + 1, 2))
    assert [e["step"] for e in history if "lr/group_0" in e] == list(range(1, steps + 1))
    for metric in ("entropy", "mean_token_accuracy"):
        entries = [entry for entry in history if metric in entry]
        assert [entry["step"] for entry in entries] == list(range(1, steps + 1)), (metric, history)
        assert all("loss" in entry for entry in entries)  # in the Trainer's own training log
