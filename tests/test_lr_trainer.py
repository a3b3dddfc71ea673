"""Formula-based LR policies driving a real Trainer's optimizer (BatchRampTrainer(lr_policy=...)).

The invariant: the LR the optimizer applies at every update equals the pure function
``group_lrs_at(policy, clock_before_the_step, initial_lrs)``, on the steps and the samples clock, across resume, and
with per-group LRs (LoRA+).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from helpers import tiny_training_args
from transformers import PrinterCallback, TrainerCallback

from hf_batchsched.assets import synthetic_lm_dataset, tiny_llama
from hf_batchsched.callbacks.lr_monitor import LRMonitorCallback, param_group_lrs
from hf_batchsched.clock import TrainingClock
from hf_batchsched.errors import ConfigError
from hf_batchsched.schedules.base import Policy
from hf_batchsched.schedules.lr import group_lrs_at
from hf_batchsched.schedules.lr_config import LR_POLICIES, lr_policy_from_config, make_lr_policy
from hf_batchsched.schedules.scheduler import PolicyLRScheduler
from hf_batchsched.trainer import BatchRampTrainer

# A ramp (4 -> 8 samples per step), so the samples clock is not a multiple of the steps clock.
RAMP = {"schedule": lambda consumed: 4 if consumed < 16 else 8}


def ramp(consumed: int) -> int:
    return 4 if consumed < 16 else 8


def make_trainer(tmp_path, lr_policy=None, model=None, optimizers=(None, None), **overrides):
    trainer = BatchRampTrainer(
        model=model or tiny_llama(seed=0),
        args=tiny_training_args(tmp_path / "out", **{"max_steps": 8, **overrides}),
        train_dataset=synthetic_lm_dataset(64, seq_len=8),
        batch_schedule=ramp,
        max_micro_batch_size=4,
        lr_policy=lr_policy,
        optimizers=optimizers,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


class StepRecorder(TrainerCallback):
    """Clock reading (in ``unit``) before each step and the LR of every group at its optimizer update."""

    def __init__(self, trainer, unit):
        self.trainer, self.unit = trainer, unit
        self.clock_values: list[float] = []
        self.lrs: list[list[float]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.clock_values.append(self.trainer.clock.value(self.unit))

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.lrs.append(param_group_lrs(self.trainer.optimizer))


def expected_lrs(policy, clock_values, initial_lrs):
    return [group_lrs_at(policy, t, initial_lrs) for t in clock_values]


def flat(rows):
    return [value for row in rows for value in row]


# --------------------------------------------------------------------------------------------------
# Every registered policy through PolicyLRScheduler (cheap: no Trainer)
# --------------------------------------------------------------------------------------------------

SAMPLE_PARAMS = {
    "k0": 1e-4,
    "k1": 1e-3,
    "gamma": 0.9,
    "p": 2.0,
    "l": 10,
    "total": 40,
    "timescale": 10,
    "num_warmup": 4,
    "num_stable": 10,
    "num_decay": 20,
    "factor": 0.5,
    "warmup": 4,
    "policy": {"name": "FIX", "k0": 1e-3},
    "boundaries": [10],
    "regions": [{"name": "FIX", "k0": 1e-3}, {"name": "EXP", "k0": 1e-3, "gamma": 0.9}],
    "policies": [{"name": "FIX", "k0": 1e-3}, {"name": "linear_decay", "total": 40}],
}


def sample_config(name: str) -> dict:
    signature = inspect.signature(LR_POLICIES.get(name))
    config = {"name": name}
    for param in signature.parameters.values():
        if param.name == "unit" or param.default is not param.empty:
            continue
        if param.name not in SAMPLE_PARAMS:
            pytest.fail(f"add a sample value for parameter {param.name!r} of LR policy {name!r}")
        config[param.name] = [5, 10] if (name == "NSTEP" and param.name == "l") else SAMPLE_PARAMS[param.name]
    return config


@pytest.mark.parametrize("name", LR_POLICIES.names())
def test_every_registered_policy_drives_an_optimizer(name):
    policy = lr_policy_from_config(sample_config(name))
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": params[:1], "lr": 2e-4}, {"params": params[1:], "lr": 3.2e-3}])
    clock = TrainingClock()
    scheduler = PolicyLRScheduler(optimizer, policy, clock)
    for _ in range(30):
        expected = group_lrs_at(policy, clock.value("steps"), [2e-4, 3.2e-3])
        assert param_group_lrs(optimizer) == pytest.approx(expected, rel=1e-12, abs=0)
        optimizer.step()
        clock.advance(samples=4)
        scheduler.step()


# --------------------------------------------------------------------------------------------------
# In a real Trainer, on the steps and samples clocks
# --------------------------------------------------------------------------------------------------

TRAINER_CASES = [
    ({"name": "COS", "k0": 1e-5, "k1": 1e-3, "l": 6}, "steps"),
    ({"name": "wsd", "num_warmup": 8, "num_stable": 16, "num_decay": 24, "min_lr_ratio": 0.1}, "samples"),
    ({"name": "warmup", "warmup": 8, "policy": {"name": "NSTEP", "k0": 1e-3, "gamma": 0.5, "l": [8, 24]}}, "samples"),
    (make_lr_policy("one_cycle", total=7, pct_start=0.3), "steps"),  # a Policy object, not a config
    ({"name": "cosine", "total": 1.0, "min_lr_ratio": 0.1}, "fraction"),
]


@pytest.mark.parametrize("config,unit", TRAINER_CASES, ids=lambda value: str(getattr(value, "name", value))[:40])
def test_policy_drives_trainer_optimizer(tmp_path, config, unit):
    policy = config if isinstance(config, Policy) else lr_policy_from_config({**config, "unit": unit})
    trainer = make_trainer(tmp_path, lr_policy=config if isinstance(config, Policy) else {**config, "unit": unit})
    recorder = StepRecorder(trainer, unit)
    trainer.add_callback(recorder)
    trainer.train()
    assert len(recorder.lrs) == 8
    initial = [1e-3] * len(recorder.lrs[0])  # the Trainer's decay / no-decay groups
    assert flat(recorder.lrs) == pytest.approx(flat(expected_lrs(policy, recorder.clock_values, initial)), rel=1e-12)
    if unit == "samples":  # the ramp made the samples clock non-uniform in steps
        assert recorder.clock_values == [0, 4, 8, 12, 16, 24, 32, 40]
    assert len(set(flat(recorder.lrs))) > 1  # the schedule moved


def test_resume_continues_the_schedule_exactly(tmp_path):
    config = {"name": "warmup", "warmup": 8, "unit": "samples", "policy": {"name": "cosine", "total": 40}}
    full = make_trainer(tmp_path / "full", lr_policy=config)
    full_recorder = StepRecorder(full, "samples")
    full.add_callback(full_recorder)
    full.train()

    first = make_trainer(tmp_path / "split", lr_policy=config, save_strategy="steps", save_steps=5)
    first.train()
    resumed = make_trainer(tmp_path / "split", lr_policy=config)
    recorder = StepRecorder(resumed, "samples")
    resumed.add_callback(recorder)
    resumed.train(resume_from_checkpoint=str(tmp_path / "split" / "out" / "checkpoint-5"))
    assert recorder.clock_values == full_recorder.clock_values[5:]
    assert flat(recorder.lrs) == flat(full_recorder.lrs[5:])  # bit-for-bit: the LR is a pure function of the clock


def test_loraplus_group_ratios_kept_and_monitored(tmp_path):
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    model = peft.get_peft_model(
        tiny_llama(seed=0), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    initial = param_group_lrs(optimizer)
    assert 1e-3 in initial and pytest.approx(16e-3) in initial  # LoRA+'s B matrices learn 16x faster
    policy = {"name": "COS", "k0": 1e-5, "k1": 1e-3, "l": 7}
    trainer = make_trainer(tmp_path, lr_policy=policy, model=model, optimizers=(optimizer, None))
    recorder = StepRecorder(trainer, "steps")
    trainer.add_callback(recorder)
    trainer.add_callback(LRMonitorCallback(trainer))
    trainer.train()
    expected = expected_lrs(lr_policy_from_config(policy), recorder.clock_values, initial)
    assert flat(recorder.lrs) == pytest.approx(flat(expected), rel=1e-12)
    for row in recorder.lrs:  # ratios kept at every step
        assert [lr / row[0] for lr in row] == pytest.approx([lr / initial[0] for lr in initial], rel=1e-12)
    monitored = [log for log in trainer.state.log_history if "lr/group_0" in log]
    assert len(monitored) == 8
    assert [[log[f"lr/group_{i}"] for i in range(len(initial))] for log in monitored] == recorder.lrs
    assert all("loss" in log for log in trainer.state.log_history[: 2 * 8 : 2])  # the Trainer's own log survives


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_multiplier_policy_without_base_lr_is_an_error(tmp_path):
    trainer = make_trainer(tmp_path, lr_policy={"name": "constant"}, learning_rate=0.0)
    with pytest.raises(ConfigError, match=r"'constant' is a multiplier .* starts at lr=0.0, so every learning rate"):
        trainer.train()
    # An absolute-LR policy keeps the groups' ratios to group 0, which are undefined at 0.
    trainer = make_trainer(tmp_path, lr_policy={"name": "FIX", "k0": 1e-3}, learning_rate=0.0)
    with pytest.raises(ConfigError, match=r"keeps the other groups' ratios .* set a learning rate > 0"):
        trainer.train()


def _negative(t: float) -> float:
    return -1e-3


def _nan(t: float) -> float:
    return math.nan


def _below_zero_after_ten(t: float) -> float:
    return 1e-3 - 1e-4 * t


def _snapshot(optimizer) -> list[dict]:
    return [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]


@pytest.mark.parametrize(("fn", "shown"), [(_negative, "-0.001"), (_nan, "nan")])
def test_negative_lr_from_a_policy_is_an_error(fn, shown):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    before = _snapshot(optimizer)
    with pytest.raises(
        ConfigError, match=rf"'{fn.__name__}' gives learning rate {shown} for param group 0 at steps = 0"
    ):
        PolicyLRScheduler(optimizer, Policy(fn.__name__, fn), TrainingClock())
    assert _snapshot(optimizer) == before  # not even ``initial_lr`` was written


def test_lr_going_negative_mid_run_leaves_the_optimizer_as_it_was():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": params[:1], "lr": 1e-3}, {"params": params[1:], "lr": 2e-3}])
    clock = TrainingClock()
    policy = Policy("overshoot", _below_zero_after_ten, unit="samples")
    scheduler = PolicyLRScheduler(optimizer, policy, clock)
    optimizer.step()
    clock.advance(samples=8)
    scheduler.step()
    before, last_epoch = _snapshot(optimizer), scheduler.last_epoch
    assert [group["lr"] for group in before] == pytest.approx([2e-4, 4e-4])
    clock.advance(samples=3)
    message = r"'overshoot' gives learning rate -0.0001 for param group 0 at samples = 11 \(optimizer step 2\)"
    with pytest.raises(ConfigError, match=message):
        scheduler.step()
    assert _snapshot(optimizer) == before and scheduler.last_epoch == last_epoch
    assert scheduler.get_last_lr() == pytest.approx([2e-4, 4e-4])


def test_negative_lr_policy_stops_a_trainer_run(tmp_path):
    # A linear decay that crosses 0 at 10 samples: the LR for the step starting at 12 samples is refused before the
    # optimizer applies it.
    trainer = make_trainer(tmp_path, lr_policy=Policy("overshoot", _below_zero_after_ten, unit="samples"))
    with pytest.raises(ConfigError, match="at samples = 12 \\(optimizer step 3\\); learning rates must be finite"):
        trainer.train()
    assert trainer.clock.optimizer_steps == 3  # three good updates (from 0, 4, 8 samples), refused at the fourth
    assert min(group["lr"] for group in trainer.optimizer.param_groups) >= 0


def test_bad_policy_configs_raise_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown LR policy"):
        make_trainer(tmp_path, lr_policy={"name": "cosine_annealing"})
    with pytest.raises(ConfigError, match="must be > 0"):
        make_trainer(tmp_path, lr_policy={"name": "FIX", "k0": -1e-3})
