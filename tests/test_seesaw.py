"""Seesaw (Meterez et al. 2025): the (batch, LR) pair built from an LR policy, in the trainer and from configs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_coupling import StepRecorder
from test_trainer_ramp import make_trainer

from hf_batchsched import seesaw
from hf_batchsched.errors import ConfigError
from hf_batchsched.schedules.batch import ConstantBatch
from hf_batchsched.schedules.batch_config import batch_schedule_from_config
from hf_batchsched.schedules.lr import lr_at
from hf_batchsched.schedules.lr_config import make_lr_policy
from hf_batchsched.schedules.seesaw_pair import SeesawBatch
from hf_batchsched.schedules.simulate import simulate

torch.set_num_threads(1)

TOTAL = 100_000


def base_policies():
    return {
        "cosine": make_lr_policy("cosine", total=TOTAL, unit="samples"),
        "step": make_lr_policy("NSTEP", k0=1e-3, gamma=0.5, l=[20_000, 40_000, 60_000, 80_000], unit="samples"),
        "wsd": make_lr_policy("wsd", num_warmup=5_000, num_stable=55_000, num_decay=40_000, unit="samples"),
        "cosine_on_steps": make_lr_policy("cosine", total=TOTAL // 32, unit="steps"),
    }


@pytest.mark.parametrize("name", list(base_policies()))
@pytest.mark.parametrize("factor", [2, None])
def test_pair_keeps_the_adam_noise_and_covers_the_same_samples(name, factor):
    base = base_policies()[name]
    warmup = 5_000 if name == "wsd" else 0.0
    batch, lr = seesaw(base, base_batch_size=32, max_batch_size=256, factor=factor, warmup=warmup)
    run = simulate(batch, TOTAL)
    assert run.samples_consumed == TOTAL == simulate(ConstantBatch(32), TOTAL).samples_consumed
    capped = False
    # base LR read on the base run's own clock: samples, or steps of the constant-B0 run
    to_base = (lambda c: c / 32) if base.unit == "steps" else (lambda c: c)
    for index, size in enumerate(run.step_sizes[:-1]):  # the last step is partial (its size is the remainder)
        start = run.step_start(index)
        assert size == batch(start)
        ratio = 1.0 if to_base(start) < warmup else base(to_base(start)) / base(warmup)
        lr_base, lr_seesaw = lr_at(base, to_base(start), 1.0), lr_at(lr, start, 1.0)
        # the Adam noise rule at every step, cap included (rel 1e-9: a product and a square root in float64)
        assert lr_seesaw / math.sqrt(size) == pytest.approx(lr_base / math.sqrt(32), rel=1e-9, abs=1e-15)
        capped = capped or size == 256
        if ratio > 0 and 32 / ratio < 256 * (1 - 1e-9) and not capped:
            # before the cap the batch took the whole decay: B0 / r in factor-fold jumps (the last jump at most B0 / r,
            # one factor below it at least), or B0 / r rounded to a whole sample
            ideal = 32 / ratio
            if factor:
                assert ideal / factor * (1 - 1e-9) < size <= ideal * (1 + 1e-9)
            else:
                assert abs(size - ideal) <= 0.5 + 1e-9
    assert capped, "the cap is reached, after which the LR takes the rest of the decay"
    assert run.num_steps < simulate(ConstantBatch(32), TOTAL).num_steps


def test_step_schedule_hand_computed():
    """LR halved at 20K, 40K, 60K, 80K: batch 32 -> 64 -> 128 -> 256 (cap) -> 256; LR x 1/sqrt(2) per jump, then the
    last halving goes to the LR."""
    batch, lr = seesaw(base_policies()["step"], base_batch_size=32, max_batch_size=256)
    points = [0, 20_000, 40_000, 60_000, 80_000]
    assert [batch(c) for c in points] == [32, 64, 128, 256, 256]
    expected = [1e-3, 1e-3 / 2**0.5, 1e-3 / 2, 1e-3 / 2**1.5, 1e-3 / 2**2.5]
    assert [lr(c) for c in points] == pytest.approx(expected, rel=1e-12)
    run = simulate(batch, TOTAL)
    # hand count: 625 steps of 32 up to 20,000; 313 of 64 (the last starts at 39,968 and ends at 40,032); 156 of 128
    # (to 60,000); 157 of 256 (the last a partial 64): 1,251 steps against 3,125 at a constant 32
    assert run.step_sizes[:625] == [32] * 625 and run.step_sizes[625:938] == [64] * 313
    assert run.step_sizes[938:1094] == [128] * 156 and run.step_sizes[1094:] == [256] * 156 + [64]
    assert run.num_steps == 1251 and simulate(ConstantBatch(32), TOTAL).num_steps == 3125


def test_config_round_trip_and_refusals():
    config = {
        "name": "seesaw",
        "lr_policy": {"name": "cosine", "total": TOTAL, "unit": "samples"},
        "base_batch_size": 32,
        "max_batch_size": 256,
    }
    batch = batch_schedule_from_config(config)
    assert isinstance(batch, SeesawBatch) and batch_schedule_from_config(batch.to_config()) == batch
    with pytest.raises(ConfigError, match="max_batch_size 16 is below base_batch_size 32"):
        batch_schedule_from_config({**config, "max_batch_size": 16})
    with pytest.raises(ConfigError, match="not a multiple of 8"):
        batch_schedule_from_config({**config, "base_batch_size": 36, "multiple": 8})
    with pytest.raises(ConfigError, match="factor must be a whole number >= 2"):
        batch_schedule_from_config({**config, "factor": 1})
    with pytest.raises(ConfigError, match="counts 'fraction'"):
        seesaw(make_lr_policy("cosine", total=1.0, unit="fraction"), 32, 256)


# ---- in the trainer ------------------------------------------------------------------------------------------------
def seesaw_trainer(tmp_path, **kwargs):
    base = make_lr_policy("cosine", total=64, unit="samples")
    batch, _ = seesaw(base, base_batch_size=4, max_batch_size=16, multiple=kwargs.pop("multiple", 1))
    trainer = make_trainer(
        tmp_path,
        batch_schedule=batch,
        max_micro_batch_size=4,
        arg_overrides={"num_train_epochs": 2, "weight_decay": 0.1},
        **kwargs,
    )
    return trainer, batch, base


def test_trainer_runs_the_pair(tmp_path):
    trainer, batch, base = seesaw_trainer(tmp_path, couple="wd,betas")
    recorder = StepRecorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    run = simulate(batch, 64)
    assert trainer.ramp_plan == run.step_sizes and trainer.clock.consumed_samples == 64
    assert max(run.step_sizes) == 16 and run.num_steps < simulate(ConstantBatch(4), 64).num_steps
    consumed = 0
    for step in recorder.steps:
        lr = step["groups"][0][0]
        size = step["batch"]
        # the optimizer step's LR: the trainer's base LR 1e-3 x seesaw's multiplier at the step's start
        assert lr == pytest.approx(1e-3 * base(consumed) * math.sqrt(batch(consumed) / 4), rel=1e-9)
        k = size / 4
        # seesaw's LR already carries sqrt(k): weight decay x sqrt(k) keeps B / (lr lambda); betas ** k
        assert step["groups"][0][1] == pytest.approx(0.1 * math.sqrt(k), rel=1e-12)
        assert step["groups"][0][2:] == pytest.approx((0.9**k, 0.999**k), rel=1e-12)
        consumed += size


def test_trainer_refuses_a_second_lr(tmp_path):
    with pytest.raises(ConfigError, match="seesaw batch schedule sets the LR itself"):
        seesaw_trainer(tmp_path, lr_policy={"name": "cosine", "total": 64, "unit": "samples"})
    with pytest.raises(ConfigError, match="would scale it twice"):
        seesaw_trainer(tmp_path, couple="lr=sqrt")


# ---- hf-batchsched plot --------------------------------------------------------------------------------------------
PLOT_FLAGS = ["--lr-policy", "cosine", "--lr-param", "total=1M", "--lr-unit", "samples", "--samples", "1M"]


def test_plot_draws_both_curves_and_prints_the_step_counts(tmp_path, capsys):
    from hf_batchsched.cli import main

    png = tmp_path / "seesaw.png"
    assert main(["plot", *PLOT_FLAGS, "--seesaw", "64", "--max-batch-size", "512", "--output", str(png)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000
    out = capsys.readouterr().out
    batch, _ = seesaw(make_lr_policy("cosine", total=1_000_000, unit="samples"), 64, 512)
    steps, base_steps = simulate(batch, 1_000_000).num_steps, simulate(ConstantBatch(64), 1_000_000).num_steps
    assert steps < base_steps
    assert f"optimizer steps: {steps:,} for 1,000,000 samples" in out and f"takes {base_steps:,}" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:12]}
    # at 60% the cosine multiplier is 0.345 (one halving passed): batch 128, LR 0.345 x sqrt(2) = 0.4886
    assert rows["60%"][-2:] == ["128", "8,594"] and float(rows["60%"][2]) == pytest.approx(0.4886, rel=1e-3)

    # the same pair as a batch_schedule in a YAML file: the same run
    config = tmp_path / "seesaw.yaml"
    config.write_text(
        "samples: 1000000\n"
        "batch_schedule:\n  name: seesaw\n  base_batch_size: 64\n  max_batch_size: 512\n"
        "  lr_policy: {name: cosine, total: 1000000, unit: samples}\n"
    )
    assert main(["plot", "--config", str(config), "--no-png", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["num_steps"], data["baseline_num_steps"], data["lr_is_residual"]) == (steps, base_steps, True)
    assert data["batch_schedule"]["name"] == "seesaw"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seesaw", "64"], "seesaw needs max_batch_size"),
        (["--seesaw", "64", "--max-batch-size", "32"], "max_batch_size 32 is below base_batch_size 64"),
        (["--seesaw", "64", "--max-batch-size", "512", "--batch", "64"], "give one of batch_schedule"),
    ],
)
def test_plot_bad_seesaw_input_is_one_line_and_exit_2(extra, message, capsys):
    from hf_batchsched.cli import main

    assert main(["plot", *PLOT_FLAGS, "--no-png", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
