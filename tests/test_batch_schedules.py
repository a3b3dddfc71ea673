"""Batch-size schedules, ``simulate``, ``equivalent_to_lr`` and the SGD noise-scale helpers."""

import json
import math
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_batchsched.errors import ConfigError
from hf_batchsched.schedules import (
    BATCH_SCHEDULES,
    ConstantBatch,
    GeometricBatch,
    LinearRampBatch,
    PiecewiseBatch,
    RoundedBatch,
    batch_schedule_from_config,
    batch_schedule_to_config,
    equivalent_to_lr,
    make_batch_schedule,
    make_lr_policy,
    round_batch_size,
    simulate,
)
from hf_batchsched.schedules.batch_base import parse_quantity
from hf_batchsched.schedules.smith import batch_for_noise, lr_for_noise, rescale_batch_for_noise, sgd_noise

FAST = settings(max_examples=60, deadline=None)
EPOCH = 50_000  # CIFAR-10 training samples

LEAVES = {
    "constant": ConstantBatch(48),
    "piecewise": PiecewiseBatch.parse("0:32 2K:64 8K:128"),
    "linear_ramp": LinearRampBatch(16, 8, 3000, 64),
    "geometric": GeometricBatch(10, 3, [100, 200, 300], max_size=200),
}


# --------------------------------------------------------------------------------------------------
# Every leaf
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LEAVES))
def test_leaf_contract(name):
    schedule = LEAVES[name]
    assert name in BATCH_SCHEDULES
    values = [schedule(c) for c in range(0, 12_000, 7)]
    assert all(isinstance(v, int) for v in values)
    assert min(values) == schedule.min_size and max(values) == schedule.max_size  # bounds are tight
    assert values == sorted(values)  # every leaf here grows (or stays)
    assert pickle.loads(pickle.dumps(schedule)) == schedule
    config = batch_schedule_to_config(schedule)
    assert config["name"] == name
    assert batch_schedule_from_config(config) == schedule  # round trip through a YAML-ready dict
    with pytest.raises(ConfigError, match="consumed samples >= 0"):
        schedule(-1)


@pytest.mark.parametrize("name", sorted(LEAVES))
def test_leaf_on_tokens_clock(name):
    config = {**batch_schedule_to_config(LEAVES[name]), "unit": "tokens"}
    schedule = batch_schedule_from_config(config)
    assert schedule.unit == "tokens"
    assert [schedule(c) for c in (0, 150, 2500, 9000)] == [LEAVES[name](c) for c in (0, 150, 2500, 9000)]


# --------------------------------------------------------------------------------------------------
# Piecewise (Megatron's --step-batch-size-schedule)
# --------------------------------------------------------------------------------------------------


def test_piecewise_megatron_example():
    schedule = PiecewiseBatch.parse("0:768 250B:1536 500B:3072 750B:6144", unit="tokens")
    assert schedule.thresholds == (0, 250e9, 500e9, 750e9)
    assert [schedule(t) for t in (0, 250e9 - 1, 250e9, 600e9, 750e9, 14.8e12)] == [768, 768, 1536, 3072, 6144, 6144]
    assert schedule.spec == "0:768 250B:1536 500B:3072 750B:6144"


@pytest.mark.parametrize(
    ("text", "value"), [("0", 0), ("2M", 2e6), ("1.5k", 1500), ("3B", 3e9), ("2T", 2e12), ("1e3", 1000), (7, 7)]
)
def test_parse_quantity(text, value):
    assert parse_quantity(text) == value


def test_piecewise_commas_and_dict_forms_agree():
    by_string = batch_schedule_from_config("0:32, 2M:64, 8M:128")
    by_dict = batch_schedule_from_config({"name": "piecewise", "thresholds": [0, "2M", 8e6], "sizes": [32, 64, 128]})
    assert by_string == by_dict


@given(
    gaps=st.lists(st.integers(1, 10_000), min_size=0, max_size=6),
    sizes=st.lists(st.integers(1, 4096), min_size=7, max_size=7),
    probes=st.lists(st.integers(0, 80_000), min_size=1, max_size=20),
)
@FAST
def test_piecewise_matches_a_reference(gaps, sizes, probes):
    thresholds = [0]
    for gap in gaps:
        thresholds.append(thresholds[-1] + gap)
    sizes = sizes[: len(thresholds)]
    schedule = PiecewiseBatch.parse(" ".join(f"{t}:{s}" for t, s in zip(thresholds, sizes)))
    for consumed in probes:
        expected = [s for t, s in zip(thresholds, sizes) if t <= consumed][-1]
        assert schedule(consumed) == expected
    if sizes == sorted(sizes):
        values = [schedule(c) for c in sorted(probes)]
        assert values == sorted(values)


# --------------------------------------------------------------------------------------------------
# Linear ramp (Megatron's --rampup-batch-size) and geometric (Smith et al.)
# --------------------------------------------------------------------------------------------------


def test_linear_ramp_megatron_gpt3_example():
    # GPT-3 175B in Megatron's examples: --rampup-batch-size 16 16 5859375 --global-batch-size 1536.
    ramp = make_batch_schedule("linear_ramp", start=16, increment=16, ramp_samples=5_859_375, final=1536)
    assert ramp.num_increments == 95
    assert ramp.interval == pytest.approx(5_859_375 / 95)
    assert ramp(0) == 16 and ramp(ramp.interval) == 32 and ramp(5_859_375) == 1536


@given(
    start=st.integers(1, 512),
    increment=st.integers(1, 64),
    count=st.integers(0, 40),
    ramp=st.floats(1.0, 1e7),
    probes=st.lists(st.floats(0, 2e7), min_size=2, max_size=30),
)
@FAST
def test_linear_ramp_is_a_monotone_staircase(start, increment, count, ramp, probes):
    final = start + count * increment
    schedule = LinearRampBatch(start, increment, ramp, final)
    values = [schedule(c) for c in sorted(probes)]
    assert values == sorted(values)
    assert all(start <= v <= final and (v - start) % increment == 0 for v in values)
    assert schedule(0) == start and schedule(ramp) == final


@given(
    start=st.integers(1, 256),
    factor=st.floats(1.0, 8.0),
    gaps=st.lists(st.integers(1, 1000), min_size=1, max_size=5),
    extra=st.integers(0, 10_000),
    probes=st.lists(st.integers(0, 10_000), min_size=2, max_size=30),
)
@FAST
def test_geometric_is_monotone_and_capped(start, factor, gaps, extra, probes):
    milestones = [sum(gaps[: i + 1]) for i in range(len(gaps))]
    cap = start + extra
    schedule = GeometricBatch(start, factor, milestones, max_size=cap)
    values = [schedule(c) for c in sorted(probes)]
    assert values == sorted(values)
    assert all(start <= v <= cap for v in values)
    uncapped = round(start * factor ** len(milestones))
    assert schedule(milestones[-1]) == min(uncapped, cap)


# --------------------------------------------------------------------------------------------------
# Rounding to micro_batch x world_size
# --------------------------------------------------------------------------------------------------


@given(size=st.floats(0, 1e6), multiple=st.integers(1, 512))
@FAST
def test_round_batch_size_properties(size, multiple):
    down, nearest, up = (round_batch_size(size, multiple, mode=m) for m in ("down", "nearest", "up"))
    assert all(v % multiple == 0 and v >= multiple for v in (down, nearest, up))
    assert down <= nearest <= up
    if size >= multiple:
        # within one multiple (and half a multiple for nearest), allowing the 1e-9 snap to an exact multiple
        assert down <= size + 1e-6 * multiple and size - down < multiple
        assert up >= size - 1e-6 * multiple and up - size < multiple
        assert abs(nearest - size) <= multiple / 2 + 1e-6 * multiple


@given(
    sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=6),
    multiple=st.integers(1, 96),
    mode=st.sampled_from(["down", "nearest", "up"]),
)
@FAST
def test_rounded_schedule_respects_multiples_caps_and_order(sizes, multiple, mode):
    sizes = sorted(sizes)
    inner = PiecewiseBatch(tuple(range(0, 100 * len(sizes), 100)), tuple(sizes))
    rounded = RoundedBatch(inner, multiple, mode=mode)
    values = [rounded(c) for c in range(0, 100 * len(sizes) + 50, 25)]
    assert all(v % multiple == 0 for v in values)
    assert all(rounded.min_size <= v <= rounded.max_size for v in values)
    assert values == sorted(values)  # rounding keeps a growing schedule growing


def test_rounded_clamps_and_checks_its_bounds():
    rounded = make_batch_schedule(
        "piecewise", schedule="0:30 100:70 200:500", rounding={"multiple": 16, "min_size": 32, "max_size": 256}
    )
    assert [rounded(c) for c in (0, 100, 200)] == [32, 64, 256]
    assert batch_schedule_from_config(batch_schedule_to_config(rounded)) == rounded
    with pytest.raises(ConfigError, match="max_size 250 is not a multiple of 16"):
        LEAVES["piecewise"].rounded(16, max_size=250)


# --------------------------------------------------------------------------------------------------
# simulate
# --------------------------------------------------------------------------------------------------


@given(
    name=st.sampled_from(sorted(LEAVES)),
    total=st.integers(0, 20_000),
    multiple=st.sampled_from([1, 4, 24]),
    drop_last=st.booleans(),
)
@FAST
def test_simulate_invariants(name, total, multiple, drop_last):
    schedule = LEAVES[name]
    run = simulate(schedule, total, multiple=multiple, drop_last=drop_last)
    assert sum(run.step_sizes) + run.dropped_samples == total
    assert run.consumed == [sum(run.step_sizes[: i + 1]) for i in range(run.num_steps)]
    rounded = RoundedBatch(schedule, multiple) if multiple > 1 else schedule
    starts = [0, *run.consumed[:-1]]
    for i, (start, size) in enumerate(zip(starts, run.step_sizes)):
        if i < run.num_steps - 1 or drop_last:
            assert size == rounded(start) and size % multiple == 0
        else:  # the documented partial last step: the remaining samples
            assert size == min(rounded(start), total - start)
    assert 0 <= run.dropped_samples < max(rounded.max_size, 1)
    if not drop_last:
        assert run.dropped_samples == 0


def test_simulate_max_steps_and_tokens():
    run = simulate(ConstantBatch(10), 1000, max_steps=7)
    assert run.num_steps == 7 and run.dropped_samples == 930
    tokens = PiecewiseBatch.parse("0:2 1K:4", unit="tokens")
    with pytest.raises(ConfigError, match="tokens_per_sample"):
        simulate(tokens, 100)
    run = simulate(tokens, 100, tokens_per_sample=128)  # the switch comes after 1000 / 128 -> 8 samples
    assert run.step_sizes[:5] == [2, 2, 2, 2, 4]
    assert run.steps_done_at(8) == 4 and run.batch_size_at(8) == 4 and run.batch_size_at(100) is None


# --------------------------------------------------------------------------------------------------
# Bad input: one ConfigError naming the problem
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: PiecewiseBatch.parse("0:32 8M:64 2M:128"), "strictly increase.*8M then 2M"),
        (lambda: PiecewiseBatch.parse("0:32 2M:64 2M:128"), "strictly increase"),
        (lambda: PiecewiseBatch.parse("1M:32 2M:64"), "must start at threshold 0"),
        (lambda: PiecewiseBatch.parse("0:32 2M:0"), "batch size at threshold 2M must be a positive integer"),
        (lambda: PiecewiseBatch.parse("0:32 2M"), "not 'threshold:size'"),
        (lambda: PiecewiseBatch.parse("0:32 2X:64"), "cannot read '2X' as a quantity"),
        (lambda: ConstantBatch(0), "constant batch size must be a positive integer"),
        (lambda: ConstantBatch(12.5), "positive integer"),
        (lambda: ConstantBatch(8, unit="steps"), "unknown batch schedule unit 'steps'"),
        (lambda: LinearRampBatch(16, 8, 1000, 30), "not a multiple of the increment 8"),
        (lambda: LinearRampBatch(64, 8, 1000, 16), "below the ramp's start"),
        (lambda: LinearRampBatch(16, 0, 1000, 32), "ramp increment must be a positive integer"),
        (lambda: GeometricBatch(128, 5, [10, 5], 5120), "milestones must strictly increase"),
        (lambda: GeometricBatch(128, 0.5, [10], 5120), "factor must be >= 1"),
        (lambda: GeometricBatch(128, 5, [10], 64), "max_size 64 is below the start batch size 128"),
        (lambda: make_batch_schedule("cubic", size=4), "unknown batch schedule 'cubic'; valid choices"),
        (lambda: make_batch_schedule("constant", size=4, sise=5), "unknown parameter.*sise"),
        (lambda: batch_schedule_from_config("lots"), "cannot read batch schedule 'lots'"),
        (lambda: batch_schedule_from_config({"size": 4}), "has no 'name'"),
        (lambda: round_batch_size(100, 0), "multiple must be a positive integer"),
        (lambda: round_batch_size(100, 8, mode="sideways"), "unknown rounding mode"),
    ],
)
def test_bad_input_names_the_problem(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


# --------------------------------------------------------------------------------------------------
# equivalent_to_lr: Smith et al.'s CIFAR-10 set-up
# --------------------------------------------------------------------------------------------------


def cifar_decay(unit: str = "samples"):
    """LR 0.1, x0.2 at epochs 60, 120, 160 of 200 (the paper's "decaying learning rate" run)."""
    return make_lr_policy("NSTEP", k0=0.1, gamma=0.2, l=[60 * EPOCH, 120 * EPOCH, 160 * EPOCH], unit=unit)


def test_equivalent_to_lr_reproduces_smiths_update_counts():
    batch, lr = equivalent_to_lr(cifar_decay(), base_batch_size=128, dataset_size=EPOCH, max_batch_size=5120)
    assert [batch(e * EPOCH) for e in (0, 59.99, 60, 120, 160, 199)] == [128, 128, 640, 3200, 5120, 5120]
    decayed = simulate(ConstantBatch(128), 200 * EPOCH).num_steps
    increased = simulate(batch, 200 * EPOCH).num_steps
    # Independent arithmetic: each phase starts where the previous step crossed its milestone.
    phase = [math.ceil(3e6 / 128)]  # 23438 steps -> 3,000,064 samples
    phase.append(math.ceil((6e6 - 128 * phase[0]) / 640))  # 4688 -> 6,000,384
    phase.append(math.ceil((8e6 - 128 * phase[0] - 640 * phase[1]) / 3200))  # 625 -> 8,000,384
    phase.append(math.ceil((10e6 - 128 * phase[0] - 640 * phase[1] - 3200 * phase[2]) / 5120))  # 391
    assert (decayed, increased) == (78_125, 29_142) == (78_125, sum(phase))
    # The paper reports "~80,000" and "~29,000" (two significant figures); we are within 3% of both.
    assert decayed == pytest.approx(80_000, rel=0.03) and increased == pytest.approx(29_000, rel=0.03)
    # The paper's hybrid: the LR stays 0.1 while B grows, and decays by 5120/16000 once B is capped.
    assert [lr(e * EPOCH) for e in (0, 60, 120)] == pytest.approx([0.1, 0.1, 0.1], rel=1e-12)
    assert lr(160 * EPOCH) == pytest.approx(0.1 * 0.2**3 * 5120 / 128, rel=1e-12)
    assert lr.unit == "samples" and lr.kind == "lr"
    batch_copy, lr_copy = pickle.loads(pickle.dumps((batch, lr)))  # both travel to DDP workers / checkpoints
    assert batch_copy == batch and [lr_copy(e * EPOCH) for e in (0, 170)] == [lr(e * EPOCH) for e in (0, 170)]


@pytest.mark.parametrize(
    ("lr0", "base", "steps", "paper"),
    [
        (0.5, 640, 6407, 6500),  # "eps0 = 0.5, B0 = 640, increasing B": ~6,500 updates (within 2%)
        (0.5, 3200, 2305, 2500),  # "eps0 = 0.5, m = 0.98, B0 = 3200": < 2,500 updates (momentum cancels: fixed m)
    ],
)
def test_equivalent_to_lr_smiths_larger_effective_lr_runs(lr0, base, steps, paper):
    decay = make_lr_policy("NSTEP", k0=lr0, gamma=0.2, l=[60 * EPOCH, 120 * EPOCH, 160 * EPOCH], unit="samples")
    batch, _ = equivalent_to_lr(decay, base_batch_size=base, dataset_size=EPOCH, max_batch_size=5120)
    measured = simulate(batch, 200 * EPOCH).num_steps
    assert measured == steps
    assert measured == pytest.approx(paper, rel=0.02) if base == 640 else measured < paper


@pytest.mark.parametrize("multiple", [1, 48])
def test_equivalent_to_lr_keeps_the_noise_scale(multiple):
    decay = cifar_decay()
    batch, lr = equivalent_to_lr(decay, base_batch_size=128, dataset_size=EPOCH, multiple=multiple)
    assert batch.max_size == 4992 if multiple == 48 else batch.max_size == 5000  # default cap N // 10, rounded
    for consumed in range(0, 200 * EPOCH, 250_000):
        size = batch(consumed)
        assert size % multiple == 0
        # g ~ lr N / B is the original's at every point, rounding included (the residual LR absorbs it).
        assert lr(consumed) / size == pytest.approx(decay(consumed) / 128, rel=1e-12)


def test_equivalent_to_lr_exact_noise_and_momentum():
    decay = cifar_decay()
    batch, lr = equivalent_to_lr(decay, base_batch_size=128, dataset_size=EPOCH, exact_noise=True, momentum=0.9)
    for consumed in (0, 3e6, 6e6, 8e6, 9.9e6):
        original = sgd_noise(decay(consumed), EPOCH, 128, momentum=0.9)
        assert sgd_noise(lr(consumed), EPOCH, batch(consumed), momentum=0.9) == pytest.approx(original, rel=1e-12)
    assert batch(3e6) == 634  # exact noise: 633.5 rounded, a bit less than 5x (640) as N / B - 1 < N / B
    # Lowering momentum 0.95 -> 0.9 at a constant LR halves the noise g ~ lr N / (B (1 - m)): the equivalent run
    # keeps m = 0.95 and doubles the batch instead.
    fixed = make_lr_policy("FIX", k0=0.1, unit="samples")
    momentum = make_lr_policy("NSTEP", k0=0.95, gamma=0.9 / 0.95, l=[1000], unit="samples")
    batch, lr = equivalent_to_lr(fixed, base_batch_size=100, dataset_size=10**6, momentum=momentum)
    assert (batch(999), batch(1000)) == (100, 200) and lr(1000) == pytest.approx(0.1)


def test_equivalent_to_lr_adam_steps_and_warmup():
    decay = cifar_decay()
    batch, lr = equivalent_to_lr(decay, base_batch_size=128, dataset_size=10**6, optimizer="adam")
    assert [batch(e * EPOCH) for e in (0, 60, 120)] == [128, 3200, 80_000]  # 5x LR decay -> 25x batch (k = 2)
    assert lr(60 * EPOCH) == pytest.approx(0.1) and lr(120 * EPOCH) == pytest.approx(0.1)
    assert lr(160 * EPOCH) == pytest.approx(0.1 * 0.2**3 * math.sqrt(100_000 / 128))
    # A policy on optimizer steps is read at consumed / B0, the original run's steps.
    steps = make_lr_policy("NSTEP", k0=0.1, gamma=0.5, l=[100], unit="steps")
    batch, lr = equivalent_to_lr(steps, base_batch_size=10, dataset_size=10_000)
    assert (batch(999), batch(1000)) == (10, 20) and lr.unit == "samples"
    # A warmup from 0 is left to the LR: the batch stays at B0 until it ends, and the reference LR is the peak.
    warm = make_lr_policy("warmup", warmup=1000, policy=cifar_decay(), unit="samples")
    with pytest.raises(ConfigError, match="warmup="):
        equivalent_to_lr(warm, base_batch_size=128, dataset_size=EPOCH)
    batch, lr = equivalent_to_lr(warm, base_batch_size=128, dataset_size=EPOCH, warmup=1000)
    assert (batch(500), lr(500)) == (128, pytest.approx(0.05))
    assert (batch(1000), lr(1000)) == (128, pytest.approx(0.1))
    assert (batch(1000 + 60 * EPOCH), lr(1000 + 60 * EPOCH)) == (640, pytest.approx(0.1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 64}, "max_batch_size 64 is below base_batch_size 128"),
        ({"dataset_size": 1000}, "max_batch_size 100 is below base_batch_size 128"),
        ({"optimizer": "lion"}, "unknown optimizer 'lion'"),
        ({"optimizer": "adam", "exact_noise": True}, "exact_noise=True needs k = 1"),
        ({"unit": "tokens"}, "counts 'samples' but the batch schedule counts 'tokens'"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"base_batch_size": 0}, "base_batch_size must be a positive integer"),
    ],
)
def test_equivalent_to_lr_bad_input(kwargs, message):
    arguments = {"base_batch_size": 128, "dataset_size": EPOCH, **kwargs}
    with pytest.raises(ConfigError, match=message):
        equivalent_to_lr(cifar_decay(), **arguments)


def _equivalent_cases():
    momentum = make_lr_policy("NSTEP", k0=0.95, gamma=0.9 / 0.95, l=[1000], unit="samples")
    steps = make_lr_policy("NSTEP", k0=0.1, gamma=0.5, l=[100], unit="steps")
    warm = make_lr_policy("warmup", warmup=1000, policy=cifar_decay(), unit="samples")
    return {
        "smith": (cifar_decay(), {"base_batch_size": 128, "dataset_size": EPOCH, "max_batch_size": 5120}),
        "multiple_exact": (cifar_decay(), {"base_batch_size": 128, "dataset_size": EPOCH, "multiple": 64,
                                           "exact_noise": True, "momentum": 0.9}),
        "adam_warmup": (warm, {"base_batch_size": 128, "dataset_size": 10**6, "optimizer": "adam", "warmup": 1000}),
        "steps_policy": (steps, {"base_batch_size": 10, "dataset_size": 10_000}),
        "momentum_policy": (make_lr_policy("FIX", k0=0.1, unit="samples"),
                            {"base_batch_size": 100, "dataset_size": 10**6, "momentum": momentum}),
    }  # fmt: skip


@pytest.mark.parametrize("case", sorted(_equivalent_cases()))
def test_equivalent_to_lr_schedule_round_trips_through_its_config(case):
    policy, kwargs = _equivalent_cases()[case]
    batch, _ = equivalent_to_lr(policy, **kwargs)
    config = batch_schedule_to_config(batch)
    assert config["name"] == "equivalent_to_lr" and "equivalent_to_lr" in BATCH_SCHEDULES
    text = json.dumps(config)  # plain JSON: what `hf-batchsched plot --json` prints and YAML configs hold
    rebuilt = batch_schedule_from_config(json.loads(text))
    assert rebuilt == batch  # same dataclass: LR policy, cap, multiple, warmup, time scale, momentum
    probes = [0, 500, 999, 1000, 2000, 3e6, 6e6, 8e6, 9.9e6]
    assert [rebuilt(c) for c in probes] == [batch(c) for c in probes]
    assert batch_schedule_to_config(rebuilt) == config


def test_equivalent_to_lr_config_is_checked_like_the_function():
    config = batch_schedule_to_config(equivalent_to_lr(cifar_decay(), base_batch_size=128, dataset_size=EPOCH)[0])
    with pytest.raises(ConfigError, match="max_batch_size 64 is below base_batch_size 128"):
        batch_schedule_from_config({**config, "max_batch_size": 64})
    with pytest.raises(ConfigError, match="unknown LR policy 'NOPE'"):
        batch_schedule_from_config({**config, "lr_policy": {"name": "NOPE"}})
    # its own `multiple` goes to the schedule, not to a RoundedBatch wrapper
    assert make_batch_schedule(**{**config, "multiple": 64}).multiple == 64


def test_simulate_refuses_an_online_schedule():
    from hf_batchsched.schedules.adaptive import AdaptiveBatchSchedule

    adaptive = batch_schedule_from_config({"name": "adaptive", "min_size": 32, "max_size": 512})
    assert isinstance(adaptive, AdaptiveBatchSchedule) and adaptive.online
    assert not any(schedule.online for schedule in LEAVES.values())
    for schedule in (adaptive, adaptive.rounded(16)):
        with pytest.raises(ConfigError, match="cannot be simulated or plotted ahead of time.*starting size is 32"):
            simulate(schedule, 1000)
    with pytest.raises(ConfigError, match="cannot be simulated"):
        simulate(adaptive, 1000, multiple=16)


# --------------------------------------------------------------------------------------------------
# Noise-scale helpers
# --------------------------------------------------------------------------------------------------


@given(
    lr=st.floats(1e-6, 10),
    n=st.integers(2, 10**7),
    fraction=st.floats(1e-6, 0.999),
    m=st.floats(0, 0.99),
)
@FAST
def test_noise_helpers_are_inverses(lr, n, fraction, m):
    batch = max(1.0, fraction * n)
    if batch >= n:
        return
    g = sgd_noise(lr, n, batch, m)
    assert batch_for_noise(g, lr, n, m) == pytest.approx(batch, rel=1e-9)
    assert lr_for_noise(g, n, batch, m) == pytest.approx(lr, rel=1e-9)
    # B ~ lr / (1 - m): doubling the LR and halving 1 - m quadruples the batch (B << N rule).
    assert rescale_batch_for_noise(batch, lr=lr, new_lr=2 * lr, momentum=m, new_momentum=(1 + m) / 2) == (
        pytest.approx(4 * batch, rel=1e-9)
    )
    exact = rescale_batch_for_noise(batch, lr=lr, new_lr=2 * lr, momentum=m, dataset_size=n)
    assert sgd_noise(2 * lr, n, exact, m) == pytest.approx(g, rel=1e-9, abs=1e-12)


def test_noise_helpers_bad_input():
    with pytest.raises(ConfigError, match="larger than dataset_size"):
        sgd_noise(0.1, 100, 200)
    with pytest.raises(ConfigError, match=r"momentum must be in \[0, 1\)"):
        sgd_noise(0.1, 100, 10, momentum=1.0)
    with pytest.raises(ConfigError, match="lr must be > 0"):
        batch_for_noise(1.0, lr=0.0, dataset_size=100)


def test_rounding_is_one_nested_block_whose_keys_mean_one_thing():
    """The rounding wrapper's options live in their own ``rounding`` block; ``max_size`` next to ``name`` is always
    the schedule's own (geometric's cap), and the block's keys are checked against ``RoundedBatch``'s."""
    cfg = {"name": "geometric", "start": 100, "factor": 2, "milestones": [10], "max_size": 400}
    assert batch_schedule_from_config(cfg).max_size == 400  # the cap, no wrapper
    rounded = batch_schedule_from_config({**cfg, "rounding": {"multiple": 64, "max_size": 320}})
    assert isinstance(rounded, RoundedBatch) and rounded.schedule.max_size == 400 and rounded(10) == 192
    assert batch_schedule_from_config(batch_schedule_to_config(rounded)) == rounded
    with pytest.raises(ConfigError, match="rounding got unknown key.*multple; it takes: max_size, min_size, mode"):
        batch_schedule_from_config({**cfg, "rounding": {"multple": 64}})
    with pytest.raises(ConfigError, match="geometric' got unknown parameter.*multiple"):
        batch_schedule_from_config({**cfg, "multiple": 64})


def test_rounded_error_mode_and_never_raise_refuse_instead_of_rounding():
    """The sampler's rules, on the same wrapper: ``mode="error"`` refuses a size off a multiple, ``never_raise``
    refuses a size below the multiple instead of raising it."""
    assert RoundedBatch(ConstantBatch(12), 8)(0) == 8 and RoundedBatch(ConstantBatch(4), 8)(0) == 8
    assert RoundedBatch(ConstantBatch(16), 8, mode="error")(0) == 16
    with pytest.raises(ConfigError, match="global batch of 12 at samples=0, not a multiple of 8 and rounding mode"):
        RoundedBatch(ConstantBatch(12), 8, mode="error")(0)
    with pytest.raises(ConfigError, match="never raised above the schedule"):
        RoundedBatch(ConstantBatch(4), 8, never_raise=True)(0)
    assert RoundedBatch(ConstantBatch(12), 8, never_raise=True)(0) == 8
