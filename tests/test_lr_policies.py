"""LR policies: LRBench formulas (hand-checked values), modern shapes (checked against transformers and torch),
composition, the registry, configs and bad-input errors. Pure Python; the whole file runs in about a second."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch

from hf_batchsched.errors import ConfigError
from hf_batchsched.schedules import lrbench
from hf_batchsched.schedules.base import Policy
from hf_batchsched.schedules.lr import group_lrs_at, lr_at
from hf_batchsched.schedules.lr_config import LR_POLICIES, lr_policy_from_config, lr_policy_to_config, make_lr_policy

# Float tolerance for values computed by the same formula in a different order of operations: a few ulps.
ULPS = 1e-12

COS_CFG = {"name": "COS", "k0": 1e-5, "k1": 1e-4, "l": 100}

# One valid parameter set per registered policy; the test below fails if a registration has no sample.
SAMPLE_PARAMS = {
    "FIX": {"k0": 1e-3},
    "STEP": {"k0": 1e-3, "gamma": 0.5, "l": 50},
    "NSTEP": {"k0": 1e-3, "gamma": 0.1, "l": [100, 200]},
    "EXP": {"k0": 1e-3, "gamma": 0.99},
    "INV": {"k0": 1e-3, "gamma": 0.01, "p": 0.75},
    "POLY": {"k0": 1e-5, "k1": 1e-3, "p": 2, "l": 200},
    "SIG": {"k0": 1e-3, "gamma": 0.05, "l": 100},
    "TRI": {"k0": 1e-5, "k1": 1e-3, "l": 40},
    "TRI2": {"k0": 1e-5, "k1": 1e-3, "l": 40},
    "TRIEXP": {"k0": 1e-5, "k1": 1e-3, "gamma": 0.99, "l": 40},
    "SIN": {"k0": 1e-5, "k1": 1e-3, "l": 40},
    "SIN2": {"k0": 1e-5, "k1": 1e-3, "l": 40},
    "SINEXP": {"k0": 1e-5, "k1": 1e-3, "gamma": 0.99, "l": 40},
    "COS": {"k0": 1e-5, "k1": 1e-3, "l": 300},
    "constant": {"factor": 0.5},
    "linear_decay": {"total": 300, "end_factor": 0.1},
    "cosine": {"total": 300, "min_lr_ratio": 0.1},
    "inverse_sqrt": {"timescale": 100},
    "wsd": {"num_warmup": 30, "num_stable": 200, "num_decay": 70, "min_lr_ratio": 0.1},
    "one_cycle": {"total": 300},
    "warmup": {"warmup": 30, "warmup_start_factor": 0.1, "policy": COS_CFG},
    "piecewise": {"boundaries": [100], "regions": [{"name": "FIX", "k0": 1e-4}, COS_CFG]},
    "product": {"policies": [COS_CFG, {"name": "constant", "factor": 0.5}]},
}
# The rest of LRBench's code set (D*, COS2/COSEXP/UPCOS*, restart family) all take k0, k1, l (and gamma if *EXP).
for _name in lrbench.LRBENCH_POLICIES:
    if _name not in SAMPLE_PARAMS:
        SAMPLE_PARAMS[_name] = {"k0": 1e-5, "k1": 1e-3, "l": 40} | ({"gamma": 0.99} if _name.endswith("EXP") else {})
EXPECTED_KIND = {name: "lr" for name in lrbench.LRBENCH_POLICIES}
EXPECTED_KIND.update({name: "lr" for name in ("warmup", "piecewise", "product")})  # they wrap COS (an LR)
EXPECTED_KIND.update({name: "multiplier" for name in ("constant", "linear_decay", "cosine", "inverse_sqrt")})
EXPECTED_KIND.update({name: "multiplier" for name in ("wsd", "one_cycle")})

GRID = [0.5 * i for i in range(0, 801)]  # 0 .. 400 in half steps: covers every phase of every sample


def _build(name: str, unit: str = "steps") -> Policy:
    return make_lr_policy(name, unit=unit, **SAMPLE_PARAMS[name])


def test_every_registered_policy_has_a_sample():
    assert sorted(SAMPLE_PARAMS) == LR_POLICIES.names()
    assert set(EXPECTED_KIND) == set(SAMPLE_PARAMS)


@pytest.mark.parametrize("name", sorted(SAMPLE_PARAMS))
def test_registered_policy_builds_pickles_and_is_finite_positive(name):
    policy = _build(name)
    assert policy.name == name and policy.kind == EXPECTED_KIND[name]
    restored = pickle.loads(pickle.dumps(policy))
    assert restored == policy
    values = [policy(t) for t in GRID]
    assert [restored(t) for t in GRID] == values
    assert all(math.isfinite(v) and v > 0 for v in values), name
    assert len(set(values)) > 1 or name in ("FIX", "constant"), f"{name} does not move over the grid"


@pytest.mark.parametrize("name", sorted(SAMPLE_PARAMS))
def test_unit_is_carried_to_the_policy_and_its_children(name):
    steps, samples = _build(name), _build(name, unit="samples")
    assert samples.unit == "samples"
    for child in _children(samples):
        assert child.unit == "samples"
    # t is read in the policy's own unit, so the numbers are those of the same formula.
    assert [samples(t) for t in GRID[::20]] == [steps(t) for t in GRID[::20]]
    with pytest.raises(ConfigError, match="unknown unit 'epochs'"):
        make_lr_policy(name, unit="epochs", **SAMPLE_PARAMS[name])


def _children(policy: Policy) -> list[Policy]:
    nested = policy.params.get("policy"), *policy.params.get("regions", ()), *policy.params.get("policies", ())
    return [child for child in nested if child is not None]


def test_fraction_unit_uses_fractional_lengths():
    policy = make_lr_policy("warmup", unit="fraction", warmup=0.1, policy={"name": "cosine", "total": 0.9})
    assert (policy(0.0), policy(0.05), policy(0.1), policy(0.55), policy(1.0)) == pytest.approx(
        (0.0, 0.5, 1.0, 0.5, 0.0), abs=ULPS
    )


# ---------------------------------------------------------------------------------------------------------------
# LRBench formulas: values computed by hand from the formulas of git-disl/LRBench lr/LRfunctions.py
# ---------------------------------------------------------------------------------------------------------------

K0, K1 = 0.001, 0.01


def lrbench(name: str, t: float, **params) -> float:
    return make_lr_policy(name, **params)(t)


def test_fix_step_exp_inv_sig_values():
    assert lrbench("FIX", 123, k0=K0) == K0
    # STEP: k0 * gamma ** floor(t / l)
    assert [lrbench("STEP", t, k0=K0, gamma=0.1, l=10) for t in (0, 9.99, 10, 35)] == pytest.approx(
        [K0, K0, K0 * 0.1, K0 * 0.1**3], rel=ULPS
    )
    # EXP: k0 * gamma ** t
    assert lrbench("EXP", 3, k0=K0, gamma=0.5) == pytest.approx(K0 * 0.125, rel=ULPS)
    # INV: k0 * (1 + gamma t) ** -p ; (1 + 0.5 * 6) ** -0.5 = 4 ** -0.5 = 1/2
    assert lrbench("INV", 6, k0=K0, gamma=0.5, p=0.5) == pytest.approx(K0 / 2, rel=ULPS)
    # SIG: k0 / (1 + exp(-gamma (t - l))): k0/2 at t = l; k0/(1 + e^-2) at t = l + 2/gamma
    assert lrbench("SIG", 50, k0=K0, gamma=0.1, l=50) == pytest.approx(K0 / 2, rel=ULPS)
    assert lrbench("SIG", 70, k0=K0, gamma=0.1, l=50) == pytest.approx(K0 / (1 + math.exp(-2)), rel=ULPS)
    # Negative gamma falls; far from l it neither overflows (LRBench's math.exp does) nor leaves [0, k0].
    assert lrbench("SIG", 0, k0=K0, gamma=-0.1, l=50) == pytest.approx(K0 / (1 + math.exp(-5)), rel=ULPS)
    assert 0 <= lrbench("SIG", 1e5, k0=K0, gamma=1.0, l=0) <= K0
    assert lrbench("SIG", 0, k0=K0, gamma=1.0, l=1e5) == 0.0


def test_poly_starts_at_k1_ends_at_k0_and_holds():
    # POLY: (k1 - k0) (1 - t/l)^p + k0
    poly = make_lr_policy("POLY", k0=K0, k1=K1, p=2, l=100)
    assert poly(0) == K1
    assert poly(50) == pytest.approx((K1 - K0) * 0.25 + K0, rel=ULPS)
    assert poly(100) == K0
    assert poly(150) == K0 and poly(250) == K0  # LRBench: (1 - 1.5)^2 > 0 and (1 - 2.5)^2 = 2.25 would rise again
    assert make_lr_policy("POLY", k0=K0, k1=K1, p=0.5, l=100)(150) == K0  # LRBench: complex number


def test_cos_is_periodic_with_half_period_l():
    cos = make_lr_policy("COS", k0=K0, k1=K1, l=100)
    assert cos(0) == K1
    assert cos(50) == pytest.approx((K0 + K1) / 2, rel=ULPS)
    assert cos(100) == pytest.approx(K0, rel=ULPS)
    assert cos(200) == pytest.approx(K1, rel=ULPS)
    # (1 + cos(pi/4)) / 2 of the amplitude at t = l/4
    assert cos(25) == pytest.approx(K0 + (K1 - K0) * (1 + math.sqrt(0.5)) / 2, rel=ULPS)


@pytest.mark.parametrize("name", ["TRI", "TRI2", "TRIEXP", "SIN", "SIN2", "SINEXP"])
def test_cyclic_policies_start_at_k0_and_peak_at_k1(name):
    params = {"k0": K0, "k1": K1, "l": 10} | ({"gamma": 0.9} if name.endswith("EXP") else {})
    policy = make_lr_policy(name, **params)
    decay = 0.9**10 if name.endswith("EXP") else 1.0
    assert policy(0) == K0
    assert policy(10) == pytest.approx(K0 + (K1 - K0) * decay, rel=ULPS)
    assert policy(20) == pytest.approx(K0, rel=ULPS)


def test_tri_and_sin_mid_ramp_and_second_cycle():
    # TRI: k0 + (k1-k0) (2/pi)|asin(sin(pi t / 2l))| is linear: a quarter at t = l/4
    assert lrbench("TRI", 2.5, k0=K0, k1=K1, l=10) == pytest.approx(K0 + (K1 - K0) / 4, rel=ULPS)
    # SIN: |sin(pi t / 2l)| = sin(pi/6) = 1/2 at t = l/3
    assert lrbench("SIN", 10 / 3, k0=K0, k1=K1, l=10) == pytest.approx(K0 + (K1 - K0) / 2, rel=ULPS)
    # *2: amplitude / 2^floor(t / 2l): second peak (t = 3l) at half height, third (t = 5l) at a quarter
    for name in ("TRI2", "SIN2"):
        assert lrbench(name, 30, k0=K0, k1=K1, l=10) == pytest.approx(K0 + (K1 - K0) / 2, rel=ULPS)
        assert lrbench(name, 50, k0=K0, k1=K1, l=10) == pytest.approx(K0 + (K1 - K0) / 4, rel=ULPS)
    # *EXP: amplitude * gamma^t at the second peak
    for name in ("TRIEXP", "SINEXP"):
        value = lrbench(name, 30, k0=K0, k1=K1, gamma=0.95, l=10)
        assert value == pytest.approx(K0 + (K1 - K0) * 0.95**30, rel=ULPS)


def test_triangle_matches_lrbench_asin_sin_expression():
    # LRBench writes the triangle as (2/pi)|asin(sin(pi t / 2l))|; we compute it exactly. asin loses precision
    # next to the peaks (its derivative is infinite at 1: an error of 1 ulp in sin becomes ~sqrt(2e-16) ~ 1.5e-8),
    # so the two agree to 1e-7 of the amplitude, not to ulps.
    for name in ("TRI", "TRI2", "TRIEXP"):
        params = {"k0": K0, "k1": K1, "l": 7} | ({"gamma": 0.99} if name == "TRIEXP" else {})
        policy = make_lr_policy(name, **params)
        for t in [0.37 * i for i in range(200)]:
            wave = (2 / math.pi) * abs(math.asin(math.sin(math.pi * t / 14)))
            if name == "TRI2":
                wave /= 2 ** math.floor(t / 14)
            if name == "TRIEXP":
                wave *= 0.99**t
            assert policy(t) == pytest.approx(K0 + (K1 - K0) * wave, abs=1e-7 * (K1 - K0)), (name, t)


@pytest.mark.parametrize("family", ["RSW", "SINRSW", "COSRSW"])
def test_restart_family_is_k1_at_every_restart(family):
    l = 10  # noqa: E741
    # LRBench's phase, written out: -t/l - floor(-t/l) (0 at restarts, -> 1 just after, -> 0 at the cycle's end)
    shape = {
        "RSW": lambda phase: phase,
        "SINRSW": lambda phase: math.sin(math.pi / 2 * phase),
        "COSRSW": lambda phase: 0.5 * (1 - math.cos(math.pi * phase)),
    }[family]
    policy = make_lr_policy(family, k0=K0, k1=K1, l=l)
    halved = make_lr_policy(family + "2", k0=K0, k1=K1, l=l)
    decayed = make_lr_policy(family + "EXP", k0=K0, k1=K1, gamma=0.9, l=l)
    for t in (0.5, 3, 5, 7.25, 9.5, 12, 25.5):
        lrbench_phase = -t / l - math.floor(-t / l)
        assert policy(t) == pytest.approx(K0 + (K1 - K0) * shape(lrbench_phase), rel=ULPS), t
        assert halved(t) == pytest.approx(K0 + (K1 - K0) * shape(lrbench_phase) / 2 ** math.floor(t / l), rel=ULPS)
        assert decayed(t) == pytest.approx(K0 + (K1 - K0) * shape(lrbench_phase) * 0.9**t, rel=ULPS)
    # The fix: at t = n l LRBench's phase is 0 (k0); ours restarts at k1 (then halved / decayed)
    assert policy(0) == policy(10) == policy(30) == K1
    assert halved(0) == K1 and halved(10) == pytest.approx(K0 + (K1 - K0) / 2, rel=ULPS)
    assert decayed(20) == pytest.approx(K0 + (K1 - K0) * 0.9**20, rel=ULPS)
    assert policy(10 - 1e-9) == pytest.approx(K0, abs=1e-9)  # falls to k0 just before the restart


def test_shifted_and_cosine_variants_start_where_lrbench_says():
    params = {"k0": K0, "k1": K1, "l": 10}
    for name in ("DTRI", "DTRI2", "DSIN", "DSIN2"):  # D*: start at k1, k0 at t = l
        policy = make_lr_policy(name, **params)
        assert policy(0) == K1 and policy(10) == pytest.approx(K0, rel=ULPS), name
    for name in ("DTRI2", "DSIN2"):  # amplitude / 2^floor((t + l) / 2l): second peak at t = 2l is half height
        assert make_lr_policy(name, **params)(20) == pytest.approx(K0 + (K1 - K0) / 2, rel=ULPS)
    for name in ("DTRIEXP", "DSINEXP"):  # amplitude * gamma^t (t, not t + l)
        assert make_lr_policy(name, gamma=0.9, **params)(20) == pytest.approx(K0 + (K1 - K0) * 0.9**20, rel=ULPS)
    upcos = make_lr_policy("UPCOS", **params)  # UPCOS: (1 + cos(pi (t/l + 1))) / 2 rises from k0 to k1
    assert upcos(0) == K0 and upcos(10) == K1 and upcos(5) == pytest.approx((K0 + K1) / 2, rel=ULPS)
    # COS2 halves at t = l, 3l, ... (floor((t + l) / 2l)); UPCOS2 at t = 2l, 4l, ... (floor(t / 2l))
    assert make_lr_policy("COS2", **params)(20) == pytest.approx(K0 + (K1 - K0) / 2, rel=ULPS)
    assert make_lr_policy("UPCOS2", **params)(30) == pytest.approx(K0 + (K1 - K0) / 2, rel=ULPS)
    for name in ("COSEXP", "UPCOSEXP"):
        peak = 20 if name == "COSEXP" else 30
        value = make_lr_policy(name, gamma=0.9, **params)(peak)
        assert value == pytest.approx(K0 + (K1 - K0) * 0.9**peak, rel=ULPS)


def test_nstep_is_pure_counts_milestones_and_instances_do_not_interfere():
    first = make_lr_policy("NSTEP", k0=0.1, gamma=0.1, l=[20, 50])
    assert first(25) == pytest.approx(0.01, rel=ULPS)
    # LRBench: creating a second NSTEP reset the shared counter and the first one jumped back to 0.1 at t=25.
    second = make_lr_policy("NSTEP", k0=1.0, gamma=0.5, l=[10])
    assert first(25) == pytest.approx(0.01, rel=ULPS)
    assert second(25) == 0.5
    # k0 * gamma ** (number of milestones <= t), queried out of order (resume, plotting) and jumping 2 milestones
    for t, expected in [(100, 0.001), (0, 0.1), (50, 0.001), (49.9, 0.01), (20, 0.01), (19, 0.1)]:
        assert first(t) == pytest.approx(expected, rel=ULPS), t


# ---------------------------------------------------------------------------------------------------------------
# Modern shapes: hand-computed phases, and equality with transformers' / torch's own schedules
# ---------------------------------------------------------------------------------------------------------------


def _transformers_lambda(getter, **kwargs):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return getter(optimizer, **kwargs).lr_lambdas[0]


@pytest.mark.parametrize("decay_type", ["linear", "cosine", "1-sqrt"])
def test_wsd_phases(decay_type):
    wsd = make_lr_policy("wsd", num_warmup=10, num_stable=50, num_decay=40, min_lr_ratio=0.2, decay_type=decay_type)
    assert wsd(0) == pytest.approx(0.2, rel=ULPS)  # warmup starts at the floor (as in transformers)
    assert wsd(5) == pytest.approx(0.2 + 0.8 * 0.5, rel=ULPS)
    assert wsd(10) == wsd(35) == wsd(59.9) == 1.0
    mid = {"linear": 0.5, "cosine": 0.5, "1-sqrt": 1 - math.sqrt(0.5)}[decay_type]
    assert wsd(80) == pytest.approx(0.2 + 0.8 * mid, rel=ULPS)
    quarter = {"linear": 0.75, "cosine": (1 + math.cos(math.pi / 4)) / 2, "1-sqrt": 0.5}[decay_type]
    assert wsd(70) == pytest.approx(0.2 + 0.8 * quarter, rel=ULPS)
    assert wsd(100) == wsd(1000) == 0.2


@pytest.mark.parametrize("warmup_type", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("decay_type", ["linear", "cosine", "1-sqrt"])
def test_wsd_equals_transformers_warmup_stable_decay(warmup_type, decay_type):
    from transformers.optimization import get_wsd_schedule

    kwargs = {"warmup_type": warmup_type, "decay_type": decay_type, "min_lr_ratio": 0.1}
    reference = _transformers_lambda(
        get_wsd_schedule, num_warmup_steps=7, num_stable_steps=20, num_decay_steps=13, **kwargs
    )
    ours = make_lr_policy("wsd", num_warmup=7, num_stable=20, num_decay=13, **kwargs)
    for step in range(50):
        assert ours(step) == pytest.approx(reference(step), rel=ULPS), step


def test_warmup_around_modern_shapes_equals_transformers_schedules():
    from transformers.optimization import (
        get_cosine_with_min_lr_schedule_with_warmup,
        get_inverse_sqrt_schedule,
        get_linear_schedule_with_warmup,
    )

    warmup, total = 10, 100
    cases = [
        (
            get_linear_schedule_with_warmup,
            {"num_training_steps": total},
            {"name": "linear_decay", "total": total - warmup},
        ),
        (
            get_cosine_with_min_lr_schedule_with_warmup,
            {"num_training_steps": total, "min_lr_rate": 0.1},
            {"name": "cosine", "total": total - warmup, "min_lr_ratio": 0.1},
        ),
        (get_inverse_sqrt_schedule, {"timescale": 25}, {"name": "inverse_sqrt", "timescale": 25}),
    ]
    for getter, kwargs, inner in cases:
        reference = _transformers_lambda(getter, num_warmup_steps=warmup, **kwargs)
        ours = make_lr_policy("warmup", warmup=warmup, policy=inner)
        assert ours.kind == "multiplier"
        for step in range(total + 1):
            assert ours(step) == pytest.approx(reference(step), rel=ULPS, abs=1e-15), (getter.__name__, step)
    # Past the horizon ours hold their end value; transformers' cosine would start rising again.
    assert make_lr_policy("cosine", total=90, min_lr_ratio=0.1)(95) == 0.1
    assert make_lr_policy("linear_decay", total=90)(95) == 0.0


@pytest.mark.parametrize("anneal", ["cos", "linear"])
def test_one_cycle_equals_torch_one_cycle_lr(anneal):
    total_steps, pct_start, max_lr = 50, 0.3, 0.1
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=max_lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start, anneal_strategy=anneal,
        div_factor=10.0, final_div_factor=100.0, cycle_momentum=False,
    )  # fmt: skip
    # torch's phases end at pct_start * N - 1 and N - 1 (see the one_cycle docstring)
    ours = make_lr_policy(
        "one_cycle", total=total_steps - 1, pct_start=(pct_start * total_steps - 1) / (total_steps - 1),
        div_factor=10.0, final_div_factor=100.0, anneal=anneal,
    )  # fmt: skip
    for step in range(total_steps):
        assert lr_at(ours, step, base_lr=max_lr) == pytest.approx(scheduler.get_last_lr()[0], rel=1e-9), step
        if step < total_steps - 1:
            optimizer.step()
            scheduler.step()
    assert ours(0) == pytest.approx(0.1) and ours(14) == 1.0 and ours(49) == pytest.approx(1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------------------------------------------


def test_warmup_wraps_any_policy_prefix_and_overlay():
    cos = make_lr_policy("COS", k0=0.0, k1=1e-3, l=100)
    prefixed = make_lr_policy("warmup", warmup=20, warmup_start_factor=0.25, policy=cos)
    assert prefixed.kind == "lr"
    assert prefixed(0) == pytest.approx(0.25e-3, rel=ULPS)
    assert prefixed(10) == pytest.approx((0.25 + 0.75 * 0.5) * 1e-3, rel=ULPS)
    assert prefixed(20) == cos(0) == 1e-3  # the wrapped clock starts when warmup ends
    assert prefixed(70) == cos(50) and prefixed(120) == cos(100)
    overlay = make_lr_policy("warmup", warmup=20, policy=cos, prefix=False)
    assert overlay(10) == pytest.approx(0.5 * cos(20), rel=ULPS)  # ramps to the wrapped value at warmup's end
    assert overlay(20) == cos(20) and overlay(70) == cos(70)
    # Continuity at the end of warmup, for both conventions
    for policy in (prefixed, overlay):
        assert policy(20 - 1e-9) == pytest.approx(policy(20), rel=1e-9)
    # Wrapping a multiplier keeps kind="multiplier"; wrapping a wrapped policy works
    double = make_lr_policy("warmup", warmup=5, policy={"name": "warmup", "warmup": 5, "policy": "constant"})
    assert double.kind == "multiplier" and double(5) == 0.0 and double(7.5) == 0.5 and double(10) == 1.0


def test_piecewise_counts_time_from_each_region_start():
    # LRBench's MNIST example: piecewiseLR([11], [SINEXP..., POLY...])
    sinexp = {"name": "SINEXP", "k0": 0.01, "k1": 0.1, "gamma": 0.9, "l": 2}
    poly = {"name": "POLY", "k0": 0.001, "k1": 0.05, "p": 1, "l": 20}
    policy = make_lr_policy("piecewise", boundaries=[11], regions=[sinexp, poly])
    sinexp_alone, poly_alone = lr_policy_from_config(sinexp), lr_policy_from_config(poly)
    for t in (0, 1, 2, 10.5):
        assert policy(t) == sinexp_alone(t)
    assert policy(11) == poly_alone(0) == 0.05  # the boundary belongs to the next region
    assert policy(21) == poly_alone(10) == pytest.approx(0.001 + 0.049 * 0.5, rel=ULPS)
    # Three regions, queried out of order; the last region is open-ended
    three = make_lr_policy("piecewise", boundaries=[10, 30], regions=["constant", {"name": "cosine", "total": 20}, {
        "name": "constant", "factor": 0.1}])  # fmt: skip
    assert [three(t) for t in (40, 20, 5, 30, 1000)] == pytest.approx([0.1, 0.5, 1.0, 0.1, 0.1], rel=ULPS)
    assert three.kind == "multiplier"


def test_product_multiplies_and_combines_kinds():
    cos = make_lr_policy("COS", k0=1e-5, k1=1e-4, l=100)
    half = make_lr_policy("constant", factor=0.5)
    wsd = make_lr_policy("wsd", num_warmup=0, num_stable=50, num_decay=50, decay_type="linear")
    lr_times_multipliers = make_lr_policy("product", policies=[cos, half, wsd])
    assert lr_times_multipliers.kind == "lr"
    assert lr_times_multipliers(75) == pytest.approx(cos(75) * 0.5 * 0.5, rel=ULPS)
    only_multipliers = make_lr_policy("product", policies=[half, wsd])
    assert only_multipliers.kind == "multiplier" and only_multipliers(75) == 0.25
    with pytest.raises(ConfigError, match="'policies'.*at most one factor may be kind='lr'"):
        make_lr_policy("product", policies=[cos, cos])


def test_piecewise_rejects_mixed_kinds_and_wrong_region_count():
    with pytest.raises(ConfigError, match="'regions' mixes"):
        make_lr_policy("piecewise", boundaries=[10], regions=["constant", {"name": "FIX", "k0": 1e-3}])
    with pytest.raises(ConfigError, match="'regions' must hold len\\(boundaries\\) \\+ 1 = 3"):
        make_lr_policy("piecewise", boundaries=[10, 20], regions=["constant", "constant"])


# ---------------------------------------------------------------------------------------------------------------
# Configs, helpers and errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLE_PARAMS))
def test_config_round_trip(name):
    policy = _build(name, unit="tokens")
    config = lr_policy_to_config(policy)
    assert json.loads(json.dumps(config)) == config  # plain data: YAML / JSON / CLI ready
    assert lr_policy_from_config(config) == policy
    assert lr_policy_from_config(json.loads(json.dumps(config))) == policy


def test_config_forms_and_unit_inheritance():
    nested = {
        "name": "warmup",
        "unit": "samples",
        "warmup": 64,
        "policy": {"name": "product", "policies": [COS_CFG, "constant"]},
    }
    policy = lr_policy_from_config(nested)
    inner = policy.params["policy"]
    assert policy.unit == inner.unit == inner.params["policies"][0].unit == "samples"
    assert lr_policy_from_config("constant") == make_lr_policy("constant")
    assert lr_policy_from_config(policy) is policy
    with pytest.raises(ConfigError, match="unit 'steps' inside a policy on unit 'samples'"):
        lr_policy_from_config({**nested, "policy": {**COS_CFG, "unit": "steps"}})
    with pytest.raises(ConfigError, match="'policy' holds a policy on unit 'steps'"):
        make_lr_policy("warmup", unit="samples", warmup=5, policy=make_lr_policy("constant"))
    with pytest.raises(ConfigError, match="has no 'name'; valid names: COS, .*wsd"):
        lr_policy_from_config({"k0": 1.0})


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("COS", {"k0": 0.0, "k1": 0.1, "l": 0}, "parameter 'l' must be > 0, got 0"),
        ("TRI", {"k0": 0.0, "k1": 0.1, "l": -5}, "parameter 'l' must be > 0"),
        ("STEP", {"k0": 0.1, "gamma": 0.0, "l": 10}, "parameter 'gamma' must be > 0"),
        ("TRIEXP", {"k0": 0.0, "k1": 0.1, "gamma": 1.5, "l": 10}, "parameter 'gamma' must be in \\(0, 1\\]"),
        ("SIG", {"k0": 0.1, "gamma": 0, "l": 10}, "parameter 'gamma' must be non-zero"),
        ("COSRSWEXP", {"k0": 0.0, "k1": 0.1, "gamma": 0.0, "l": 10}, "parameter 'gamma' must be in \\(0, 1\\]"),
        ("DSIN", {"k0": -1.0, "k1": 0.1, "l": 10}, "parameter 'k0' must be >= 0"),
        ("INV", {"k0": 0.1, "gamma": 0.1, "p": -1}, "parameter 'p' must be > 0"),
        ("FIX", {"k0": float("nan")}, "parameter 'k0' must be a finite number"),
        ("FIX", {"k0": True}, "parameter 'k0' must be a finite number"),
        ("FIX", {"k0": "1e-3"}, "parameter 'k0' must be a finite number"),
        ("NSTEP", {"k0": 0.1, "gamma": 0.1, "l": [60, 30]}, "parameter 'l' must be strictly increasing"),
        ("NSTEP", {"k0": 0.1, "gamma": 0.1, "l": 30}, "parameter 'l' must be a non-empty list"),
        ("piecewise", {"boundaries": [100, 100], "regions": ["constant"] * 3}, "'boundaries' must be strictly incr"),
        ("piecewise", {"boundaries": [0], "regions": ["constant"] * 2}, "parameter 'boundaries' must be > 0"),
        ("wsd", {"num_warmup": 1, "num_stable": 1, "num_decay": 0}, "parameter 'num_decay' must be > 0"),
        ("wsd", {"num_warmup": 1, "num_stable": 1, "num_decay": 1, "decay_type": "sqrt"}, "'decay_type' must be one"),
        ("wsd", {"num_warmup": 1, "num_stable": 1, "num_decay": 1, "min_lr_ratio": 2}, "'min_lr_ratio' must be in"),
        ("one_cycle", {"total": 100, "pct_start": 1.0}, "parameter 'pct_start' must be in \\(0, 1\\)"),
        ("one_cycle", {"total": 100, "anneal": "cosine"}, "parameter 'anneal' must be one of 'cos', 'linear'"),
        ("warmup", {"warmup": -1, "policy": "constant"}, "parameter 'warmup' must be >= 0"),
        ("warmup", {"warmup": 1, "policy": 3}, "parameter 'policy' must be a Policy, a policy name or a config"),
        ("warmup", {"warmup": 1, "policy": "constant", "warmup_start_factor": 2}, "'warmup_start_factor' must be in"),
        ("product", {"policies": []}, "parameter 'policies' must be a non-empty list"),
        ("COS", {"k0": 0.0, "k1": 0.1, "l": 10, "gamma": 0.5}, "got unknown parameter\\(s\\) gamma; it takes: k0, k1"),
        ("COS", {"k0": 0.0, "k1": 0.1}, "missing required parameter\\(s\\): l"),
        ("COSS", {}, "unknown LR policy 'COSS'; valid choices: COS, "),
        ("warmup", {"warmup": 1, "policy": {"name": "COS", "k0": 0.0, "k1": 0.1, "l": 0}}, "parameter 'l' must be"),
    ],
)
def test_bad_input_names_the_parameter(name, params, message):
    with pytest.raises(ConfigError, match=message):
        make_lr_policy(name, **params)


def test_lr_at_and_group_ratios():
    cos = make_lr_policy("COS", k0=1e-5, k1=1e-4, l=100)
    wsd = make_lr_policy("wsd", num_warmup=0, num_stable=0, num_decay=100, decay_type="linear")
    assert lr_at(cos, 50, base_lr=123.0) == cos(50)  # an absolute LR ignores the optimizer's LR
    assert lr_at(wsd, 50, base_lr=2e-4) == pytest.approx(1e-4, rel=ULPS)
    # LoRA+ style groups: B matrices at 16x the A matrices' LR keep that ratio under both kinds
    initial = [2e-4, 3.2e-3, 1e-6]
    for policy in (cos, wsd):
        lrs = group_lrs_at(policy, 30, initial)
        assert lrs[0] == pytest.approx(lr_at(policy, 30, base_lr=initial[0]), rel=ULPS)
        assert [lr / lrs[0] for lr in lrs] == pytest.approx([1.0, 16.0, 0.005], rel=1e-9)
    with pytest.raises(ConfigError, match="initial_lrs"):
        group_lrs_at(cos, 0, [])


def test_policies_are_hashable_and_compare_by_value():
    assert _build("piecewise") == _build("piecewise")
    assert len({_build(name) for name in SAMPLE_PARAMS}) == len(SAMPLE_PARAMS)
