"""``BatchRampTrainer(couple=...)``: LR, AdamW weight decay and Adam betas coupled to the batch size."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import run_torchrun
from test_trainer_ramp import logged, make_trainer, train_losses
from transformers import TrainerCallback

from hf_batchsched import Coupling
from hf_batchsched.coupling import resolve_coupling
from hf_batchsched.errors import ConfigError
from hf_batchsched.schedules.adaptive import AdaptiveBatchSchedule

torch.set_num_threads(1)


def jump(consumed: float) -> int:
    """4, 4, then 16 (a 4x jump at sample 8); one pass over 32 rows ends with a partial step of 8 (2x)."""
    return 4 if consumed < 8 else 16


class StepRecorder(TrainerCallback):
    """Records each param group's (lr, weight_decay, betas) as the optimizer's ``step`` sees them (a torch step
    pre-hook, so after every callback), and the scheduler's LR of that step."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.steps: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        inner = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)

        def hook(optimizer, *_):
            self.steps.append(
                {
                    "batch": self.trainer.last_batch_size,
                    "scheduler_lr": self.trainer.lr_scheduler.get_last_lr()[0],
                    "groups": [
                        (group["lr"], group.get("weight_decay"), *group.get("betas", ()))
                        for group in optimizer.param_groups
                    ],
                }
            )

        self._handle = inner.register_step_pre_hook(hook)

    def on_train_end(self, args, state, control, **kwargs):
        self._handle.remove()


COUPLE = "lr=sqrt,wd,betas"
ADAMW = {"weight_decay": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.999, "lr_scheduler_type": "constant"}


def coupled_trainer(tmp_path, couple, **overrides):
    trainer = make_trainer(
        tmp_path, batch_schedule=jump, max_micro_batch_size=4, couple=couple, arg_overrides={**ADAMW, **overrides}
    )
    recorder = StepRecorder(trainer)
    trainer.add_callback(recorder)
    return trainer, recorder


# ---- the rules against their formulas ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "couple, lr4, wd4",
    [
        # hand-computed for B: 4 -> 16 (k = 4) at lr 1e-3, lambda 0.1: sqrt: lr x 2, lambda x 4 / 2
        ("lr=sqrt,wd,betas", 2e-3, 0.2),
        # linear: lr x 4, lambda x 4 / 4 (B / (lr lambda) fixed)
        ("lr=linear,wd,betas", 4e-3, 0.1),
        # no LR coupling: lambda x 4
        ({"weight_decay": True, "betas": True}, 1e-3, 0.4),
    ],
)
def test_rules_after_a_4x_jump(tmp_path, couple, lr4, wd4):
    trainer, recorder = coupled_trainer(tmp_path, couple)
    trainer.train()
    assert [step["batch"] for step in recorder.steps] == [4, 4, 16, 8]
    decay_group = recorder.steps[2]["groups"][0]
    # 0.9 ** 4 = 0.6561, 0.999 ** 4 = 0.996005996001 (hand-computed); rel 1e-12: a few float64 roundings
    assert decay_group[0] == pytest.approx(lr4, rel=1e-12)
    assert decay_group[1] == pytest.approx(wd4, rel=1e-12)
    assert decay_group[2:] == pytest.approx((0.6561, 0.996005996001), rel=1e-12)
    assert recorder.steps[2]["scheduler_lr"] == pytest.approx(1e-3, rel=1e-12)  # the scheduler's own LR
    # the last step is a partial 8 (k = 2): beta ** 2
    assert recorder.steps[3]["groups"][0][2:] == pytest.approx((0.81, 0.998001), rel=1e-12)
    for step in recorder.steps[:2]:  # k = 1: the optimizer's own values
        assert step["groups"][0] == pytest.approx((1e-3, 0.1, 0.9, 0.999), rel=1e-12)
    # the no-decay group (biases, norms) keeps weight decay 0 and the group's own LR ratio
    assert recorder.steps[2]["groups"][1][1] == 0.0
    assert recorder.steps[2]["groups"][1][0] == pytest.approx(lr4, rel=1e-12)
    # after the run the optimizer holds its uncoupled values again
    assert trainer.optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.1, rel=1e-12)
    assert tuple(trainer.optimizer.param_groups[0]["betas"]) == pytest.approx((0.9, 0.999), rel=1e-12)
    # logged metrics
    assert logged(trainer, "batchsched/lr_scale")[3] == pytest.approx(lr4 / 1e-3, rel=1e-12)
    assert logged(trainer, "batchsched/weight_decay")[3] == pytest.approx(wd4, rel=1e-12)
    assert logged(trainer, "batchsched/beta1")[3] == pytest.approx(0.6561, rel=1e-12)
    assert logged(trainer, "batchsched/beta2")[3] == pytest.approx(0.996005996001, rel=1e-12)


def test_lr_coupling_keeps_group_ratios_and_composes_with_the_scheduler(tmp_path):
    """Two groups at LRs 1e-3 and 4e-3 (LoRA+-style ratio 4) under a linear decay: both x 2 after the jump."""
    trainer, recorder = coupled_trainer(tmp_path, "lr=sqrt", lr_scheduler_type="linear")
    model = trainer.model
    names = [name for name, _ in model.named_parameters()]
    head = [p for name, p in model.named_parameters() if "lm_head" in name or "embed" in name]
    rest = [p for name, p in model.named_parameters() if not ("lm_head" in name or "embed" in name)]
    assert head and rest and len(head) + len(rest) == len(names)
    trainer.optimizer = torch.optim.AdamW([{"params": rest, "lr": 1e-3}, {"params": head, "lr": 4e-3}], lr=1e-3)
    trainer.train()
    for step in recorder.steps:
        scale = (step["batch"] / 4) ** 0.5
        lrs = [group[0] for group in step["groups"]]
        assert lrs[0] == pytest.approx(step["scheduler_lr"] * scale, rel=1e-12)
        assert lrs[1] / lrs[0] == pytest.approx(4.0, rel=1e-12)
    assert recorder.steps[2]["scheduler_lr"] < recorder.steps[0]["scheduler_lr"]  # the decay is still there


# ---- configs and refusals ------------------------------------------------------------------------------------------
def test_parse_forms():
    full = Coupling(lr="sqrt", weight_decay=True, betas=True)
    assert Coupling.parse("lr=sqrt, wd, betas") == full
    assert Coupling.parse({"lr": "sqrt", "wd": True, "betas": True}) == full
    assert Coupling.parse(full) is full
    assert Coupling.parse("none") is None and Coupling.parse("") is None and Coupling.parse({}) is None
    assert str(full) == "lr=sqrt,wd,betas" and Coupling.parse(str(full)) == full
    with pytest.raises(ConfigError, match="cannot read 'lr=cubic'|unknown couple lr 'cubic'"):
        Coupling.parse("lr=cubic")
    with pytest.raises(ConfigError, match="cannot read 'beta2'"):
        Coupling.parse("lr=sqrt,beta2")
    with pytest.raises(ConfigError, match="unknown key"):
        Coupling.parse({"momentum": True})


def test_adaptive_lr_scaling_is_the_lr_coupling():
    adaptive = AdaptiveBatchSchedule(8, 64, lr_scaling="sqrt")
    assert resolve_coupling(None, adaptive) == Coupling(lr="sqrt")
    assert resolve_coupling("wd", adaptive) == Coupling(lr="sqrt", weight_decay=True)
    assert resolve_coupling("lr=sqrt", adaptive) == Coupling(lr="sqrt")
    with pytest.raises(ConfigError, match="lr_scaling='sqrt' but couple has lr='linear'"):
        resolve_coupling("lr=linear", adaptive)


@pytest.mark.parametrize(
    "couple, optim, match",
    [
        ("betas", "sgd", "optimizer is SGD, which has no Adam betas"),
        ("wd", "sgd", "optimizer is SGD .no decoupled weight_decay"),
        ("wd", "adagrad", "optimizer is Adagrad"),
    ],
)
def test_refuses_optimizers_it_does_not_understand(tmp_path, couple, optim, match):
    trainer, _ = coupled_trainer(tmp_path, couple, optim=optim)
    with pytest.raises(ConfigError, match=match):
        trainer.train()


def test_refuses_weight_decay_coupling_without_weight_decay(tmp_path):
    trainer, _ = coupled_trainer(tmp_path, "wd", weight_decay=0.0)
    with pytest.raises(ConfigError, match="every param group has weight_decay 0"):
        trainer.train()


# ---- resume --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("checkpoint", [2, 3])
def test_resume_right_at_the_jump_reproduces_the_run(tmp_path, checkpoint):
    """Two passes: 4, 4, 16, 16, 16, 8. Resuming from step 2 (the jump is next) or 3 (right after it) gives the
    uninterrupted run's hyperparameters and losses."""
    overrides = {"num_train_epochs": 2, "save_strategy": "steps", "save_steps": 1}
    full, full_steps = coupled_trainer(tmp_path / "full", "lr=sqrt,wd,betas", **overrides)
    full.train()
    assert [step["batch"] for step in full_steps.steps] == [4, 4, 16, 16, 16, 8]
    resumed, resumed_steps = coupled_trainer(tmp_path / "resumed", "lr=sqrt,wd,betas", **overrides)
    resumed.train(resume_from_checkpoint=os.path.join(tmp_path / "full", f"checkpoint-{checkpoint}"))
    # the same float64 operations on the same values: equal to rounding (rel 1e-12)
    for ours, theirs in zip(resumed_steps.steps, full_steps.steps[checkpoint:], strict=True):
        assert ours["batch"] == theirs["batch"]
        for group, other in zip(ours["groups"], theirs["groups"]):
            assert group == pytest.approx(other, rel=1e-12)
    # same samples, same RNG state, same hyperparameters: the losses (the checkpoint's history, then the resumed
    # steps) agree to fp32 summation order
    assert len(train_losses(resumed)) == 6
    assert train_losses(resumed) == pytest.approx(train_losses(full), rel=1e-6)
    assert resumed.ramp_state_dict()["coupling"] == {
        "couple": {"lr": "sqrt", "weight_decay": True, "betas": True},
        "base_batch_size": 4,
    }


def test_resume_with_another_coupling_is_refused(tmp_path):
    overrides = {"save_strategy": "steps", "save_steps": 1}
    first, _ = coupled_trainer(tmp_path, "lr=sqrt", **overrides)
    first.train()
    second, _ = coupled_trainer(tmp_path, "lr=sqrt,betas", **overrides)
    with pytest.raises(ConfigError, match='couple: "lr=sqrt" -> "lr=sqrt,betas"'):
        second.train(resume_from_checkpoint=os.path.join(tmp_path, "checkpoint-3"))


# ---- DDP -----------------------------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_two_ddp_ranks_apply_the_single_process_hyperparameters(tmp_path):
    ranks = run_torchrun(os.path.join(os.path.dirname(__file__), "ddp_coupling_worker.py"), tmp_path / "ddp")
    single, recorder = coupled_trainer(tmp_path / "single", COUPLE)
    single.train()
    assert [r["world_size"] for r in ranks] == [2, 2]
    for rank in ranks:  # B0 is the global batch (4), not a rank's share: both ranks step with the same values
        assert [step["batch"] for step in rank["steps"]] == [4, 4, 16, 8]
        for ours, theirs in zip(rank["steps"], recorder.steps, strict=True):
            for group, other in zip(ours["groups"], theirs["groups"]):
                assert group == pytest.approx(other, rel=1e-12)
        assert rank["beta2"]["3"] == pytest.approx(0.996005996001, rel=1e-12)
    # Tolerance: DDP sums the same per-token terms in another order (fp32 round-off ~1e-7 per step over 4 steps)
    single_losses = {str(step): loss for step, loss in train_losses(single).items()}
    assert ranks[0]["losses"] == pytest.approx(single_losses, rel=1e-5)
