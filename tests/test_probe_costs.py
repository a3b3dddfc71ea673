"""What the sharpness probes cost, counted: graph builds per Lanczos run, parameter copies, Keskar subspace builds;
and the finite-difference step against the exact HVP on a low-curvature model."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from test_sharpness import (
    BNDropoutNet,
    _assert_same,
    _ce,
    _classification_batches,
    _lm_batches,
    _mlp,
    _snapshot,
)
from torch import nn

from hf_batchsched.assets import tiny_llama
from hf_batchsched.errors import ConfigError
from hf_batchsched.probes import _subspace, hvp
from hf_batchsched.probes.hvp import ProbeObjective
from hf_batchsched.probes.lanczos import lanczos
from hf_batchsched.probes.preserve import preserved_model_state
from hf_batchsched.probes.sharpness import keskar_sharpness, lambda_max


def _lanczos_run(model, batches, steps=6, loss_fn=_ce, train_mode=False, **options):
    with preserved_model_state(model, train_mode=train_mode) as preserved:
        objective = ProbeObjective(model, batches, loss_fn=loss_fn, hvp_method="exact", preserved=preserved, **options)
        result = lanczos(objective.hvp, objective.numel, steps, 0.0, like=torch.zeros(1, dtype=objective.dtype))
        counts = {
            "hvps": objective.num_hvps,
            "forwards": objective.num_forwards,
            "builds": objective.num_graph_builds,
            "kept": objective.kept_graphs,
            "graph_bytes": dict(objective.graph_bytes),
        }
        objective.close()
    return result, counts


# ----------------------------------------------------------------------------------------------------------
# exact HVPs: one first-order graph per probe batch and Lanczos run
# ----------------------------------------------------------------------------------------------------------


def test_lanczos_builds_each_batch_graph_once_and_matches_rebuilding():
    model, batches = _mlp(), _classification_batches()  # 2 batches, fp64
    kept, counts = _lanczos_run(model, batches)
    assert counts["hvps"] == 6
    assert counts["forwards"] == counts["builds"] == 2  # one per batch for the whole run
    assert counts["kept"] == 2 and all(size > 0 for size in counts["graph_bytes"].values())
    rebuilt, counts = _lanczos_run(model, batches, reuse_graph=False)
    assert counts["forwards"] == counts["builds"] == 12  # the old cost: every HVP redoes every batch
    assert counts["kept"] == 0
    forced, counts = _lanczos_run(model, batches, reuse_graph=True)
    assert counts["builds"] == 2
    # the same double backward either way; only the order of float64 sums could differ
    assert kept.eigenvalue == pytest.approx(rebuilt.eigenvalue, rel=1e-12)
    assert forced.eigenvalue == pytest.approx(rebuilt.eigenvalue, rel=1e-12)


def test_automatic_reuse_keeps_only_what_fits_in_half_the_free_memory(monkeypatch):
    model, batches = _mlp(), _classification_batches(sizes=(16, 16))  # two batches, same graph size
    _, counts = _lanczos_run(model, batches)
    one_graph = max(counts["graph_bytes"].values())
    # free memory for one graph and a half: the budget (half of it) holds none; for three graphs, one
    monkeypatch.setattr(hvp, "available_memory", lambda device: int(1.5 * one_graph))
    _, counts = _lanczos_run(model, batches)
    assert counts["kept"] == 0 and counts["builds"] == 12
    monkeypatch.setattr(hvp, "available_memory", lambda device: int(3 * one_graph))
    _, counts = _lanczos_run(model, batches)
    assert counts["kept"] == 1 and counts["builds"] == 2 + 5  # batch 1 rebuilt at HVPs 2..6


def test_graph_size_counts_the_saved_activations_not_the_parameters():
    batches = _classification_batches(sizes=(64,))
    _, counts = _lanczos_run(_mlp(), batches, steps=2)
    # at least the (64, 16) hidden activations in float64; the 227 parameters (1.8 kB) are not counted twice
    assert counts["graph_bytes"][0] >= 64 * 16 * 8
    wide = _classification_batches(sizes=(256,))
    _, wide_counts = _lanczos_run(_mlp(), wide, steps=2)
    assert wide_counts["graph_bytes"][0] > 3 * counts["graph_bytes"][0]  # grows with the batch


def test_an_offset_frees_the_kept_graphs():
    model, batches = _mlp(), _classification_batches()
    with preserved_model_state(model) as preserved:
        objective = ProbeObjective(model, batches, loss_fn=_ce, hvp_method="exact", preserved=preserved)
        vector = torch.randn(objective.numel, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        first = objective.hvp(vector)
        assert objective.kept_graphs == 2
        objective.loss(0.01 * vector)  # the variables move: kept graphs describe another point
        assert objective.kept_graphs == 0
        again = objective.hvp(vector)  # back at base, rebuilt
        assert objective.num_graph_builds == 4 and objective.kept_graphs == 2
        objective.close()
    assert torch.allclose(first, again, rtol=1e-12, atol=0)


def _bn_batches():
    generator = torch.Generator().manual_seed(0)
    return [
        {"x": torch.randn(8, 6, generator=generator, dtype=torch.float64), "labels": torch.arange(8) % 3}
        for _ in range(2)
    ]


def test_train_mode_batchnorm_keeps_its_graphs_and_leaves_the_model_as_found():
    torch.manual_seed(0)
    model, batches = BNDropoutNet().double(), _bn_batches()
    before = _snapshot(model)
    # each batch's forward moves the BN running statistics; train-mode BN normalises with the batch's own
    # statistics, so the kept graphs stay valid (autograd would refuse them otherwise)
    kept, counts = _lanczos_run(model, batches, steps=4, loss_fn=None, train_mode=True)
    rebuilt, _ = _lanczos_run(model, batches, steps=4, loss_fn=None, train_mode=True, reuse_graph=False)
    assert counts["kept"] == 2 and counts["builds"] == 2
    assert kept.eigenvalue == pytest.approx(rebuilt.eigenvalue, rel=1e-12)
    _assert_same(before, model)


class RefreshedScale(nn.Module):
    """Rewrites a buffer in place at every train-mode forward (same value) and multiplies by it."""

    def __init__(self):
        super().__init__()
        self.inner = _mlp()
        self.register_buffer("scale", torch.ones(3, dtype=torch.float64))

    def forward(self, x, labels):
        if self.training:
            self.scale.copy_(self.scale)  # bumps the version autograd checks saved tensors against
        logits = self.inner(x) * self.scale
        return type("Out", (), {"loss": nn.functional.cross_entropy(logits, labels)})()


def test_a_graph_made_stale_by_an_in_place_buffer_update_falls_back_to_rebuilding():
    model, batches = RefreshedScale(), _classification_batches()
    before = _snapshot(model)
    # batch 1's forward rewrites the buffer batch 0's kept graph saved: the next HVP finds that graph stale,
    # drops reuse for good and redoes the HVP
    kept, counts = _lanczos_run(model, batches, steps=4, loss_fn=None, train_mode=True, reuse_graph=True)
    rebuilt, _ = _lanczos_run(model, batches, steps=4, loss_fn=None, train_mode=True, reuse_graph=False)
    assert counts["kept"] == 0
    # HVP 1 builds and keeps both, HVP 2 finds batch 0's stale and redoes both, HVPs 3 and 4 build both
    assert counts["builds"] == 2 + 2 + 2 * 2
    assert kept.eigenvalue == pytest.approx(rebuilt.eigenvalue, rel=1e-12)
    _assert_same(before, model)


def test_lambda_max_on_a_lora_llama_builds_one_graph_per_batch(monkeypatch):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(seed=0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    batches = _lm_batches(num=2)
    builds = []
    original = ProbeObjective._first_order_graph

    def counting(self, index, batch):
        builds.append(index)
        return original(self, index, batch)

    monkeypatch.setattr(ProbeObjective, "_first_order_graph", counting)
    out = lambda_max(model, batches, max_steps=5, tol=1e-12)
    assert out["lambda_max_hvps"] == 5 and builds == [0, 1]
    builds.clear()
    assert lambda_max(model, batches, max_steps=5, tol=1e-12, reuse_graph=False)["lambda_max"] == pytest.approx(
        out["lambda_max"],
        rel=1e-5,  # fp32: the same arithmetic, at most summation-order rounding
    )
    assert len(builds) == 10


def test_reuse_graph_must_be_a_bool_or_none():
    with pytest.raises(ConfigError, match="reuse_graph must be True, False or None"):
        lambda_max(_mlp(), _classification_batches(), loss_fn=_ce, reuse_graph="yes")


# ----------------------------------------------------------------------------------------------------------
# one copy of the trainable parameters per probe
# ----------------------------------------------------------------------------------------------------------


def test_probes_copy_each_trainable_parameter_once(monkeypatch):
    model, batches = _mlp(), _classification_batches()  # no buffers: every clone below is a parameter copy
    shapes = [p.shape for p in model.parameters()]
    clones = []
    original = torch.Tensor.clone

    def counting(tensor, *args, **kwargs):
        clones.append(tensor.shape)
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", counting)
    lambda_max(model, batches, loss_fn=_ce, max_steps=3)
    assert sorted(map(tuple, clones)) == sorted(map(tuple, shapes))  # was twice each (state + objective base)
    clones.clear()
    keskar_sharpness(model, batches, loss_fn=_ce, maxiter=2, subspace_dim=5)
    assert sorted(map(tuple, clones)) == sorted(map(tuple, shapes))


def test_objective_base_is_the_preserved_copy_unless_the_parameter_moved():
    model, batches = _mlp(), _classification_batches()
    with preserved_model_state(model) as preserved:
        with torch.no_grad():
            model[2].bias.add_(1.0)  # changed after the state was saved: the objective needs its own copy
        objective = ProbeObjective(model, batches, loss_fn=_ce, preserved=preserved)
        for param, base in zip(objective.variables, objective.space.base):
            saved = preserved.value_of(param)
            assert (base is saved) == (param is not model[2].bias)
            assert torch.equal(base, param)
        objective.close()


# ----------------------------------------------------------------------------------------------------------
# finite differences against the exact value
# ----------------------------------------------------------------------------------------------------------


def test_finite_difference_lambda_max_matches_exact_on_a_low_curvature_full_model():
    batches = _lm_batches(num=2, batch_size=4, seq_len=12)
    model = tiny_llama(seed=0)  # full model, 28.8k fp32 parameters
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):  # fitted to loss ~1e-3: lambda_max ~0.05, where the curvature varies fast
        (sum(model(**batch).loss for batch in batches) / 2).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    options = {"max_steps": 30, "tol": 1e-10}
    exact = lambda_max(model, batches, hvp_method="exact", **options)["lambda_max"]
    fd = lambda_max(model, batches, hvp_method="fd", **options)
    assert fd["lambda_max_fd"] == 1.0
    # 0.3%: the default step (u^(1/3) * rms(w) = 5e-4 here) leaves truncation ~h^2 and fp32 rounding, measured
    # 3e-4 together; the old fixed step 4.9e-3 reads 1.3% high here (truncation), far outside
    assert fd["lambda_max"] == pytest.approx(exact, rel=3e-3)
    old_step = torch.finfo(torch.float32).eps ** (1 / 3)
    old = lambda_max(model, batches, hvp_method="fd", fd_step=old_step, **options)["lambda_max"]
    assert abs(old / exact - 1) > 3e-3


def test_low_precision_finite_differences_warn_once(caplog):
    model, batches = _mlp(torch.bfloat16), _classification_batches(torch.bfloat16)
    with caplog.at_level("WARNING", logger="hf_batchsched.probes.hvp"):
        lambda_max(model, batches, loss_fn=_ce, hvp_method="fd", max_steps=3)
    warnings = [r for r in caplog.records if "finite-difference HVPs on torch.bfloat16" in r.getMessage()]
    assert len(warnings) == 1


# ----------------------------------------------------------------------------------------------------------
# Keskar's subspace: drawn once per model, seed and size
# ----------------------------------------------------------------------------------------------------------


def _count_subspace_builds(monkeypatch):
    builds = []
    original = _subspace.RandomSubspace.__init__

    def counting(self, n, dim, seed, dtype, device):
        builds.append((n, dim, seed))
        original(self, n, dim, seed, dtype, device)

    monkeypatch.setattr(_subspace.RandomSubspace, "__init__", counting)
    return builds


def test_keskar_draws_its_subspace_once_per_seed_and_size(monkeypatch):
    builds = _count_subspace_builds(monkeypatch)
    model, batches = _mlp(), _classification_batches()
    options = {"loss_fn": _ce, "maxiter": 3, "subspace_dim": 20}
    first = keskar_sharpness(model, batches, **options)
    second = keskar_sharpness(model, batches, **options)
    assert len(builds) == 1
    assert second == first  # same computation in the same process: bit for bit
    keskar_sharpness(model, batches, **options, seed=1)
    keskar_sharpness(model, batches, **{**options, "subspace_dim": 10}, seed=1)
    assert builds == [(227, 20, 0), (227, 20, 1), (227, 10, 1)]
    uncached = keskar_sharpness(model, batches, **options, cache_subspace=False)
    assert len(builds) == 4 and uncached == first  # a fresh draw is the same subspace


def test_the_kept_subspace_goes_with_the_model():
    model = _mlp()
    keskar_sharpness(model, _classification_batches(), loss_fn=_ce, maxiter=1, subspace_dim=20)
    [subspace] = [entry[1] for owner, entry in _subspace._CACHE.items() if owner is model]
    assert subspace.nbytes == 227 * 20 * 8 + 20 * 20 * 8  # G in the parameters' dtype and R; no Q, no copies
    entries = len(_subspace._CACHE)
    owner = weakref.ref(model)
    del model, subspace
    gc.collect()
    assert owner() is None  # the cache does not keep the model alive
    assert len(_subspace._CACHE) == entries - 1  # and drops the subspace with it


def test_random_subspace_is_orthonormal_and_spans_the_gaussian_draw():
    n, dim, seed = 300, 7, 4
    basis = _subspace.RandomSubspace(n, dim, seed, torch.float32, "cpu")
    q = basis.expand(torch.eye(dim, dtype=torch.float64)).double()
    # G is stored in fp32 and R comes from the fp32 values' float64 Gram matrix: orthonormal to ~1e-6
    assert torch.allclose(q.T @ q, torch.eye(dim, dtype=torch.float64), atol=1e-5)
    gaussian = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    reference = torch.linalg.qr(gaussian).Q
    # the same span as the Householder QR the metric used before (columns equal up to sign)
    assert torch.allclose((reference.T @ q).abs(), torch.eye(dim, dtype=torch.float64), atol=1e-5)
    vector = torch.randn(n, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert torch.allclose(basis.project(vector), q.T @ vector, atol=1e-5)
