"""State-based LR policies in a real Trainer: PlateauCallback and SpikeGuardCallback."""

from __future__ import annotations

import copy
import math
import pathlib

import pytest
import torch
from helpers import tiny_training_args
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from hf_batchsched.assets import synthetic_lm_dataset, tiny_llama
from hf_batchsched.callbacks.plateau import PlateauCallback
from hf_batchsched.callbacks.spike_guard import SpikeDetector, SpikeGuardCallback, gradient_norm
from hf_batchsched.errors import ConfigError
from hf_batchsched.lr_cuts import PlateauTracker, scale_learning_rates
from hf_batchsched.trainer import BatchRampTrainer


def make_args(tmp_path, **overrides) -> TrainingArguments:
    defaults = {"per_device_eval_batch_size": 8, "max_steps": 12, "lr_scheduler_type": "linear"}
    return tiny_training_args(tmp_path / "out", **{**defaults, **overrides})


def make_trainer(tmp_path, trainer_cls=Trainer, model=None, **overrides):
    extra = {}
    for key in ("lr_policy", "compute_metrics", "optimizers", "max_micro_batch_size"):
        if key in overrides:
            extra[key] = overrides.pop(key)
    args = make_args(tmp_path, **overrides)
    trainer = trainer_cls(
        model=model or tiny_llama(seed=0),
        args=args,
        train_dataset=synthetic_lm_dataset(48, seq_len=8),
        eval_dataset=synthetic_lm_dataset(8, seq_len=8, seed=1),
        **extra,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


class LRRecorder(TrainerCallback):
    """The LR of every group used by each optimizer update."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.lrs: list[list[float]] = []

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.lrs.append([group["lr"] for group in self.trainer.optimizer.param_groups])


def constant_metric(eval_prediction):
    return {"flat": 1.0}  # a planted plateau: the metric never improves


# --------------------------------------------------------------------------------------------------
# PlateauTracker: the same decisions as torch's ReduceLROnPlateau
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patience,cooldown,mode", [(0, 0, "min"), (2, 0, "min"), (1, 2, "min"), (2, 1, "max")])
def test_tracker_matches_torch_reduce_on_plateau(patience, cooldown, mode):
    values = [1.0, 0.9, 0.9, 0.95, 0.899, 0.8, 0.8, 0.8, 0.8, 0.81, 0.7, 0.7, 0.7, 0.7, 0.7, 0.6]
    if mode == "max":  # positive values: torch's relative threshold uses best * (1 + t), not |best| * t
        values = [2.0 - v for v in values]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=mode, factor=0.5, patience=patience, threshold=1e-3, cooldown=cooldown
    )
    tracker = PlateauTracker(mode=mode, patience=patience, threshold=1e-3, cooldown=cooldown)
    scale = 1.0
    for value in values:
        reference.step(value)
        if tracker.update(value):
            scale *= 0.5
        assert optimizer.param_groups[0]["lr"] == scale


def test_scale_learning_rates_persists_through_schedulers():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": params[:1], "lr": 0.1}, {"params": params[1:], "lr": 1.6}])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / 10)
    scale_learning_rates(optimizer, scheduler, 0.25)
    for step in range(1, 5):
        optimizer.step()
        scheduler.step()
        expected = [0.1 * 0.25 * (1 - step / 10), 1.6 * 0.25 * (1 - step / 10)]
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ConfigError, match="finite number > 0"):
        scale_learning_rates(optimizer, scheduler, 0.0)


# --------------------------------------------------------------------------------------------------
# PlateauCallback in the Trainer
# --------------------------------------------------------------------------------------------------


def test_plateau_cuts_lr_on_planted_plateau_and_keeps_schedule(tmp_path):
    trainer = make_trainer(
        tmp_path, eval_strategy="steps", eval_steps=2, compute_metrics=constant_metric, lr_scheduler_type="linear"
    )
    recorder = LRRecorder(trainer)
    trainer.add_callback(recorder)
    trainer.add_callback(PlateauCallback(trainer, metric="flat", factor=0.5, patience=1))
    trainer.train()
    # Evaluations after steps 2, 4, 6, 8, 10, 12; the first sets the best, each later one is bad, and every second
    # bad one (patience 1) is a plateau: after steps 6 and 10. Linear schedule: lr(step s) = 1e-3 * (1 - (s-1)/12).
    scales = [1.0] * 6 + [0.5] * 4 + [0.25] * 2
    expected = [1e-3 * (1 - s / 12) * scale for s, scale in zip(range(12), scales)]
    assert [lrs[0] for lrs in recorder.lrs] == pytest.approx(expected, rel=1e-9)
    events = [log["lr/plateau_events"] for log in trainer.state.log_history if "lr/plateau_events" in log]
    assert events == [0, 0, 1, 1, 2, 2]


def test_plateau_floor_and_policy_kind_lr(tmp_path):
    # A BatchRampTrainer with an absolute-LR policy (FIX): the cut must persist through PolicyLRScheduler steps, and
    # the cumulative cut stops at min_lr_ratio.
    trainer = make_trainer(
        tmp_path,
        trainer_cls=BatchRampTrainer,
        eval_strategy="steps",
        eval_steps=1,
        compute_metrics=constant_metric,
        lr_policy={"name": "FIX", "k0": 2e-3},
    )
    recorder = LRRecorder(trainer)
    trainer.add_callback(recorder)
    trainer.add_callback(PlateauCallback(trainer, metric="eval_flat", factor=0.5, patience=0, min_lr_ratio=0.2))
    trainer.train()
    # patience 0: every evaluation after the first is a plateau; scale 1, 1, .5, .25, .2 (floor), .2, ...
    got = [lrs[0] for lrs in recorder.lrs]
    assert got[:5] == pytest.approx([2e-3, 2e-3, 1e-3, 5e-4, 4e-4], rel=1e-9)
    assert got[5:] == pytest.approx([4e-4] * 7, rel=1e-9)


def test_plateau_switches_policies(tmp_path):
    trainer = make_trainer(
        tmp_path,
        trainer_cls=BatchRampTrainer,
        eval_strategy="steps",
        eval_steps=2,
        compute_metrics=constant_metric,
        lr_policy={"name": "FIX", "k0": 2e-3},
    )
    recorder = LRRecorder(trainer)
    trainer.add_callback(recorder)
    policies = [{"name": "STEP", "k0": 1e-3, "gamma": 0.5, "l": 2}]
    trainer.add_callback(PlateauCallback(trainer, metric="flat", patience=1, policies=policies))
    trainer.train()
    # Plateau after step 6 -> STEP starts with its clock at 0 at step 7: 1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4.
    got = [lrs[0] for lrs in recorder.lrs]
    assert got == pytest.approx([2e-3] * 6 + [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4], rel=1e-9)


def test_plateau_resume_reproduces_uninterrupted_run(tmp_path):
    common = dict(eval_strategy="steps", eval_steps=2, compute_metrics=constant_metric, save_strategy="steps")
    full = make_trainer(tmp_path / "full", save_steps=100, **common)
    full_recorder = LRRecorder(full)
    full.add_callback(full_recorder)
    full.add_callback(PlateauCallback(full, metric="flat", patience=1))
    full.train()

    first = make_trainer(tmp_path / "resume", save_steps=8, **common)
    first.add_callback(PlateauCallback(first, metric="flat", patience=1))
    first.train()
    resumed = make_trainer(tmp_path / "resume", save_steps=100, **common)
    recorder = LRRecorder(resumed)
    resumed.add_callback(recorder)
    plateau = PlateauCallback(resumed, metric="flat", patience=1)
    resumed.add_callback(plateau)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resume" / "out" / "checkpoint-8"))
    flat = [lr for lrs in recorder.lrs for lr in lrs]
    assert flat == pytest.approx([lr for lrs in full_recorder.lrs[8:] for lr in lrs], rel=1e-12)
    assert plateau.events == 2 and plateau.scale == 0.25


def test_plateau_bad_input(tmp_path):
    trainer = make_trainer(tmp_path, eval_strategy="no")
    with pytest.raises(ConfigError, match="evaluation is off"):
        PlateauCallback(trainer)
    trainer = make_trainer(tmp_path, eval_strategy="steps", eval_steps=2)
    with pytest.raises(ConfigError, match="factor must be in"):
        PlateauCallback(trainer, factor=1.5)
    with pytest.raises(ConfigError, match="needs|has none"):
        PlateauCallback(trainer, policies=["constant"])
    trainer.add_callback(PlateauCallback(trainer, metric="eval_accuracy"))
    with pytest.raises(ConfigError, match="'eval_accuracy'.*available metrics: .*eval_loss"):
        trainer.train()


# --------------------------------------------------------------------------------------------------
# Spike guard
# --------------------------------------------------------------------------------------------------


def test_spike_detector_window_and_min_history():
    detector = SpikeDetector(window=4, sigma=2.0, min_history=3)
    assert detector.observe(100.0) == (False, 0.0)  # no history yet: nothing is a spike
    for value in (1.0, 1.0, 1.0, 1.0):
        detector.observe(value)
    assert list(detector.values) == [1.0] * 4  # window of 4 dropped the 100
    spike, z = detector.observe(1.5)
    assert spike and math.isinf(z) is False and z > 2
    assert detector.observe(float("inf"))[0]
    assert detector.spikes == 2  # the 1.5 and the inf; neither entered the window
    with pytest.raises(ConfigError, match="min_history"):
        SpikeDetector(window=4, min_history=8)


def test_one_spike_detector_implementation():
    """The guard's z-score detector and the stability monitor's loss-ratio detector are one class hierarchy: the
    window, spike counting, state and non-finite handling live in ``probes.stability.SpikeDetector`` only."""
    from hf_batchsched import callbacks, probes
    from hf_batchsched.probes.spikes import LossSpikeDetector
    from hf_batchsched.probes.spikes import SpikeDetector as Implementation

    assert SpikeDetector is Implementation and callbacks.SpikeDetector is probes.SpikeDetector is Implementation
    assert issubclass(LossSpikeDetector, Implementation)
    for method in ("observe", "update", "state_dict", "load_state_dict"):
        assert getattr(LossSpikeDetector, method) is getattr(Implementation, method)
    # the same values, two scores: z-score (0 below min_history) and ratio to the upper decile (nan below it)
    zscore, ratio = SpikeDetector(window=8, sigma=3.0, min_history=3), LossSpikeDetector(window=8, min_history=3)
    for value in (2.0, 2.1, 1.9):
        assert zscore.observe(value) == (False, 0.0) and ratio.update(value) is False and math.isnan(ratio.last_ratio)
    assert zscore.observe(2.0) == (False, pytest.approx(-0.0, abs=1e-9))
    assert ratio.observe(6.3) == (True, pytest.approx(6.3 / 2.0))  # 90th percentile of (1.9, 2.0, 2.1) is 2.0


def test_spike_detector_flat_window_of_clipped_norms_has_no_spike():
    """Every gradient clipped at max_grad_norm=1.0: the norms are 1.0 up to rounding. When most are bit-identical
    and a few differ in the last bit (float32, 2**-23), the window's std is ~1e-7 and, without a floor on the
    spread, every such difference scores z of 7 or more (1e5 while the window is all equal). 500 such steps, and 500
    with a few ulps of noise on every step, and 500 bf16 norms (1.0 or one bf16 step either side, 2**-7), give no
    spike with the guard's defaults; a real rise of 10% above the flat window still is one."""
    generator = torch.Generator().manual_seed(0)
    rare_last_bit = (torch.rand(500, generator=generator) < 0.02).double() * 2.0**-23
    few_ulps = torch.randint(-3, 4, (500,), generator=generator).double() * 2.0**-23
    bf16_steps = torch.randint(-1, 2, (500,), generator=generator).double() * 2.0**-7
    assert int((rare_last_bit > 0).sum()) >= 5
    for noise in (rare_last_bit, few_ulps, bf16_steps):
        detector = SpikeDetector()  # the guard's defaults: window 128, sigma 6, min_history 20
        assert [detector.observe(v)[0] for v in (1.0 + noise).tolist()] == [False] * 500
        window = torch.tensor(list(detector.values), dtype=torch.float64)
        mean, std = window.mean().item(), window.std(unbiased=False).item()
        assert std < 0.01 * mean  # a degenerate window: the floor (1% of the mean) is the spread used
        top = 1.0 + float(noise.max())
        assert detector.score(top) == pytest.approx((top - mean) / (0.01 * mean), rel=1e-9) and detector.score(top) < 1
        assert detector.observe(1.1) == (True, pytest.approx((1.1 - mean) / (0.01 * mean), rel=1e-9))  # z ~ 10 > 6
    zeros = SpikeDetector(min_history=3)
    assert [zeros.observe(v)[0] for v in (0.0, 0.0, 0.0, 1e-9)] == [False] * 4  # abs_floor: no division by 0
    with pytest.raises(ConfigError, match="rel_floor"):
        SpikeDetector(rel_floor=1.0)
    with pytest.raises(ConfigError, match="abs_floor"):
        SpikeDetector(abs_floor=0.0)


def test_plateau_tracker_is_not_fooled_by_rounding_of_a_flat_metric():
    """The plateau test compares with a margin relative to the best value (|best| * threshold), so rounding noise,
    which is relative too (float32: 6e-8 of the value), never counts as an improvement at any scale: a flat metric
    with a few ulps of noise plateaus at every (patience + 1)-th evaluation, at magnitudes 1e-6 to 1e6."""
    generator = torch.Generator().manual_seed(0)
    for scale in (1e-6, 1.0, 1e6):
        tracker = PlateauTracker(mode="min", patience=2, threshold=1e-3)
        noise = torch.randint(-3, 4, (9,), generator=generator).float() * 2.0**-23
        values = (scale * (1.0 + noise)).tolist()
        # the first value sets the best; every third non-improving evaluation after it is a plateau (patience 2)
        assert [tracker.update(v) for v in values] == [False, False, False, True, False, False, True, False, False]


class LossInjector:
    """A forward hook that multiplies the training loss of the ``at``-th training forward by ``factor``."""

    def __init__(self, model, at: int, factor: float):
        self.count, self.at, self.factor = 0, at, factor
        self.handle = model.register_forward_hook(self)

    def __call__(self, module, args, output):
        if not module.training:
            return output
        self.count += 1
        if self.count == self.at:
            output["loss"] = output["loss"] * self.factor
        return output


class Snapshot(TrainerCallback):
    """Weights and optimizer state right before and right after optimizer step ``step`` (1-based)."""

    def __init__(self, trainer, step):
        self.trainer, self.step = trainer, step
        self.before = self.after = None

    def _take(self):
        model = {k: v.detach().clone() for k, v in self.trainer.model.state_dict().items()}
        return model, copy.deepcopy(self.trainer.optimizer.state_dict())

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.before = self._take()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.after = self._take()


def assert_same_state(a, b, ignore_lr=False):
    model_a, opt_a = a
    model_b, opt_b = b
    assert model_a.keys() == model_b.keys()
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    drop = {"lr"} if ignore_lr else set()
    groups_a = [{k: v for k, v in group.items() if k not in drop} for group in opt_a["param_groups"]]
    assert groups_a == [{k: v for k, v in group.items() if k not in drop} for group in opt_b["param_groups"]]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for index, entry in opt_a["state"].items():
        for name, value in entry.items():
            other = opt_b["state"][index][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (index, name)


@pytest.mark.parametrize("action", ["skip", "cut_lr"])
def test_nan_loss_never_reaches_weights_or_optimizer_state(tmp_path, action):
    model = tiny_llama(seed=0)
    trainer = make_trainer(tmp_path, model=model, weight_decay=0.1, max_grad_norm=1.0)
    LossInjector(model, at=5, factor=float("nan"))
    snapshot = Snapshot(trainer, step=5)
    guard = SpikeGuardCallback(trainer, window=16, min_history=3, action=action)
    trainer.add_callback(snapshot)
    trainer.add_callback(guard)
    trainer.train()
    # Bit-for-bit: AdamW with weight decay would move the weights even with zeroed gradients. The LR differs only
    # because the schedule advances (a skipped batch is consumed).
    assert_same_state(snapshot.before, snapshot.after, ignore_lr=True)
    assert guard.skipped_steps == 1 and guard.nonfinite_steps == 1 and guard.lr_cuts == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    logged = [log for log in trainer.state.log_history if "guard/skipped_steps" in log]
    assert logged[-1]["guard/skipped_steps"] == 1 and logged[-1]["guard/nonfinite_steps"] == 1


class RoundingNoise(TrainerCallback):
    """Before the guard looks: multiply every gradient by 1 + k ulps (k in -3..3, float32), as another CPU's
    summation order would round them; the clipped norms then differ in their last bits."""

    def __init__(self, trainer, seed: int):
        self.trainer, self.generator = trainer, torch.Generator().manual_seed(seed)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for p in self.trainer.model.parameters():
            if p.grad is not None:
                k = int(torch.randint(-3, 4, (), generator=self.generator))
                p.grad.mul_(1.0 + k * 2.0**-23)


@pytest.mark.parametrize("seed", range(3))
def test_nan_step_skipped_alone_whatever_the_rounding_of_clipped_norms(tmp_path, seed):
    """The NaN test above, with every gradient clipped (max_grad_norm=1.0 and gradients above it) and rounding
    noise of a few ulps on the clipped gradients: still exactly one skipped step (the NaN one)."""
    model = tiny_llama(seed=0)
    trainer = make_trainer(tmp_path, model=model, weight_decay=0.1, max_grad_norm=1.0)
    LossInjector(model, at=5, factor=float("nan"))
    guard = SpikeGuardCallback(trainer, window=16, min_history=3, action="skip_and_cut")
    trainer.add_callback(RoundingNoise(trainer, seed))
    trainer.add_callback(guard)
    trainer.train()
    assert (guard.skipped_steps, guard.nonfinite_steps, guard.lr_cuts) == (1, 1, 0)
    norms = [log["grad_norm"] for log in trainer.state.log_history if "grad_norm" in log]
    assert sum(norm > 1.0 for norm in norms) >= 10  # the set-up clips (the NaN step's norm is NaN)


class ClippedNorms(TrainerCallback):
    """The gradient norm each update applies (after clipping)."""

    def __init__(self, trainer):
        self.trainer, self.norms = trainer, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.norms.append(gradient_norm(self.trainer.model.parameters()))


def test_every_step_clipped_gives_no_skip_and_the_guard_tests_the_pre_clip_norm(tmp_path):
    """100 healthy steps of a tiny Llama with max_grad_norm=1e-3, far below its gradient norms (about 1): every
    update is clipped to 1e-3 (equal up to rounding), which scored rounding as spikes before. No step is skipped;
    the grad window holds the norms before clipping (the Trainer's logged grad_norm, float32: rel 1e-6), and the
    step-watch is gone from the trainer after training."""
    trainer = make_trainer(tmp_path, max_steps=100, max_grad_norm=1e-3, lr_scheduler_type="constant")
    clipped = ClippedNorms(trainer)
    guard = SpikeGuardCallback(trainer, window=16, min_history=3, action="skip_and_cut")
    trainer.add_callback(clipped)
    trainer.add_callback(guard)
    trainer.train()
    assert (guard.skipped_steps, guard.lr_cuts, guard.nonfinite_steps) == (0, 0, 0)
    assert clipped.norms == pytest.approx([1e-3] * 100, rel=1e-4)  # clip_grad_norm_'s 1e-6 term: 1e-6 / norm
    logged = [log["grad_norm"] for log in trainer.state.log_history if "grad_norm" in log]
    assert len(logged) == 100 and min(logged) > 0.1
    assert list(guard.grad_detector.values) == pytest.approx(logged[-16:], rel=1e-6)
    assert "training_step" not in vars(trainer) and "clip_grad_norm_" not in vars(trainer.accelerator)


def test_guard_reads_chunked_steps_of_a_batch_ramp_trainer(tmp_path):
    """BatchRampTrainer runs each step as micro-chunks inside one training_step: the guard's windows hold exactly the
    Trainer's logged step losses and pre-clipping gradient norms (float32 read back: rel 1e-6)."""
    trainer = make_trainer(
        tmp_path, trainer_cls=BatchRampTrainer, max_steps=10, max_grad_norm=1e-3, max_micro_batch_size=2
    )  # steps of 4 samples in 2 chunks
    guard = SpikeGuardCallback(trainer, window=16, min_history=3)
    trainer.add_callback(guard)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log and "grad_norm" in log]
    assert len(logs) == 10 and all(log["batchsched/micro_chunks"] == 2 for log in logs)
    assert list(guard.loss_detector.values) == pytest.approx([log["loss"] for log in logs], rel=1e-6)
    assert list(guard.grad_detector.values) == pytest.approx([log["grad_norm"] for log in logs], rel=1e-6)
    assert guard.skipped_steps == 0


class AddNaN:
    """A forward hook adding NaN to the ``at``-th training loss: the loss is NaN, its gradients stay finite."""

    def __init__(self, model, at: int, when=True):
        self.count, self.at, self.when = 0, at, when
        self.handle = model.register_forward_hook(self)

    def __call__(self, module, args, output):
        if module.training:
            self.count += 1
            if self.count == self.at and self.when:
                output["loss"] = output["loss"] + float("nan")
        return output


def test_nan_loss_is_seen_with_the_logging_nan_inf_filter(tmp_path):
    """``logging_nan_inf_filter=True`` (the default) makes the Trainer accumulate the mean of earlier losses (0 right
    after a log) instead of a NaN one. The guard still sees the NaN, even with finite gradients, skips that step
    alone, and no substituted value enters the loss window: it holds the other steps' logged losses."""
    model = tiny_llama(seed=0)
    trainer = make_trainer(tmp_path, model=model, weight_decay=0.1, logging_nan_inf_filter=True)
    AddNaN(model, at=5)
    snapshot = Snapshot(trainer, step=5)
    guard = SpikeGuardCallback(trainer, window=16, min_history=3)
    trainer.add_callback(snapshot)
    trainer.add_callback(guard)
    trainer.train()
    assert (guard.skipped_steps, guard.nonfinite_steps) == (1, 1) and guard.events[0]["loss"] == "nan"
    assert_same_state(snapshot.before, snapshot.after, ignore_lr=True)
    losses = {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log}
    assert losses[5] == 0.0  # what the filter put in the Trainer's accumulator
    healthy = [loss for step, loss in sorted(losses.items()) if step != 5]
    assert list(guard.loss_detector.values) == pytest.approx(healthy, rel=1e-6)  # float32 losses read back
    assert len(guard.grad_detector.values) == 11  # the NaN step's (finite) grad norm stayed out too


def ddp_worker(output_dir: str) -> None:
    """Rank 1 alone has a NaN loss at step 4 (finite gradients): both ranks must skip that step."""
    import json
    import os

    torch.set_num_threads(1)
    trainer = make_trainer(pathlib.Path(output_dir), model=tiny_llama(seed=0), max_steps=8, ddp_backend="gloo")
    AddNaN(trainer.model, at=4, when=trainer.args.process_index == 1)
    guard = SpikeGuardCallback(trainer, window=16, min_history=3)
    trainer.add_callback(guard)
    trainer.train()
    record = {
        "world_size": trainer.args.world_size,
        "skipped": guard.skipped_steps,
        "nonfinite": guard.nonfinite_steps,
        "loss_window": list(guard.loss_detector.values),
        "losses": {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log},
    }
    with open(os.path.join(output_dir, f"rank{trainer.args.process_index}.json"), "w") as file:
        json.dump(record, file)


@pytest.mark.distributed
def test_nan_loss_on_one_rank_is_skipped_on_every_rank(tmp_path):
    """2-process DDP with the NaN filter on: the Trainer would average rank 1's substituted 0 with rank 0's loss;
    the guard averages the raw losses (NaN), so both ranks skip step 4 and keep the same 7-step loss window."""
    from conftest import run_torchrun  # here, not at the top: this file is also the torchrun worker

    ranks = run_torchrun(__file__, tmp_path)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [(r["skipped"], r["nonfinite"]) for r in ranks] == [(1, 1), (1, 1)]
    assert ranks[0]["loss_window"] == ranks[1]["loss_window"] and len(ranks[0]["loss_window"]) == 7
    assert math.isfinite(ranks[0]["losses"]["4"])  # the Trainer's own log hides the NaN


def test_unguarded_nan_step_would_corrupt(tmp_path):
    # The control experiment: without the guard the same injection reaches the weights.
    model = tiny_llama(seed=0)
    trainer = make_trainer(tmp_path, model=model, max_steps=6, max_grad_norm=0.0)
    LossInjector(model, at=5, factor=float("nan"))
    trainer.train()
    assert not all(torch.isfinite(p).all() for p in model.parameters())


def test_planted_spike_is_skipped_and_lr_cut(tmp_path):
    model = tiny_llama(seed=0)
    trainer = make_trainer(tmp_path, model=model, max_steps=14, lr_scheduler_type="constant", max_grad_norm=0.0)
    LossInjector(model, at=10, factor=1000.0)
    snapshot = Snapshot(trainer, step=10)
    recorder = LRRecorder(trainer)
    guard = SpikeGuardCallback(trainer, window=16, sigma=6.0, min_history=5, action="skip_and_cut")
    for callback in (snapshot, recorder, guard):
        trainer.add_callback(callback)
    trainer.train()
    assert_same_state(snapshot.before, snapshot.after, ignore_lr=True)  # the LR is cut on purpose (checked below)
    assert (guard.skipped_steps, guard.lr_cuts, guard.nonfinite_steps) == (1, 1, 0)
    assert guard.events[0]["step"] == 10 and guard.events[0]["zscore"] > 6
    # Constant schedule: 1e-3 for steps 1-9, halved from the spike on (the cut persists through scheduler steps).
    assert [lrs[0] for lrs in recorder.lrs] == pytest.approx([1e-3] * 9 + [5e-4] * 5, rel=1e-12)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[9] > 1000 and max(losses[10:]) < 10  # the spiky step's loss is logged; later steps are unharmed


def test_spike_guard_bad_input(tmp_path):
    trainer = make_trainer(tmp_path)
    with pytest.raises(ConfigError, match="unknown action"):
        SpikeGuardCallback(trainer, action="explode")
    with pytest.raises(ConfigError, match="lr_factor"):
        SpikeGuardCallback(trainer, lr_factor=2.0)


def test_nan_with_logging_filter_off_skips_only_that_step(tmp_path):
    # With logging_nan_inf_filter=False the Trainer's loss accumulator stays NaN after the NaN step; the guard must
    # not read that as a NaN loss on every later step (their gradients are finite and still checked).
    model = tiny_llama(seed=0)
    trainer = make_trainer(tmp_path, model=model, max_steps=8, logging_nan_inf_filter=False)
    LossInjector(model, at=4, factor=float("nan"))
    guard = SpikeGuardCallback(trainer, window=16, min_history=3)
    trainer.add_callback(guard)
    trainer.train()
    assert (guard.skipped_steps, guard.nonfinite_steps) == (1, 1)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_spike_guard_state_survives_resume(tmp_path):
    def run(folder, save_steps, resume=None):
        # The Trainer's own callback restore (which rebuilds callbacks without arguments) must leave ours alone.
        trainer = make_trainer(
            tmp_path / folder,
            save_strategy="steps",
            save_steps=save_steps,
            restore_callback_states_from_checkpoint=resume is not None,
        )
        guard = SpikeGuardCallback(trainer, window=8, min_history=3)
        trainer.add_callback(guard)
        trainer.train(resume_from_checkpoint=resume)
        return guard

    full = run("full", 100)
    run("split", 6)
    resumed = run("split", 100, resume=str(tmp_path / "split" / "out" / "checkpoint-6"))
    # The rolling windows (loss and grad norm of the last 8 steps) continue across the checkpoint; float32
    # accumulation of the same losses: equal to 1e-6 relative.
    assert list(resumed.loss_detector.values) == pytest.approx(list(full.loss_detector.values), rel=1e-6)
    assert list(resumed.grad_detector.values) == pytest.approx(list(full.grad_detector.values), rel=1e-6)
    assert len(resumed.loss_detector.values) == 8


def test_plateau_policy_switch_survives_resume(tmp_path):
    def run(save_steps, resume=None):
        trainer = make_trainer(
            tmp_path,
            trainer_cls=BatchRampTrainer,
            eval_strategy="steps",
            eval_steps=2,
            compute_metrics=constant_metric,
            lr_policy={"name": "FIX", "k0": 2e-3},
            save_strategy="steps",
            save_steps=save_steps,
        )
        recorder = LRRecorder(trainer)
        trainer.add_callback(recorder)
        policies = [{"name": "STEP", "k0": 1e-3, "gamma": 0.5, "l": 2}]
        trainer.add_callback(PlateauCallback(trainer, metric="flat", patience=1, policies=policies))
        trainer.train(resume_from_checkpoint=resume)
        return [lrs[0] for lrs in recorder.lrs]

    run(save_steps=8)
    resumed = run(save_steps=100, resume=str(tmp_path / "out" / "checkpoint-8"))
    # The switch happened at step 6, before the checkpoint: the resumed run continues STEP from its own clock.
    assert resumed == pytest.approx([5e-4, 5e-4, 2.5e-4, 2.5e-4], rel=1e-9)


if __name__ == "__main__":  # the DDP worker (see test_nan_loss_on_one_rank_is_skipped_on_every_rank)
    import sys

    ddp_worker(sys.argv[1])


def test_spike_guard_is_refused_under_deepspeed(tmp_path):
    """The DeepSpeed engine steps inside the last backward: dropping the gradients at on_pre_optimizer_step would
    come too late, so the guard refuses to start instead of letting NaN steps through unnoticed."""
    trainer = make_trainer(tmp_path, trainer_cls=BatchRampTrainer)
    guard = SpikeGuardCallback(trainer)
    trainer.is_deepspeed_enabled = True  # what the Trainer sets for deepspeed= / an accelerate DeepSpeed config
    with pytest.raises(ConfigError, match="cannot act under DeepSpeed.*FSDP2"):
        guard.on_train_begin(trainer.args, trainer.state, trainer.control)
