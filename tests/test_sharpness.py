"""Sharpness estimators: exact answers on models whose Hessian is known, state preservation, fallbacks, LoRA."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from hf_batchsched.errors import ConfigError
from hf_batchsched.probes.hvp import ProbeObjective
from hf_batchsched.probes.lanczos import lanczos, power_iteration
from hf_batchsched.probes.preserve import preserved_model_state
from hf_batchsched.probes.sharpness import (
    average_sharpness,
    estimate_sharpness,
    hessian_trace,
    keskar_sharpness,
    lambda_max,
)

# ----------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------


def _mlp(dtype=torch.float64, seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)  # 227 parameters


def _ce(model, batch):
    return nn.functional.cross_entropy(model(batch["x"]), batch["labels"])


def _classification_batches(dtype=torch.float64, sizes=(12, 20)):
    generator = torch.Generator().manual_seed(1)
    return [
        {
            "x": torch.randn(n, 10, generator=generator, dtype=torch.float64).to(dtype),
            "labels": torch.randint(0, 3, (n,), generator=generator),
        }
        for n in sizes
    ]


def _exact_hessian(model, batches):
    """Dense Hessian of the mean loss over the concatenated batches (what sample weighting must reproduce)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    x = torch.cat([b["x"] for b in batches])
    y = torch.cat([b["labels"] for b in batches])

    def loss(vector):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            size = int(np.prod(shape))
            params[name] = vector[offset : offset + size].view(shape)
            offset += size
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat)


def _lora_llama(attn_implementation="eager", lora_dropout=0.1, seed=0):
    from peft import LoraConfig, get_peft_model

    from hf_batchsched.assets import tiny_llama

    model = tiny_llama(seed=seed, attn_implementation=attn_implementation)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=lora_dropout)
    with torch.random.fork_rng():  # peft draws lora_A from the global RNG
        torch.manual_seed(seed)
        model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero B, so adapter-space perturbations and rescalings matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return model


def _lm_batches(num=2, batch_size=4, seq_len=12):
    from hf_batchsched.assets import synthetic_lm_dataset

    ds = synthetic_lm_dataset(num_samples=num * batch_size, seq_len=seq_len)
    return [
        {k: torch.tensor(ds[i : i + batch_size][k]) for k in ds.column_names}
        for i in range(0, num * batch_size, batch_size)
    ]


# ----------------------------------------------------------------------------------------------------------
# exact Hessian: lambda_max, trace, EoS
# ----------------------------------------------------------------------------------------------------------


def test_lambda_max_matches_dense_eigvalsh_and_weights_batches_by_samples():
    model, batches = _mlp(), _classification_batches()
    top = float(torch.linalg.eigvalsh(_exact_hessian(model, batches))[-1])
    out = lambda_max(model, batches, loss_fn=_ce, max_steps=60, tol=1e-8)
    # 1%: the task's bar; full reorthogonalisation in fp64 actually converges to ~1e-10 relative
    assert out["lambda_max"] == pytest.approx(top, rel=1e-2)
    assert out["lambda_max_fd"] == 0.0  # plain MLP: exact double backprop
    # unweighted averaging of the two batch means (12 vs 20 samples) gives a different Hessian
    unweighted = lambda_max(model, batches, loss_fn=_ce, weight_fn=lambda b: 1.0, max_steps=60, tol=1e-8)
    assert abs(unweighted["lambda_max"] - top) > 1e-3 * abs(top)


def test_hessian_trace_within_three_standard_errors_of_exact():
    model, batches = _mlp(), _classification_batches()
    exact = float(torch.trace(_exact_hessian(model, batches)))
    out = hessian_trace(model, batches, loss_fn=_ce, num_probes=30, seed=3)
    assert out["trace_stderr"] > 0
    assert abs(out["trace"] - exact) <= 3 * out["trace_stderr"]


def test_eos_ratio_sgd_and_adam_preconditioned_match_dense():
    model, batches = _mlp(), _classification_batches()
    hessian = _exact_hessian(model, batches)
    top = float(torch.linalg.eigvalsh(hessian)[-1])
    out = lambda_max(model, batches, loss_fn=_ce, lr=0.1, max_steps=60, tol=1e-8)
    assert out["eos_ratio"] == pytest.approx(top * 0.1 / 2, rel=1e-2)

    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    out = lambda_max(model, batches, loss_fn=_ce, optimizer=sgd, max_steps=60, tol=1e-8)
    assert out["eos_ratio"] == pytest.approx(top * 0.05 / (2 + 2 * 0.9), rel=1e-2)

    trained = _mlp()
    adam = torch.optim.Adam(trained.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    _ce(trained, batches[0]).backward()
    adam.step()
    trained.zero_grad(set_to_none=True)
    hessian = _exact_hessian(trained, batches)
    step = 1
    precond = torch.cat(
        [
            (1 - 0.9**step) * ((adam.state[p]["exp_avg_sq"] / (1 - 0.999**step)).sqrt() + 1e-8).reshape(-1)
            for p in trained.parameters()
        ]
    ).double()
    scaled = hessian / precond.sqrt()[:, None] / precond.sqrt()[None, :]  # P^-1/2 H P^-1/2
    preconditioned = float(torch.linalg.eigvalsh(scaled)[-1])
    out = lambda_max(trained, batches, loss_fn=_ce, optimizer=adam, max_steps=80, tol=1e-8)
    assert out["lambda_max_preconditioned"] == pytest.approx(preconditioned, rel=1e-2)
    assert out["eos_ratio"] == pytest.approx(preconditioned * 1e-3 / 38.0, rel=1e-2)  # (2+2*0.9)/(1-0.9) = 38


def test_lanczos_beats_power_iteration_on_a_known_spectrum():
    eigenvalues = torch.linspace(0.0, 1.0, 200, dtype=torch.float64)
    eigenvalues[-1] = 1.05  # small gap: power iteration converges like (1/1.05)^k
    generator = torch.Generator().manual_seed(0)
    lanczos_result = lanczos(
        lambda v: eigenvalues * v, 200, max_steps=60, tol=1e-6, generator=generator, like=eigenvalues
    )
    power = power_iteration(lambda v: eigenvalues * v, 200, max_steps=60, tol=1e-9, like=eigenvalues)
    assert lanczos_result.eigenvalue == pytest.approx(1.05, rel=1e-6)
    first_within = next(i for i, v in enumerate(lanczos_result.history) if abs(v - 1.05) < 0.01 * 1.05)
    assert all(abs(v - 1.05) >= 0.01 * 1.05 for v in power.history[: 2 * (first_within + 1)])


# ----------------------------------------------------------------------------------------------------------
# Keskar on a quadratic: closed-form box maximum
# ----------------------------------------------------------------------------------------------------------


class Quadratic(nn.Module):
    """f(x) = 0.5 x^T H x + b^T x with diagonal H > 0: the box maximum sits at the vertex sign(grad)."""

    def __init__(self, diagonal, linear, start):
        super().__init__()
        self.x = nn.Parameter(torch.as_tensor(start, dtype=torch.float64).clone())
        self.register_buffer("h", torch.as_tensor(diagonal, dtype=torch.float64))
        self.register_buffer("b", torch.as_tensor(linear, dtype=torch.float64))

    def value(self, x):
        return 0.5 * (self.h * x * x).sum() + (self.b * x).sum()

    def forward(self):
        return self.value(self.x)


def _quadratic_loss(model, batch):
    return model()


def _box_max(model, center, half, basis=None):
    best = -float("inf")
    for signs in itertools.product((-1.0, 1.0), repeat=len(half)):
        y = torch.tensor(signs, dtype=torch.float64) * half
        best = max(best, float(model.value(center + (y if basis is None else basis @ y))))
    return best


def test_keskar_full_space_matches_enumerated_vertex_maximum():
    diagonal, linear = [400.0, 1.0, 50.0, 3000.0, 0.1, 7.0], [0.3, -2.0, 0.01, -0.5, 1.0, 0.0]
    model = Quadratic(diagonal, linear, [0.5, -1.0, 2.0, 0.1, 0.0, 3.0])
    x = model.x.detach().clone()
    eps = 0.05
    half = eps * (x.abs() + 1)
    f0 = float(model().detach())
    expected = 100 * (_box_max(model, x, half) - f0) / (1 + f0)
    out = keskar_sharpness(model, [{}], eps=eps, subspace_dim=None, loss_fn=_quadratic_loss)
    # the maximiser is a vertex that L-BFGS-B reaches exactly (active bounds): only float64 rounding remains
    assert out["keskar"] == pytest.approx(expected, rel=1e-9)
    # curvature is large here, so the first-order prediction is well below the true value
    assert out["keskar_first_order"] < 0.9 * out["keskar"]
    assert torch.equal(model.x.detach(), x)


def test_keskar_subspace_matches_enumeration_in_the_same_subspace():
    model = Quadratic([2.0, 1.0, 3.0, 0.5, 1.5], [5.0, -4.0, 3.0, 6.0, -2.0], [0.2, 0.1, -0.3, 0.4, 0.0])
    x = model.x.detach().clone()
    seed, eps, dim = 7, 0.1, 2
    basis = torch.linalg.qr(torch.randn(5, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).Q
    half = eps * ((basis.T @ x).abs() + 1)
    f0 = float(model().detach())
    # gradient-dominated (|b| >> curvature * box), so the global vertex is the one the ascent reaches
    expected = 100 * (_box_max(model, x, half, basis) - f0) / (1 + f0)
    out = keskar_sharpness(model, [{}], eps=eps, subspace_dim=dim, seed=seed, loss_fn=_quadratic_loss)
    assert out["keskar"] == pytest.approx(expected, rel=1e-9)


# ----------------------------------------------------------------------------------------------------------
# average sharpness: antithetic pairs measure curvature
# ----------------------------------------------------------------------------------------------------------


def test_average_sharpness_on_quadratic_matches_expected_curvature():
    diagonal, start = [4.0, 1.0, 9.0], [1.0, -2.0, 0.5]
    model = Quadratic(diagonal, [10.0, -3.0, 2.0], start)
    sigma = 0.1
    # E[f(x+e)] - f(x) = 0.5 * sum_i h_i (sigma x_i)^2 exactly; antithetic pairs remove the (large) linear term
    expected = 0.5 * sum(h * (sigma * x) ** 2 for h, x in zip(diagonal, start))
    out = average_sharpness(model, [{}], sigma=sigma, num_samples=400, loss_fn=_quadratic_loss, seed=1)
    assert abs(out["avg"] - expected) <= 4 * out["avg_stderr"]
    assert out["avg_stderr"] < 0.15 * expected


# ----------------------------------------------------------------------------------------------------------
# the model is left exactly as found
# ----------------------------------------------------------------------------------------------------------


class BNDropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.drop, self.fc2 = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Linear(8, 3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x, labels=None):
        logits = self.frozen(self.fc2(self.drop(torch.relu(self.bn(self.fc1(x))))))
        return type("Out", (), {"loss": nn.functional.cross_entropy(logits, labels)})()


def _snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "grad_ids": [id(p.grad) for p in model.parameters()],
        "flags": [p.requires_grad for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "python_rng": random.getstate(),
    }


def _assert_same(before, model):
    after = _snapshot(model)
    assert before["state"].keys() == after["state"].keys()
    for key in before["state"]:  # includes BN running_mean/var and num_batches_tracked
        assert torch.equal(before["state"][key], after["state"][key]), key
    for g0, g1 in zip(before["grads"], after["grads"]):
        assert (g0 is None) == (g1 is None) and (g0 is None or torch.equal(g0, g1))
    assert before["grad_ids"] == after["grad_ids"]
    assert before["flags"] == after["flags"]
    assert before["modes"] == after["modes"]
    assert torch.equal(before["torch_rng"], after["torch_rng"])
    assert np.array_equal(before["numpy_rng"], after["numpy_rng"])
    assert before["python_rng"] == after["python_rng"]


_CHEAP = {
    "avg": {"num_samples": 4},
    "keskar": {"maxiter": 2, "subspace_dim": 5},
    "lambda_max": {"max_steps": 3},
    "trace": {"num_probes": 2},
}


@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize("metric", sorted(_CHEAP))
def test_bn_dropout_model_is_bit_identical_after_each_estimator(metric, train_mode):
    torch.manual_seed(0)
    model = BNDropoutNet().double()
    model.train()
    model.drop.eval()  # mixed per-module modes must come back as they were
    generator = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(8, 6, generator=generator, dtype=torch.float64), "labels": torch.arange(8) % 3}]
    model(**batches[0]).loss.backward()  # running stats move, grads exist
    model.fc1.bias.grad = None  # a mix of None and tensors
    model.fc2.bias.grad.zero_()
    before = _snapshot(model)
    out = estimate_sharpness(model, batches, (metric,), train_mode=train_mode, **_CHEAP[metric])
    assert all(np.isfinite(v) for v in out.values())
    _assert_same(before, model)


@pytest.mark.parametrize("merged", [False, True])
def test_lora_llama_is_bit_identical_after_all_estimators(merged):
    model = _lora_llama()
    batches = _lm_batches(num=1)
    model.train()
    model(**batches[0]).loss.backward()
    before = _snapshot(model)
    options = {k: v for opts in _CHEAP.values() for k, v in opts.items()}
    estimate_sharpness(model, batches, tuple(_CHEAP), merged=merged, **options)
    _assert_same(before, model)


def test_train_mode_probe_is_deterministic_despite_dropout():
    model = _lora_llama(lora_dropout=0.5)
    batches = _lm_batches(num=1)
    first = lambda_max(model, batches, train_mode=True, max_steps=4, tol=1e-12)
    second = lambda_max(model, batches, train_mode=True, max_steps=4, tol=1e-12)
    assert first["lambda_max"] == second["lambda_max"]  # dropout masks are re-seeded per batch
    assert first["lambda_max"] != lambda_max(model, batches, max_steps=4, tol=1e-12)["lambda_max"]


# ----------------------------------------------------------------------------------------------------------
# HVP methods and fallbacks
# ----------------------------------------------------------------------------------------------------------


def _hvp(model, batches, method, vector=None, loss_fn=_ce, **kwargs):
    with preserved_model_state(model):
        objective = ProbeObjective(model, batches, loss_fn=loss_fn, hvp_method=method, **kwargs)
        if vector is None:
            vector = torch.randn(objective.numel, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        out = objective.hvp(vector)
        used = objective.hvp_method
        objective.close()
    return out.double(), used


def test_finite_difference_hvp_agrees_with_autograd():
    batches = _classification_batches()
    exact, _ = _hvp(_mlp(torch.float64), batches, "exact")
    fd64, _ = _hvp(_mlp(torch.float64), batches, "fd")
    # fp64, h = 6e-6: truncation ~h^2 * |third derivative| and rounding ~1e-16/h, both <= 1e-9 relative
    assert float((fd64 - exact).norm() / exact.norm()) < 1e-7
    fp32_batches = _classification_batches(torch.float32)
    fd32, _ = _hvp(_mlp(torch.float32), fp32_batches, "fd")
    # fp32, h = 4.9e-3: both error terms ~u^(2/3) = 2.4e-5 times O(1) model constants; allow 1e-3
    assert float((fd32 - exact).norm() / exact.norm()) < 1e-3


def test_sdpa_attention_falls_back_to_finite_differences():
    batches = _lm_batches(num=1)
    sdpa = _lora_llama(attn_implementation="sdpa", lora_dropout=0.0)
    with pytest.raises(RuntimeError, match="not implemented"):
        _hvp(sdpa, batches, "exact", loss_fn=None)
    fd, used = _hvp(sdpa, batches, "auto", loss_fn=None)
    assert used == "fd"
    exact, used = _hvp(_lora_llama(attn_implementation="eager", lora_dropout=0.0), batches, "auto", loss_fn=None)
    assert used == "exact"
    # fp32 central differences (h = 4.9e-3) on a model with O(1) curvature: <= 1e-2 relative (measured ~1e-4)
    assert float((fd - exact).norm() / exact.norm()) < 1e-2


class ReentrantCheckpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _mlp(torch.float64)

    def forward(self, x):
        hidden = self.inner[0](x)
        return torch.utils.checkpoint.checkpoint(lambda h: self.inner[2](self.inner[1](h)), hidden, use_reentrant=True)


def test_reentrant_checkpointing_falls_back_to_finite_differences():
    batches = _classification_batches()
    wrapped = ReentrantCheckpointed()
    fd, used = _hvp(wrapped, batches, "auto")
    assert used == "fd"
    exact, _ = _hvp(_mlp(torch.float64), batches, "exact")
    assert float((fd - exact).norm() / exact.norm()) < 1e-7  # fp64 FD, as above


# ----------------------------------------------------------------------------------------------------------
# LoRA rescaling symmetry
# ----------------------------------------------------------------------------------------------------------


def _rescale_lora(model, factor):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(factor)
            elif "lora_A" in name:
                param.div_(factor)


def test_merged_metrics_are_invariant_to_lora_rescaling():
    batches = _lm_batches(num=1)
    model, rescaled = _lora_llama(lora_dropout=0.0), _lora_llama(lora_dropout=0.0)
    _rescale_lora(rescaled, 10.0)
    with torch.no_grad():
        assert float(model(**batches[0]).loss) == pytest.approx(float(rescaled(**batches[0]).loss), rel=1e-5)
    options = {"max_steps": 8, "tol": 1e-12, "hvp_method": "exact", "sigma": 0.5, "num_samples": 4}
    metrics = ("lambda_max", "avg")
    merged = estimate_sharpness(model, batches, metrics, merged=True, **options)
    merged_rescaled = estimate_sharpness(rescaled, batches, metrics, merged=True, **options)
    # same function of the same merged weights; only fp32 rounding of B@A differs (~1e-6 relative)
    assert merged_rescaled["lambda_max"] == pytest.approx(merged["lambda_max"], rel=1e-3)
    assert merged_rescaled["avg"] == pytest.approx(merged["avg"], rel=1e-2, abs=1e-5)
    adapter = lambda_max(model, batches, max_steps=8, tol=1e-12)["lambda_max"]
    adapter_rescaled = lambda_max(rescaled, batches, max_steps=8, tol=1e-12)["lambda_max"]
    assert adapter_rescaled > 3 * adapter  # adapter coordinates are not invariant (the reason for merged=True)


# ----------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------


def test_bad_input_errors():
    model, batches = _mlp(), _classification_batches()
    with pytest.raises(ConfigError, match="valid choices: avg, keskar, lambda_max, trace"):
        estimate_sharpness(model, batches, ("sharpest",), loss_fn=_ce)
    with pytest.raises(ConfigError, match="max_steps"):
        estimate_sharpness(model, batches, ("avg",), loss_fn=_ce, max_steps=3)
    with pytest.raises(ConfigError, match="valid choices: auto, exact, fd"):
        lambda_max(model, batches, loss_fn=_ce, hvp_method="magic")
    with pytest.raises(ConfigError, match="even number"):
        average_sharpness(model, batches, loss_fn=_ce, num_samples=3)
    with pytest.raises(ConfigError, match="no probe batches"):
        average_sharpness(model, [], loss_fn=_ce)
    with pytest.raises(ConfigError, match="merged=True needs a peft LoRA model"):
        average_sharpness(model, batches, loss_fn=_ce, merged=True)
    frozen = _mlp().requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        lambda_max(frozen, batches, loss_fn=_ce)
    assert not any(p.requires_grad for p in frozen.parameters())

    def out_of_memory(model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    before = _snapshot(model)
    with pytest.raises(ConfigError, match="probe_batch_size"):
        average_sharpness(model, batches, loss_fn=out_of_memory)
    _assert_same(before, model)
    with pytest.raises(ConfigError, match="no 'labels'"):
        average_sharpness(_lora_llama(), [{"input_ids": torch.tensor([[3, 4, 5]])}])


# ----------------------------------------------------------------------------------------------------------
# QLoRA (bitsandbytes 4-bit base) on CPU
# ----------------------------------------------------------------------------------------------------------


def _four_bit_weights(model):
    return [
        (m.weight.data.clone(), getattr(m.weight.quant_state, "packing_format_for_cpu", False))
        for m in model.modules()
        if getattr(getattr(m, "weight", None), "quant_state", None) is not None
    ]


def test_qlora_hvp_through_4bit_base_matches_dequantized_model(tmp_path):
    import bitsandbytes.functional as bnbf
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from hf_batchsched.assets import tiny_llama

    size = {"hidden_size": 64, "intermediate_size": 128}  # bnb's CPU repacking crashes on 32-wide weights
    tiny_llama(seed=0, **size).save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=quantization, device_map="cpu", attn_implementation="eager"
    )
    # the reference: the same network with the dequantized weights in ordinary fp32 Linear layers
    reference = tiny_llama(seed=0, **size)
    with torch.no_grad():
        for module, ref_module in zip(base.modules(), reference.modules()):
            weight = getattr(module, "weight", None)
            if getattr(weight, "quant_state", None) is not None:
                ref_module.weight.copy_(bnbf.dequantize_4bit(weight.data, weight.quant_state))

    def with_lora(model):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
        with torch.no_grad():
            for index, (name, param) in enumerate(model.named_parameters()):
                if "lora_B" in name:
                    param.copy_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(index)))
        return model

    qlora, dense = with_lora(base), with_lora(reference)
    batches = _lm_batches(num=1)
    before = _four_bit_weights(qlora)
    # forward-only in eval mode: bitsandbytes would repack the 4-bit weights for CPU inference here, after which
    # no gradient flows through them; the probe prevents it
    average_sharpness(qlora, batches, num_samples=2, merged=True)
    hv_q, used = _hvp(qlora, batches, "auto", loss_fn=None)
    hv_d, _ = _hvp(dense, batches, "exact", loss_fn=None)
    assert used == "exact"
    # identical dequantized weights, 4-bit kernel vs fp32 matmul rounding: 1e-3 relative
    assert float((hv_q - hv_d).norm() / hv_d.norm()) < 1e-3
    after = _four_bit_weights(qlora)
    assert all(torch.equal(a, b) and fa == fb for (a, fa), (b, fb) in zip(before, after))
    assert estimate_sharpness(qlora, batches, ("lambda_max",), merged=True, max_steps=4)["lambda_max"] > 0

    # a user's own eval-mode forward without grad repacks (on AVX512-BF16 CPUs): gradient metrics then refuse
    qlora.eval()
    with torch.no_grad():
        qlora(**batches[0])
    if any(packed for _, packed in _four_bit_weights(qlora)):
        with pytest.raises(ConfigError, match="repacked"):
            lambda_max(qlora, batches, max_steps=2)
        assert average_sharpness(qlora, batches, num_samples=2)["avg"] == pytest.approx(0.0, abs=1.0)  # forward ok
