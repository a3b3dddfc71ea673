"""Gradient noise scale: the two-batch estimator against a problem with a known gradient covariance, the EMA, state,
and ``NoiseScaleCallback`` inside a real ``BatchRampTrainer.train``."""

from __future__ import annotations

import math
import os

import pytest
import torch
from datasets import Dataset
from helpers import tiny_training_args
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from hf_batchsched.assets import synthetic_lm_dataset, tiny_llama
from hf_batchsched.callbacks.noise_scale import NoiseScaleCallback
from hf_batchsched.errors import ConfigError
from hf_batchsched.probes.noise_scale import (
    GradientNoiseScale,
    estimate_noise_scale,
    grad_sq_norm,
    two_batch_estimate,
)
from hf_batchsched.trainer import BatchRampTrainer

torch.set_num_threads(1)


# ---- a problem with a known per-sample gradient covariance -------------------------------------------------------
#
# Linear regression y = x·w* + ε, x ~ N(0, I_d), ε ~ N(0, σ²), per-sample loss (x·w − y)². At w = w* + δ the
# per-sample gradient is g = 2 (x·δ − ε) x, so G = E g = 2δ and E|g|² = 4((d + 2)|δ|² + dσ²) (Isserlis), hence
#     tr(Σ) = E|g|² − |G|² = 4((d + 1)|δ|² + dσ²),   B_simple = tr(Σ)/|G|² = d + 1 + dσ²/|δ|².
# The tests draw batches with replacement from a fixed dataset of N samples, whose exact (enumerated) mean gradient
# and covariance are the estimator's targets.

DIM, NUM_SAMPLES, NOISE_VAR = 8, 8192, 2.0  # |δ| = 1: analytic B_simple = 9 + 16 = 25


class LinearRegression(torch.nn.Module):
    """``nn.Linear`` with an MSE loss, Trainer-style (``forward(input_ids, labels) -> {"loss": ...}``)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.linear = torch.nn.Linear(weight.numel(), 1, bias=False, dtype=weight.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(weight[None])

    def forward(self, input_ids, labels=None):  # "input_ids" holds the features x (the Trainer needs that name)
        prediction = self.linear(input_ids).squeeze(-1)
        return {"loss": torch.nn.functional.mse_loss(prediction, labels.to(prediction.dtype))}


@pytest.fixture(scope="module")
def regression():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_SAMPLES, DIM, generator=generator, dtype=torch.float64)
    w_star = torch.randn(DIM, generator=generator, dtype=torch.float64)
    delta = torch.randn(DIM, generator=generator, dtype=torch.float64)
    delta = delta / delta.norm()
    y = x @ w_star + math.sqrt(NOISE_VAR) * torch.randn(NUM_SAMPLES, generator=generator, dtype=torch.float64)
    w = w_star + delta
    per_sample = 2 * (x @ w - y)[:, None] * x  # exact per-sample gradients
    mean = per_sample.mean(0)
    trace_sigma = (per_sample - mean).pow(2).sum(1).mean()
    return {
        "x": x,
        "y": y,
        "w": w,
        "per_sample": per_sample,
        "g2": float(mean @ mean),
        "trace_sigma": float(trace_sigma),
        "noise_scale": float(trace_sigma / (mean @ mean)),
    }


def mse(model, chunk):
    return model(*chunk)["loss"]


def test_enumerated_dataset_matches_analytic_formula(regression):
    # The finite dataset is a sample of the analytic distribution: its B_simple is d + 1 + dσ²/|δ|² = 25 up to
    # sampling error (relative std ~ 1/sqrt(N) x heavy-tail factor ~ 3 %); 8 % is > 2.5 sigma and checks the algebra.
    assert regression["noise_scale"] == pytest.approx(DIM + 1 + DIM * NOISE_VAR, rel=0.08)


def test_estimate_within_10_percent_of_exact_noise_scale(regression):
    """Real autograd path (``estimate_noise_scale``, Bs = 16 of Bb = 128) over 3000 batches.

    Tolerance: the ratio of averaged estimates has a relative std of 3.2 % at 2000 steps (Bs=16, Bb=128) in a
    200-repeat simulation of this exact set-up, so 2.6 % at 3000 steps; 10 % is > 3.8 sigma (and the seed is fixed).
    The EMA (beta = 0.9995, effective window ~4000 updates) has about the same spread.
    """
    model = LinearRegression(regression["w"])
    generator = torch.Generator().manual_seed(1)
    gns = GradientNoiseScale(beta=0.9995)
    sum_g2 = sum_trace = 0.0
    for _ in range(3000):
        index = torch.randint(0, NUM_SAMPLES, (128,), generator=generator)
        sample = estimate_noise_scale(model, mse, (regression["x"][index], regression["y"][index]), 16)
        g2, trace_sigma = sample.estimate()
        sum_g2, sum_trace = sum_g2 + g2, sum_trace + trace_sigma
        gns.update(*sample)
    exact = regression["noise_scale"]
    assert sum_trace / sum_g2 == pytest.approx(exact, rel=0.10)
    assert gns.noise_scale == pytest.approx(exact, rel=0.10)
    # the components, too (|G|² is the noisy one: 15 %; tr(Σ) is tight: 5 %)
    assert sum_g2 / 3000 == pytest.approx(regression["g2"], rel=0.15)
    assert sum_trace / 3000 == pytest.approx(regression["trace_sigma"], rel=0.05)


def test_estimate_noise_scale_measures_exact_chunk_and_batch_norms(regression):
    model = LinearRegression(regression["w"])
    x, y = regression["x"][:40], regression["y"][:40]
    sample = estimate_noise_scale(model, mse, (x, y), micro_batch_size=16)
    per_sample = regression["per_sample"][:40]
    assert (sample.b_small, sample.b_big) == (16, 40)
    assert sample.sq_norm_small == pytest.approx(float(per_sample[:16].mean(0).pow(2).sum()), rel=1e-10)
    assert sample.sq_norm_big == pytest.approx(float(per_sample.mean(0).pow(2).sum()), rel=1e-10)


def test_estimate_noise_scale_leaves_model_as_found(regression):
    model = LinearRegression(regression["w"]).eval()
    marker = torch.full_like(model.linear.weight, 7.0)
    model.linear.weight.grad = marker.clone()
    before = model.linear.weight.detach().clone()
    rng = torch.get_rng_state()
    estimate_noise_scale(model, mse, (regression["x"][:32], regression["y"][:32]), 8)
    assert torch.equal(model.linear.weight.grad, marker)
    assert torch.equal(model.linear.weight, before)
    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng)


def test_estimate_noise_scale_needs_two_chunks(regression):
    with pytest.raises(ConfigError, match="at least two micro-chunks"):
        estimate_noise_scale(LinearRegression(regression["w"]), mse, (regression["x"][:8], regression["y"][:8]), 8)


# ---- the pure pieces ----------------------------------------------------------------------------------------------


def test_two_batch_estimate_inverts_expected_norms():
    # E|G_B|² = |G|² + tr(Σ)/B exactly inverted for any pair of sizes
    for b_small, b_big in [(1, 2), (4, 64), (16, 48)]:
        g2, trace_sigma = two_batch_estimate(3.0 + 40.0 / b_small, 3.0 + 40.0 / b_big, b_small, b_big)
        assert g2 == pytest.approx(3.0) and trace_sigma == pytest.approx(40.0)


def test_two_batch_estimate_rejects_unordered_sizes():
    with pytest.raises(ConfigError, match="b_small < b_big"):
        two_batch_estimate(1.0, 1.0, 32, 16)
    with pytest.raises(ConfigError, match="b_small must be > 0"):
        two_batch_estimate(1.0, 1.0, 0, 16)


def test_ema_bias_correction():
    gns = GradientNoiseScale(beta=0.9)
    gns.update_estimates(2.0, 10.0)
    # bias-corrected: the first reading is the estimate itself, not 0.1 x it
    assert gns.grad_sq_norm == pytest.approx(2.0) and gns.trace_sigma == pytest.approx(10.0)
    gns.update_estimates(4.0, 30.0)
    # (0.9·0.1·2 + 0.1·4) / (1 − 0.81) = 0.58 / 0.19
    assert gns.grad_sq_norm == pytest.approx(0.58 / 0.19)
    assert gns.trace_sigma == pytest.approx((0.9 * 0.1 * 10 + 0.1 * 30) / 0.19)
    assert gns.noise_scale == pytest.approx(gns.trace_sigma / gns.grad_sq_norm)
    # constant inputs give exactly that constant at every step (no warm-up bias)
    constant = GradientNoiseScale(beta=0.99)
    for _ in range(5):
        constant.update_estimates(0.5, 8.0)
        assert constant.noise_scale == pytest.approx(16.0)


def test_noise_scale_edge_values():
    gns = GradientNoiseScale()
    assert math.isnan(gns.noise_scale)
    gns.update_estimates(-1.0, 5.0)  # |G|² not resolved above the noise
    assert gns.noise_scale == math.inf
    with pytest.raises(ConfigError, match="non-finite"):
        gns.update_estimates(math.nan, 1.0)
    with pytest.raises(ConfigError, match="beta"):
        GradientNoiseScale(beta=1.0)


def test_state_round_trip():
    gns = GradientNoiseScale(beta=0.95)
    for step in range(7):
        gns.update(10.0 + step, 4.0, 8, 32)
    restored = GradientNoiseScale(beta=0.95)
    restored.load_state_dict(gns.state_dict())
    assert restored.state_dict() == gns.state_dict()
    for estimator in (gns, restored):
        estimator.update(12.0, 5.0, 8, 32)
    assert restored.noise_scale == gns.noise_scale
    with pytest.raises(ConfigError, match="same beta"):
        GradientNoiseScale(beta=0.5).load_state_dict(gns.state_dict())


def test_grad_sq_norm_reads_grads_in_fp32_and_skips_missing():
    layer = torch.nn.Linear(3, 2).to(torch.bfloat16)
    layer.weight.grad = torch.full((2, 3), 0.1, dtype=torch.bfloat16)  # bias.grad stays None
    expected = 6 * float(torch.tensor(0.1, dtype=torch.bfloat16)) ** 2
    value = grad_sq_norm(layer.parameters())
    assert value.dtype == torch.float32 and float(value) == pytest.approx(expected, rel=1e-6)
    assert float(grad_sq_norm(torch.nn.Linear(2, 2).parameters())) == 0.0


# ---- NoiseScaleCallback in a real Trainer -------------------------------------------------------------------------


def make_args(tmp_path, **overrides) -> TrainingArguments:
    return tiny_training_args(tmp_path, **overrides)


def regression_dataset(regression, num_samples: int = 96) -> Dataset:
    return Dataset.from_dict(
        {
            "input_ids": regression["x"][:num_samples].tolist(),
            "labels": regression["y"][:num_samples].tolist(),
        }
    )


class RecordingModel(LinearRegression):
    """Records the features of every forward (the chunks, in order)."""

    def __init__(self, weight):
        super().__init__(weight)
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids, labels=None):
        self.seen.append(input_ids.detach().clone())
        return super().forward(input_ids, labels)


def test_callback_measures_exact_chunk_and_step_norms(tmp_path, regression):
    """The callback's |G_Bs|² / |G_Bb|² for a step equal the closed-form norms of the chunk's and the step's mean
    per-sample gradients: the chunk-1 gradient is correctly un-weighted (1e-4: float32 model and data)."""
    model = RecordingModel(regression["w"].float())
    data = regression_dataset(regression, 48)
    trainer = BatchRampTrainer(
        model=model,
        args=make_args(tmp_path, learning_rate=0.0, lr_scheduler_type="constant"),
        train_dataset=data,
        batch_schedule=24,
        max_micro_batch_size=8,
    )
    trainer.remove_callback(PrinterCallback)
    callback = NoiseScaleCallback(trainer, beta=0.5)
    trainer.add_callback(callback)
    recorded = []
    update = callback.estimator.update
    callback.estimator.update = lambda *args: (recorded.append(args), update(*args))[1]
    trainer.train()
    assert len(recorded) == 2 and len(model.seen) == 6  # 2 steps of 24 = 3 chunks of 8

    x64, w = regression["x"][:48], regression["w"]
    y_by_row = {tuple(row.tolist()): label for row, label in zip(x64.float(), regression["y"][:48].float())}
    for step, (sq_small, sq_big, b_small, b_big) in enumerate(recorded):
        chunks = model.seen[3 * step : 3 * step + 3]
        rows = torch.cat(chunks).double()
        labels = torch.tensor([float(y_by_row[tuple(r.tolist())]) for r in torch.cat(chunks)], dtype=torch.float64)
        per_sample = 2 * (rows @ w.float().double() - labels)[:, None] * rows
        assert (b_small, b_big) == (8, 24)
        assert sq_small == pytest.approx(float(per_sample[:8].mean(0).pow(2).sum()), rel=1e-4)
        assert sq_big == pytest.approx(float(per_sample.mean(0).pow(2).sum()), rel=1e-4)


def test_callback_logs_noise_scale_on_tiny_llama(tmp_path):
    trainer = BatchRampTrainer(
        model=tiny_llama(seed=0),
        args=make_args(tmp_path),
        train_dataset=synthetic_lm_dataset(num_samples=64, seq_len=16),
        batch_schedule=16,
        max_micro_batch_size=4,
    )
    trainer.remove_callback(PrinterCallback)
    callback = NoiseScaleCallback(trainer, beta=0.9, every_n_steps=2)
    trainer.add_callback(callback)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "batchsched/noise_scale" in entry]
    assert logged, trainer.state.log_history
    assert callback.estimator.num_updates == 2  # 4 steps, measured at steps 0 and 2
    last = logged[-1]
    assert last["batchsched/trace_sigma"] > 0 and math.isfinite(last["batchsched/grad_sq_norm"])
    saved = trainer.state.stateful_callbacks[NoiseScaleCallback.STATE_KEY]
    assert saved["estimator"] == callback.estimator.state_dict()


def test_callback_state_restored_on_resume(tmp_path, regression):
    def run(resume=None, max_steps=4):
        trainer = BatchRampTrainer(
            model=LinearRegression(regression["w"].float()),
            args=make_args(tmp_path, save_strategy="steps", save_steps=2, max_steps=max_steps, learning_rate=0.05),
            train_dataset=regression_dataset(regression, 96),
            batch_schedule=16,
            max_micro_batch_size=4,
        )
        trainer.remove_callback(PrinterCallback)
        callback = NoiseScaleCallback(trainer, beta=0.8)
        trainer.add_callback(callback)
        trainer.train(resume_from_checkpoint=resume)
        return callback

    full = run()
    resumed = run(resume=str(tmp_path / "checkpoint-2"))
    assert resumed.estimator.num_updates == 4
    assert resumed.estimator.state_dict() == pytest.approx(full.estimator.state_dict(), rel=1e-6)


def test_callback_bad_input(tmp_path, regression):
    data = regression_dataset(regression, 32)
    one_chunk = BatchRampTrainer(
        model=LinearRegression(regression["w"].float()),
        args=make_args(tmp_path),
        train_dataset=data,
        batch_schedule=8,
        max_micro_batch_size=8,
    )
    with pytest.raises(ConfigError, match="at least two micro-chunks per step.*max_micro_batch_size to at most 4"):
        NoiseScaleCallback(one_chunk)
    with pytest.raises(ConfigError, match="needs a BatchRampTrainer"):
        NoiseScaleCallback(Trainer(model=LinearRegression(regression["w"].float()), args=make_args(tmp_path)))
    ok = BatchRampTrainer(
        model=LinearRegression(regression["w"].float()),
        args=make_args(tmp_path),
        train_dataset=data,
        batch_schedule=16,
        max_micro_batch_size=4,
    )
    with pytest.raises(ConfigError, match="every_n_steps must be > 0"):
        NoiseScaleCallback(ok, every_n_steps=0)
    NoiseScaleCallback(ok)  # bound to the trainer but not added as a callback
    ok.remove_callback(PrinterCallback)
    with pytest.raises(ConfigError, match="trainer.add_callback"):
        ok.train()


def test_single_chunk_steps_are_skipped(tmp_path, regression):
    """A plain callable schedule (no max_size to check at init): its one-chunk steps are skipped and counted."""

    def ramp(consumed):
        return 8 if consumed < 16 else 16  # 8 = one chunk of 8 (skipped), 16 = two chunks (measured)

    trainer = BatchRampTrainer(
        model=LinearRegression(regression["w"].float()),
        args=make_args(tmp_path),
        train_dataset=regression_dataset(regression, 48),
        batch_schedule=ramp,
        max_micro_batch_size=8,
    )
    trainer.remove_callback(PrinterCallback)
    callback = NoiseScaleCallback(trainer)
    trainer.add_callback(callback)
    trainer.train()
    assert trainer.ramp_plan == [8, 8, 16, 16]
    assert callback.skipped_steps == 2 and callback.estimator.num_updates == 2


def test_split_batch_slices_sample_tensors_and_refuses_what_has_none():
    """One splitter for the package (``batching.split_batch``, also used by BN recalibration): tensors whose
    first dimension is the sample count are sliced, other values go to every chunk, container types are kept."""
    from hf_batchsched.batching import split_batch

    batch = {"input_ids": torch.arange(10).reshape(5, 2), "weights": torch.ones(3), "scale": 2.0}
    chunks = split_batch(batch, 2)
    assert [chunk["input_ids"][:, 0].tolist() for chunk in chunks] == [[0, 2], [4, 6], [8]]
    assert all(chunk["scale"] == 2.0 and chunk["weights"].shape == (3,) for chunk in chunks)
    pairs = split_batch((torch.zeros(3, 1), torch.ones(3)), 2)
    assert [type(pair) for pair in pairs] == [tuple, tuple] and pairs[1][1].tolist() == [1.0]
    with pytest.raises(ConfigError, match="cannot split a batch of type str"):
        split_batch("text", 2)
    with pytest.raises(ConfigError, match="micro_batch_size"):
        split_batch(batch, 0)


# ---- token-normalised loss on variable-length data ----------------------------------------------------------------


def pad_collator(rows: list[dict]) -> dict:
    """Right-pads ``input_ids`` with 0; ``attention_mask`` 0 and ``labels`` -100 on the pads (as HF LM collators)."""
    width = max(len(row["input_ids"]) for row in rows)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for row in rows:
        ids, pad = list(row["input_ids"]), width - len(row["input_ids"])
        batch["input_ids"].append(ids + [0] * pad)
        batch["attention_mask"].append([1] * len(ids) + [0] * pad)
        batch["labels"].append(ids + [-100] * pad)
    return {key: torch.tensor(value) for key, value in batch.items()}


TOKEN_TOLERANCE = 1e-4  # float32 model; same math summed in another order, with/without pad columns (seen < 1e-6)


def variable_length_lm_data() -> Dataset:
    generator = torch.Generator().manual_seed(3)
    lengths = torch.randint(2, 25, (32,), generator=generator).tolist()
    return Dataset.from_dict(
        {"input_ids": [torch.randint(3, 128, (n,), generator=generator).tolist() for n in lengths]}
    )


def run_token_normalised(output_dir: str, **args_overrides) -> dict:
    """Two steps of 16 sequences (each rank's share in 2 chunks) of a tiny Llama at learning rate 0.

    Returns, per step, chunk 1's raw |.grad|², ``current_chunk_loss_weight``/``_num_items``, the non-pad rows of
    every chunk this rank ran, and the norms the callback fed to its estimator."""
    model = tiny_llama(seed=0)
    micro = 8 // max(1, int(os.environ.get("WORLD_SIZE", "1")))
    trainer = BatchRampTrainer(
        model=model,
        args=make_args(
            output_dir, learning_rate=0.0, lr_scheduler_type="constant", remove_unused_columns=False, **args_overrides
        ),
        train_dataset=variable_length_lm_data(),
        data_collator=pad_collator,
        batch_schedule=16,
        max_micro_batch_size=micro,
    )
    trainer.remove_callback(PrinterCallback)
    chunks, chunk1 = [], []

    def record_chunk(module, args, kwargs):
        chunks.append([ids[mask.bool()].tolist() for ids, mask in zip(kwargs["input_ids"], kwargs["attention_mask"])])

    model.register_forward_pre_hook(record_chunk, with_kwargs=True)

    class Chunk1Probe(TrainerCallback):  # added first: hears each event before the callback
        def on_micro_chunk_end(self, trainer, chunk_index, num_chunks, chunk_num_samples):
            if chunk_index == 0:
                sq = float(grad_sq_norm(p for p in trainer.model.parameters() if p.requires_grad))
                chunk1.append([sq, trainer.current_chunk_loss_weight, trainer.current_chunk_num_items])

    trainer.add_callback(Chunk1Probe())
    callback = NoiseScaleCallback(trainer, beta=0.5)
    trainer.add_callback(callback)
    recorded = []
    update = callback.estimator.update
    callback.estimator.update = lambda *args: (recorded.append(list(args)), update(*args))[1]
    trainer.train()
    return {"world_size": trainer.args.world_size, "chunk1": chunk1, "chunks": chunks, "updates": recorded}


def check_token_normalised(ranks: list[dict]) -> None:
    """Per step and rank: weight = world · items_chunk1 / items_step (label tokens after the causal shift, global),
    |.grad|² / weight² = |∇ chunk 1's mean-over-label-tokens loss|² computed directly (each sequence alone, no
    padding: sum of per-sequence token losses / chunk label tokens); the callback's |G_Bs|² is the rank average;
    the old sample ratio world · n_chunk / n_step misses by more than 10x the tolerance on this data."""
    reference = tiny_llama(seed=0)  # lr 0: the trained model keeps these weights
    world = len(ranks)
    num_chunks = len(ranks[0]["chunks"]) // 2
    assert all(len(r["chunk1"]) == len(r["updates"]) == 2 for r in ranks)
    for step in range(2):
        step_chunks = [r["chunks"][num_chunks * step : num_chunks * (step + 1)] for r in ranks]
        step_items = sum(len(row) - 1 for chunks in step_chunks for chunk in chunks for row in chunk)
        directs = []
        for rank, chunks in zip(ranks, step_chunks):
            sq_grad, weight, items = rank["chunk1"][step]
            rows = [torch.tensor(row)[None] for row in chunks[0]]
            assert items == sum(row.shape[1] - 1 for row in rows)
            assert weight == pytest.approx(world * items / step_items, rel=1e-12)
            reference.zero_grad()
            total = sum(reference(input_ids=row, labels=row).loss * (row.shape[1] - 1) for row in rows)
            (total / items).backward()
            direct = float(grad_sq_norm(reference.parameters()))
            assert sq_grad / weight**2 == pytest.approx(direct, rel=TOKEN_TOLERANCE)
            old_weight = world * len(rows) / 16
            assert abs(sq_grad / old_weight**2 / direct - 1) > 10 * TOKEN_TOLERANCE, (weight, old_weight)
            directs.append(direct)
        sq_small, _, b_small, b_big = ranks[0]["updates"][step]
        assert all(r["updates"][step] == ranks[0]["updates"][step] for r in ranks)
        assert (b_small, b_big) == (8 // world, 16)
        assert sq_small == pytest.approx(sum(directs) / world, rel=TOKEN_TOLERANCE)


def test_chunk_weight_is_exact_for_token_normalised_variable_length_loss(tmp_path):
    """Causal-LM loss normalised by ``num_items_in_batch`` on sequences of 2..24 tokens, right-padded, labels -100
    on pads (``check_token_normalised``). Tolerance 1e-4 (``TOKEN_TOLERANCE``): float32, observed < 1e-6; the old
    sample-ratio weight is off by 52 % and 11 % on the two steps (chunk 1's token share is not its sample share)."""
    check_token_normalised([run_token_normalised(str(tmp_path))])


@pytest.mark.distributed
def test_chunk_weight_is_exact_for_token_normalised_loss_under_ddp(tmp_path):
    """The same on 2 ranks (gloo): ``num_items_in_batch`` is global (``average_tokens_across_devices``) and the loss
    is multiplied by the world size, so each rank's chunk-1 weight is 2 · items_chunk / items_step."""
    from conftest import run_torchrun  # here, not at the top: this file is also the torchrun worker

    ranks = run_torchrun(__file__, tmp_path)
    assert [r["world_size"] for r in ranks] == [2, 2]
    check_token_normalised(ranks)


def test_noise_scale_callback_skips_a_zero_reduced_chunk_weight():
    """Under ZeRO-3/FSDP2 the first-chunk loss weight is averaged over ranks and divided out; a first chunk with no
    label token on every rank has weight 0. The step is skipped as a non-finite reading (as on the DDP path), not a
    ZeroDivisionError mid-training."""
    from types import SimpleNamespace

    from hf_batchsched.callbacks import NoiseScaleCallback

    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.tensor([3.0, 4.0])
    accelerator = SimpleNamespace(num_processes=1, reduce=lambda tensor, reduction: tensor, scaler=None)
    trainer = SimpleNamespace(
        args=SimpleNamespace(world_size=1, device=torch.device("cpu")),
        state=SimpleNamespace(global_step=0),
        accelerator=accelerator,
        max_micro_batch_size=2,
        batch_schedule=8,
        sharding_engine="zero3",
        reduces_every_chunk=True,
        current_chunk_loss_weight=0.0,
        model=torch.nn.Module(),
        accumulated_grad_sq_norm=lambda params: torch.tensor(25.0),
        step_grad_sq_norm=lambda params: torch.tensor(25.0),
        log=lambda logs: None,
    )
    trainer.args.fp16 = False
    callback = NoiseScaleCallback(trainer)
    callback._attached = True
    callback.on_micro_chunk_end(trainer, chunk_index=0, num_chunks=4, chunk_num_samples=2)
    callback.on_step_batch_end(trainer, step_num_samples=8)
    assert callback.skipped_steps == 1 and callback.estimator.num_updates == 0
    trainer.current_chunk_loss_weight = 0.25  # a weighted chunk is measured: |G_Bs|² = 25 / 0.25²
    callback.on_micro_chunk_end(trainer, chunk_index=0, num_chunks=4, chunk_num_samples=2)
    callback.on_step_batch_end(trainer, step_num_samples=8)
    assert callback.estimator.num_updates == 1
    assert callback.estimator.trace_sigma == pytest.approx((400.0 - 25.0) / (1 / 2 - 1 / 8))


if __name__ == "__main__":  # the DDP worker (see test_chunk_weight_is_exact_for_token_normalised_loss_under_ddp)
    import json
    import sys

    record = run_token_normalised(sys.argv[1], ddp_backend="gloo")
    with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as file:
        json.dump(record, file)


def test_estimate_noise_scale_restores_batchnorm_statistics_of_a_train_mode_model():
    """A probe leaves the model as found: its train-mode forwards move BN running statistics, which come back."""
    from hf_batchsched.probes.noise_scale import estimate_noise_scale

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1)).train()
    x, y = torch.randn(32, 3), torch.randn(32, 1)
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    mse = lambda model, chunk: torch.nn.functional.mse_loss(model(chunk[0]), chunk[1])  # noqa: E731
    sample = estimate_noise_scale(model, mse, (x, y), micro_batch_size=8)
    assert sample.b_big == 32 and model.training
    assert all(torch.equal(before[name], buffer) for name, buffer in model.named_buffers())
