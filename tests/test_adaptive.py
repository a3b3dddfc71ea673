"""AdaptiveBatchSchedule: whole-factor growth, bounds, hysteresis, determinism across a resume, LR coupling, and the
adaptive ramp inside a real ``BatchRampTrainer.train``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback, TrainingArguments

from hf_batchsched.callbacks.noise_scale import NoiseScaleCallback
from hf_batchsched.coupling import Coupling
from hf_batchsched.errors import ConfigError
from hf_batchsched.schedules.adaptive import AdaptiveBatchSchedule
from hf_batchsched.schedules.batch_base import BatchSchedule
from hf_batchsched.schedules.batch_config import (
    BATCH_SCHEDULES,
    batch_schedule_from_config,
    batch_schedule_to_config,
    make_batch_schedule,
)
from hf_batchsched.trainer import BatchRampTrainer

torch.set_num_threads(1)


def feed(schedule: AdaptiveBatchSchedule, noise_scales, consumed: int = 0, **observe_kwargs) -> list[int]:
    """One estimator update per value (|G|² = 1, tr(Σ) = value, a constant EMA input), then one check each;
    returns ``current_size`` after each check."""
    sizes = []
    for value in noise_scales:
        schedule.estimator.reset()
        schedule.estimator.update_estimates(1.0, float(value))  # bias-corrected EMA of one value: exactly `value`
        schedule.observe(consumed=consumed, **observe_kwargs)
        sizes.append(schedule.current_size)
    return sizes


def test_is_a_batch_schedule_with_tight_bounds():
    schedule = AdaptiveBatchSchedule(24, 200, growth_factor=2)
    assert isinstance(schedule, BatchSchedule) and schedule.unit == "samples"
    assert (schedule.min_size, schedule.max_size) == (24, 192)  # 24·2³ = 192 <= 200 < 384
    assert AdaptiveBatchSchedule(8, 8).max_size == 8
    assert AdaptiveBatchSchedule(10, 300, growth_factor=3).max_size == 270


def test_grows_by_whole_factors_only_within_bounds():
    schedule = AdaptiveBatchSchedule(24, 200, patience=1, warmup_updates=0)
    sizes = feed(schedule, [10**6] * 10)  # the noise scale is always far above: grow at every check, until the cap
    assert sizes == [48, 96, 192, 192, 192, 192, 192, 192, 192, 192]
    assert [(e["from"], e["to"]) for e in schedule.events] == [(24, 48), (48, 96), (96, 192)]
    assert all(size % 24 == 0 and (size // 24) & (size // 24 - 1) == 0 for size in sizes)  # 24 x powers of 2
    triple = AdaptiveBatchSchedule(8, 100, growth_factor=3, patience=1, warmup_updates=0)
    assert feed(triple, [10**6] * 4) == [24, 72, 72, 72]


def test_only_grows_even_when_noise_scale_collapses():
    schedule = AdaptiveBatchSchedule(16, 256, patience=1, warmup_updates=0)
    sizes = feed(schedule, [100, 100, 1, 0.01, -5, 100])
    assert sizes == [32, 64, 64, 64, 64, 128]
    assert sizes == sorted(sizes)
    assert not schedule.should_grow(math.nan, 8)  # an undefined estimate (|G|² <= 0 and tr(Σ) <= 0) never grows
    assert schedule.should_grow(math.inf, 10**9)  # the true gradient drowned in noise: any batch is small


def test_hysteresis_patience_and_threshold_margin():
    schedule = AdaptiveBatchSchedule(32, 1024, patience=3, warmup_updates=0, growth_threshold=1.05)
    above, below = 1.06 * 32, 1.04 * 32  # within the 5 % margin counts as "not above"
    assert feed(schedule, [above, above, below, above, above, below] * 3) == [32] * 18  # never 3 in a row
    assert feed(schedule, [above, above, above]) == [32, 32, 64]
    assert schedule.checks_passed == 0  # a growth resets the count
    assert feed(schedule, [1.06 * 64, 1.06 * 64]) == [64, 64]


def test_warmup_updates_delay_the_first_check():
    schedule = AdaptiveBatchSchedule(8, 64, patience=1, warmup_updates=3)
    for update in range(3):
        schedule.estimator.update_estimates(1.0, 1000.0)
        event = schedule.observe(consumed=100 * update)
        assert (event is None) == (update < 2)  # the third update reaches warmup_updates=3: first check passes
    assert schedule.current_size == 16


def test_change_starts_after_prefetched_batches_and_schedule_is_pure():
    schedule = AdaptiveBatchSchedule(16, 128, patience=1, warmup_updates=0)
    schedule.estimator.update_estimates(1.0, 1000.0)
    event = schedule.observe(consumed=160, prefetched_batches=2, step=9)
    assert event == {"step": 9, "consumed": 160, "effective_from": 192, "from": 16, "to": 32, "noise_scale": 1000.0}
    assert [schedule(c) for c in (0, 160, 191, 192, 10**6)] == [16, 16, 16, 32, 32]
    assert [schedule(c) for c in (191, 192)] == [16, 32]  # reading never changes the state
    # while the change is pending no further check is counted
    assert schedule.observe(consumed=176) is None and schedule.checks_passed == 0
    assert schedule.observe(consumed=192) is not None and schedule.current_size == 64
    with pytest.raises(ConfigError, match="consumed samples >= 0"):
        schedule(-1)


@pytest.mark.parametrize(
    "scaling, expected", [(None, [1.0, 1.0, 1.0]), ("linear", [1.0, 2.0, 4.0]), ("sqrt", [1.0, math.sqrt(2), 2.0])]
)
def test_lr_scale_follows_the_size(scaling, expected):
    schedule = AdaptiveBatchSchedule(16, 64, patience=1, warmup_updates=0, lr_scaling=scaling)
    feed(schedule, [1e6, 1e6], consumed=0)
    schedule.events[0]["effective_from"], schedule.events[1]["effective_from"] = 100, 200
    assert [schedule.lr_scale_at(c) for c in (0, 100, 200)] == pytest.approx(expected)
    assert schedule.lr_scale == pytest.approx(expected[-1])


def test_same_decisions_after_resume():
    """Save mid-run (through JSON, as checkpoints do), reload into a new schedule, feed both the same measurements:
    identical events and counters."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(400, generator=generator)
    # |G_Bs|², |G_Bb|² of a problem whose noise scale rises from ~10 to ~1000 over the run (|G|² decays)
    measurements = [
        (g2 + trace / 8 * (0.5 + u), g2 + trace / 64 * (0.75 + u / 2))
        for g2, trace, u in ((10 * 0.985**i, 100.0, float(noise[i])) for i in range(400))
    ]

    def run(schedule, items, start):
        for index, (sq_small, sq_big) in enumerate(items, start=start):
            schedule.estimator.update(sq_small, sq_big, 8, 64)
            schedule.observe(consumed=64 * (index + 1), prefetched_batches=1, step=index)

    config = dict(min_size=8, max_size=512, patience=3, warmup_updates=5, beta=0.9)
    uninterrupted = AdaptiveBatchSchedule(**config)
    run(uninterrupted, measurements, 0)
    assert len(uninterrupted.events) >= 3  # the test exercises several decisions

    first = AdaptiveBatchSchedule(**config)
    run(first, measurements[:150], 0)
    saved = json.loads(json.dumps(first.state_dict()))
    resumed = AdaptiveBatchSchedule(**config)
    resumed.load_state_dict(saved)
    run(resumed, measurements[150:], 150)
    assert resumed.events == uninterrupted.events
    assert resumed.state_dict() == uninterrupted.state_dict()
    with pytest.raises(ConfigError, match="same settings"):
        AdaptiveBatchSchedule(**{**config, "patience": 2}).load_state_dict(saved)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(min_size=0, max_size=8), "min_size must be a positive integer"),
        (dict(min_size=16, max_size=8), "max_size=8 is below min_size=16"),
        (dict(min_size=8, max_size=64, growth_factor=1), "growth_factor must be a whole factor >= 2"),
        (dict(min_size=8, max_size=64, growth_factor=1.5), "growth_factor must be a positive integer"),
        (dict(min_size=8, max_size=64, growth_threshold=0), "growth_threshold must be > 0"),
        (dict(min_size=8, max_size=64, patience=0), "patience must be a positive integer"),
        (dict(min_size=8, max_size=64, warmup_updates=-1), "warmup_updates must be an integer >= 0"),
        (dict(min_size=8, max_size=64, lr_scaling="cubic"), "unknown lr_scaling 'cubic'"),
        (dict(min_size=8, max_size=64, beta=1.5), "beta must be in"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AdaptiveBatchSchedule(**kwargs)


def test_registered_as_adaptive_and_round_trips_through_its_config():
    schedule = AdaptiveBatchSchedule(24, 200, growth_factor=3, patience=2, warmup_updates=0, lr_scaling="sqrt")
    config = batch_schedule_to_config(schedule)
    assert config["name"] == "adaptive" and "adaptive" in BATCH_SCHEDULES
    rebuilt = batch_schedule_from_config(json.loads(json.dumps(config)))
    assert isinstance(rebuilt, AdaptiveBatchSchedule) and batch_schedule_to_config(rebuilt) == config
    assert (rebuilt.min_size, rebuilt.max_size, rebuilt.growth_factor) == (24, 72, 3)
    # the decisions, not only the settings, come back: same inputs, same events
    assert feed(rebuilt, [100, 100, 100, 100]) == feed(schedule, [100, 100, 100, 100]) == [24, 72, 72, 72]
    # make_batch_schedule's min_size/max_size/multiple are the schedule's own (no RoundedBatch wrapper)
    made = make_batch_schedule("adaptive", min_size=32, max_size=256, multiple=16)
    assert isinstance(made, AdaptiveBatchSchedule) and (made.min_size, made.max_size) == (32, 256)
    with pytest.raises(ConfigError, match="min_size 24 is not a multiple of 16.*pick min_size = 32"):
        make_batch_schedule("adaptive", min_size=24, max_size=256, multiple=16)
    with pytest.raises(ConfigError, match="counts samples, got unit 'tokens'"):
        batch_schedule_from_config({"name": "adaptive", "min_size": 8, "max_size": 64}, unit="tokens")
    with pytest.raises(ConfigError, match="missing required parameter.*max_size"):
        batch_schedule_from_config({"name": "adaptive", "min_size": 8})


# ---- inside a real Trainer ----------------------------------------------------------------------------------------


class Regression(torch.nn.Module):
    """``y = x·w* + ε`` fitted from ``w = w* + δ``: the gradient shrinks as training goes on, the noise scale grows."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.linear = torch.nn.Linear(weight.numel(), 1, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(weight[None])

    def forward(self, input_ids, labels=None):
        return {"loss": torch.nn.functional.mse_loss(self.linear(input_ids).squeeze(-1), labels)}


def regression_data(num_samples: int = 512, dim: int = 4):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(num_samples, dim, generator=generator)
    w_star = torch.randn(dim, generator=generator)
    y = x @ w_star + 0.5 * torch.randn(num_samples, generator=generator)
    start = w_star + 0.25 * torch.ones(dim)  # B_simple = d + 1 + d σ²/|δ|² = 9 at the start, then grows
    return Dataset.from_dict({"input_ids": x.tolist(), "labels": y.tolist()}), start


class LRSpy(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.during, self.after = trainer, [], []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.during.append((self.trainer.last_batch_size, self.trainer.optimizer.param_groups[0]["lr"]))

    def on_step_end(self, args, state, control, **kwargs):
        self.after.append(self.trainer.optimizer.param_groups[0]["lr"])


def make_trainer(tmp_path, schedule, *, max_steps=-1, save_steps=None, lr=0.05, micro=2):
    data, start = regression_data()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        max_steps=max_steps,
        learning_rate=lr,
        lr_scheduler_type="constant",
        optim="sgd",
        report_to="none",
        use_cpu=True,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        logging_steps=5,
        disable_tqdm=True,
        seed=0,
    )
    trainer = BatchRampTrainer(
        model=Regression(start), args=args, train_dataset=data, batch_schedule=schedule, max_micro_batch_size=micro
    )
    trainer.remove_callback(PrinterCallback)
    callback = NoiseScaleCallback(trainer)
    trainer.add_callback(callback)
    spy = LRSpy(trainer)
    trainer.add_callback(spy)
    return trainer, callback, spy


def adaptive(**overrides):
    kwargs = dict(min_size=8, max_size=64, patience=2, warmup_updates=3, beta=0.8, lr_scaling="linear")
    kwargs.update(overrides)
    return AdaptiveBatchSchedule(**kwargs)


def test_adaptive_ramp_grows_in_trainer_and_couples_lr(tmp_path):
    schedule = adaptive()
    trainer, callback, spy = make_trainer(tmp_path, schedule)
    trainer.train()
    assert len(schedule.events) >= 2, schedule.events  # the noise scale rises past 8, then 16, as the fit converges
    sizes = [entry["batchsched/batch_size"] for entry in trainer.state.log_history if "batchsched/batch_size" in entry]
    assert sizes[0] == 8 and max(sizes) == schedule.current_size
    # every step took the schedule's size at its start (the sampler read the schedule lazily; num_workers = 0)
    assert trainer.clock.consumed_samples == 512
    # the LR during each optimizer step is base x (the step's global batch)/8 (the trainer's LR coupling, also for a
    # partial last step), restored afterwards for the scheduler; rel 1e-12: one float64 product
    assert {size for size, _ in spy.during} >= {8 * 2**k for k in range(len(schedule.events) + 1)}
    assert [lr for _, lr in spy.during] == pytest.approx([0.05 * size / 8 for size, _ in spy.during], rel=1e-12)
    assert trainer.couple == Coupling(lr="linear")
    assert set(spy.after) == {0.05}
    event_logs = [entry for entry in trainer.state.log_history if "batchsched/adaptive_events" in entry]
    assert [entry["batchsched/adaptive_events"] for entry in event_logs][-1] == len(schedule.events)
    assert {e["batchsched/adaptive_batch_size"] for e in event_logs} >= {e["to"] for e in schedule.events}


def test_adaptive_resume_takes_the_same_decisions(tmp_path):
    full_schedule = adaptive()
    full, _, _ = make_trainer(tmp_path / "full", full_schedule, save_steps=6)
    full.train()
    resumed_schedule = adaptive()
    resumed, _, _ = make_trainer(tmp_path / "resumed", resumed_schedule)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
    steps = [event["step"] for event in full_schedule.events]
    assert min(steps) < 6 <= max(steps), steps  # decisions both before and after the checkpoint
    assert resumed_schedule.events == full_schedule.events
    assert resumed.clock.state_dict() == full.clock.state_dict()
    assert torch.allclose(resumed.model.linear.weight, full.model.linear.weight, rtol=1e-5, atol=1e-6)


def test_adaptive_schedule_from_a_config_in_the_trainer(tmp_path):
    """``batch_schedule={"name": "adaptive", ...}`` from a YAML config: the schedule the callback drives."""
    config = {"name": "adaptive", "min_size": 8, "max_size": 64, "patience": 2, "warmup_updates": 3, "beta": 0.8}
    trainer, callback, _ = make_trainer(tmp_path, config, max_steps=4)
    assert isinstance(trainer.batch_schedule, AdaptiveBatchSchedule) and callback.schedule is trainer.batch_schedule
    trainer.train()
    assert trainer.batch_schedule.estimator.num_updates == 4  # the callback fed the schedule's own estimator
    assert trainer.clock.consumed_samples == 32


def test_callback_checks_adaptive_schedule(tmp_path):
    data, start = regression_data(64)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=4)
    with pytest.raises(ConfigError, match="not a multiple of the trainer.s batch_size_multiple"):
        NoiseScaleCallback(
            BatchRampTrainer(model=Regression(start), args=args, train_dataset=data,
                             batch_schedule=adaptive(min_size=12), max_micro_batch_size=8, batch_size_multiple=8)
        )  # fmt: skip
    with pytest.raises(ConfigError, match="adaptive schedule's min_size 8"):
        NoiseScaleCallback(
            BatchRampTrainer(model=Regression(start), args=args, train_dataset=data,
                             batch_schedule=adaptive(), max_micro_batch_size=8)
        )  # fmt: skip
    with pytest.raises(ConfigError, match="the schedule owns the estimator"):
        NoiseScaleCallback(
            BatchRampTrainer(model=Regression(start), args=args, train_dataset=data,
                             batch_schedule=adaptive(), max_micro_batch_size=4),
            beta=0.5,
        )  # fmt: skip


# ---- DDP: 2 CPU processes (gloo) ----------------------------------------------------------------------------------


def ddp_worker(output_dir: str) -> None:
    """Run by ``torchrun --nproc_per_node 2 tests/test_adaptive.py OUTPUT_DIR``: an adaptive run on 2 ranks that
    records, per measured step, the norms fed to the estimator, the rows each forward saw and the weights."""
    import os

    torch.set_num_threads(1)
    schedule = adaptive()
    data, start = regression_data()
    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=2, num_train_epochs=1, learning_rate=0.05,
        lr_scheduler_type="constant", optim="sgd", report_to="none", use_cpu=True, save_strategy="no",
        logging_steps=5, disable_tqdm=True, seed=0, ddp_backend="gloo",
    )  # fmt: skip
    model = Regression(start)
    seen: list[list[list[float]]] = []
    forward = model.forward
    model.forward = lambda input_ids, labels=None: (seen.append(input_ids.tolist()), forward(input_ids, labels))[1]
    trainer = BatchRampTrainer(
        model=model, args=args, train_dataset=data, batch_schedule=schedule, max_micro_batch_size=2
    )
    trainer.remove_callback(PrinterCallback)
    callback = NoiseScaleCallback(trainer)
    trainer.add_callback(callback)
    updates = []
    update = callback.estimator.update

    def spy(*norms):
        weight = model.linear.weight.detach().flatten().tolist()
        updates.append({"norms": list(norms), "forwards": len(seen), "weight": weight})
        return update(*norms)

    callback.estimator.update = spy
    trainer.train()
    record = {
        "world_size": trainer.args.world_size,
        "updates": updates,
        "seen": seen,
        "events": schedule.events,
        "estimator": callback.estimator.state_dict(),
    }
    with open(os.path.join(output_dir, f"rank{trainer.args.process_index}.json"), "w") as file:
        json.dump(record, file)


@pytest.mark.distributed
def test_ddp_ranks_decide_alike_and_measure_exact_norms(tmp_path):
    """Per measured step: |G_Bs|² is the rank-average of each rank's first-chunk mean-gradient norm (before the
    all-reduce), |G_Bb|² the norm of the global step's mean gradient (closed form: g = 2(x·w − y)x); every rank holds
    the same estimator state and took the same decisions. Tolerance 1e-4: float32 model and data."""
    from conftest import run_torchrun  # here, not at the top: this file is also the torchrun worker

    ranks = run_torchrun(__file__, tmp_path)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["events"] == ranks[1]["events"] and len(ranks[0]["events"]) >= 1
    assert ranks[0]["estimator"] == ranks[1]["estimator"]

    data, _ = regression_data()
    label_of = {tuple(torch.tensor(x).tolist()): y for x, y in zip(data["input_ids"], data["labels"])}
    starts = [0, 0]
    for step, (update0, update1) in enumerate(zip(ranks[0]["updates"], ranks[1]["updates"])):
        assert update0["norms"] == update1["norms"], step
        w = torch.tensor(update0["weight"], dtype=torch.float64)
        small_norms, all_grads = [], []
        for rank, update in enumerate((update0, update1)):
            chunks = ranks[rank]["seen"][starts[rank] : update["forwards"]]
            starts[rank] = update["forwards"]
            rows = [row for chunk in chunks for row in chunk]
            x = torch.tensor(rows, dtype=torch.float64)
            y = torch.tensor([label_of[tuple(torch.tensor(row, dtype=torch.float32).tolist())] for row in rows],
                             dtype=torch.float64)  # fmt: skip
            grads = 2 * (x @ w - y)[:, None] * x
            small_norms.append(float(grads[: len(chunks[0])].mean(0).pow(2).sum()))
            all_grads.append(grads)
        sq_small, sq_big, b_small, b_big = update0["norms"]
        assert b_small == 2 and b_big == sum(len(g) for g in all_grads)
        assert sq_small == pytest.approx(sum(small_norms) / 2, rel=1e-4)
        assert sq_big == pytest.approx(float(torch.cat(all_grads).mean(0).pow(2).sum()), rel=1e-4)


if __name__ == "__main__":  # the DDP worker (see test_ddp_ranks_decide_alike_and_measure_exact_norms)
    import sys

    ddp_worker(sys.argv[1])
