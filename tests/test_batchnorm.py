"""Ghost BN, BN recalibration, BN freezing and BN checkpoint state, on torch modules and a real Trainer."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_training_args
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_batchsched.assets import digits_image_dataset, tiny_resnet
from hf_batchsched.callbacks.batchnorm import BNRecalibrationCallback, FreezeBNCallback
from hf_batchsched.errors import ConfigError
from hf_batchsched.model_utils import batchnorm_modules
from hf_batchsched.transforms import (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostSyncBatchNorm,
    convert_to_ghost_bn,
    freeze_bn,
    is_bn_frozen,
    recalibrate_bn,
    revert_ghost_bn,
    unfreeze_bn,
)


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": buffer.clone()
        for name, bn in batchnorm_modules(model)
        for key, buffer in (("mean", bn.running_mean), ("var", bn.running_var), ("n", bn.num_batches_tracked))
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def training_args(tmp_path, **overrides) -> TrainingArguments:
    defaults = {
        "per_device_train_batch_size": 16,
        "max_steps": 4,
        "learning_rate": 0.05,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "dataloader_drop_last": True,
        "per_device_eval_batch_size": 32,
    }
    return tiny_training_args(tmp_path, **{**defaults, **overrides})


@pytest.fixture(scope="module")
def digits():
    return digits_image_dataset(num_samples=160), digits_image_dataset(num_samples=64, offset=1000)


# ---------------------------------------------------------------------------------------------------------------
# Ghost BN
# ---------------------------------------------------------------------------------------------------------------


def _random_bn2d(momentum: float | None = 0.1) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(3, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn


def test_ghost_bn_equals_plain_bn_on_each_chunk_separately():
    torch.manual_seed(0)
    plain = _random_bn2d()
    ghost = copy.deepcopy(plain)
    assert convert_to_ghost_bn(ghost, ghost_batch_size=4) == 1
    assert isinstance(ghost, GhostBatchNorm2d) and isinstance(ghost, nn.BatchNorm2d)
    # Ten samples, ghost size four: chunks of 4, 4 and a last smaller chunk of 2 (documented behaviour).
    x = (torch.randn(10, 3, 5, 5) * torch.arange(1, 11).view(10, 1, 1, 1)).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out = ghost(x)
    expected = torch.cat([plain(chunk) for chunk in x_ref.split(4)])
    # Same kernel on the same chunk, in the same order: bit-identical outputs and running statistics.
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(ghost.running_mean, plain.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(ghost.running_var, plain.running_var, rtol=0, atol=0)
    assert ghost.num_batches_tracked.item() == plain.num_batches_tracked.item() == 3  # one EMA update per chunk
    # ...and the per-chunk normalisation differs from normalising the whole batch at once.
    assert not torch.allclose(out, nn.functional.batch_norm(x, None, None, ghost.weight, ghost.bias, training=True))
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)  # cat/split reorder nothing in autograd
    torch.testing.assert_close(ghost.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-6)


def test_ghost_bn_momentum_none_is_cumulative_average_over_chunks():
    bn = nn.BatchNorm1d(1, momentum=None)
    convert_to_ghost_bn(bn, ghost_batch_size=4)
    assert isinstance(bn, GhostBatchNorm1d)
    chunks = [torch.full((4, 1), 1.0), torch.full((4, 1), 3.0), torch.tensor([[10.0], [20.0]])]
    for chunk in chunks:  # give each chunk some spread so variances are defined
        chunk += torch.linspace(-0.5, 0.5, len(chunk)).unsqueeze(1)
    bn(torch.cat(chunks))
    # momentum=None: running_mean = equal-weight average of the 3 chunk means (1, 3, 15); counts chunks.
    torch.testing.assert_close(bn.running_mean, torch.tensor([(1.0 + 3.0 + 15.0) / 3]))
    expected_var = torch.stack([c.var(unbiased=True) for c in chunks]).mean()
    torch.testing.assert_close(bn.running_var, expected_var.reshape(1))
    assert bn.num_batches_tracked.item() == 3


def test_ghost_bn_keeps_state_dict_keys_parameters_and_eval_behaviour():
    model = tiny_resnet(seed=0)
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    assert convert_to_ghost_bn(model, ghost_batch_size=8) == 6
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == params  # an optimizer built before conversion stays valid
    model.load_state_dict(reference.state_dict())  # plain checkpoints load into the ghost model and back
    reference.load_state_dict(model.state_dict())
    x = torch.randn(20, 1, 16, 16)
    model.eval(), reference.eval()
    torch.testing.assert_close(model(pixel_values=x).logits, reference(pixel_values=x).logits, rtol=0, atol=0)
    model.train(), reference.train()
    small = x[:8]  # a batch no larger than the ghost size is plain BN
    torch.testing.assert_close(model(pixel_values=small).logits, reference(pixel_values=small).logits, rtol=0, atol=0)
    assert not torch.allclose(model(pixel_values=x).logits, reference(pixel_values=x).logits)
    assert convert_to_ghost_bn(model, ghost_batch_size=4) == 6  # re-sizing counts
    assert {bn.ghost_batch_size for _, bn in batchnorm_modules(model)} == {4}
    assert revert_ghost_bn(model) == 6
    assert {type(bn) for _, bn in batchnorm_modules(model)} == {nn.BatchNorm2d}
    assert not hasattr(batchnorm_modules(model)[0][1], "ghost_batch_size")


def test_ghost_bn_converts_sync_batchnorm_to_local_chunks_and_leaves_subclasses_alone():
    class CustomBN(nn.BatchNorm1d):
        pass

    model = nn.Sequential(nn.SyncBatchNorm(2), CustomBN(2))
    plain = nn.BatchNorm1d(2)
    assert convert_to_ghost_bn(model, ghost_batch_size=3) == 1
    assert isinstance(model[0], GhostSyncBatchNorm) and type(model[1]) is CustomBN
    x = torch.randn(8, 2) * 3 + 1  # chunks of 3, 3, 2
    out = model[0](x)  # CPU, no process group: local per-chunk normalisation, no collective
    torch.testing.assert_close(out, torch.cat([plain(c) for c in x.split(3)]), rtol=0, atol=0)
    assert revert_ghost_bn(model) == 1 and type(model[0]) is nn.SyncBatchNorm


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "8"])
def test_convert_to_ghost_bn_rejects_bad_sizes(bad):
    with pytest.raises(ConfigError, match="ghost_batch_size"):
        convert_to_ghost_bn(nn.BatchNorm1d(2), bad)


# ---------------------------------------------------------------------------------------------------------------
# Recalibration
# ---------------------------------------------------------------------------------------------------------------


class TwoBN(nn.Module):
    """Linear -> BN -> ReLU -> Dropout -> Linear -> BN, called with dict batches like a Hugging Face model."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.bn1 = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.2)
        self.second = nn.Linear(4, 5)
        self.bn2 = nn.BatchNorm1d(5)

    def forward(self, x, labels=None):
        return self.bn2(self.second(self.drop(torch.relu(self.bn1(self.first(x))))))


def _unequal_batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    sizes, shifts = (3, 17, 40), (0.0, 5.0, -3.0)
    return [
        {"x": torch.randn(n, 3, generator=generator) * 2 + shift, "labels": torch.zeros(n)}
        for n, shift in zip(sizes, shifts)
    ]


def _bn_inputs(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Inputs each BN layer sees in training-mode forwards of ``batches`` (same RNG stream as recalibrate_bn)."""
    model = copy.deepcopy(model).train()
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [
        bn.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, []).append(a[0].detach()))
        for name, bn in batchnorm_modules(model)
    ]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(values).double() for name, values in seen.items()}


def test_recalibrate_bn_writes_pooled_sample_weighted_statistics():
    torch.manual_seed(0)
    model = TwoBN().eval()
    model.bn2.train()  # mixed modes must come back exactly
    model.first.weight.grad = torch.ones_like(model.first.weight)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    tracked = {name: bn.num_batches_tracked.clone() for name, bn in batchnorm_modules(model)}
    batches = _unequal_batches()
    model.drop.p = 0.0  # so the reference pass sees exactly the inputs recalibration saw
    inputs = _bn_inputs(model, batches)
    rng = torch.get_rng_state()

    result = recalibrate_bn(model, batches)

    assert result == {"num_batches": 3, "num_samples": 60, "num_layers": 2}
    for name, bn in batchnorm_modules(model):
        x = inputs[name]
        # float64 sums written to float32 buffers: agreement to float32 rounding (rtol 1e-5).
        torch.testing.assert_close(bn.running_mean, x.mean(0).float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, x.var(0, unbiased=True).float(), rtol=1e-5, atol=1e-6)
        assert torch.equal(bn.num_batches_tracked, tracked[name])
    # The batches have different sizes and means: the equal-weight average of batch means is far off.
    equal_weight = torch.stack([b["x"].mean(0) for b in batches]).mean(0)
    assert (equal_weight - torch.cat([b["x"] for b in batches]).mean(0)).abs().max() > 1.0
    assert [m.training for m in model.modules()] == [False, False, False, False, False, True]
    assert torch.equal(torch.get_rng_state(), rng)
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name])
    assert torch.equal(model.first.weight.grad, torch.ones_like(model.first.weight))
    assert model.second.weight.grad is None


def test_recalibrate_bn_on_resnet_with_dict_batches_and_num_batches_limit():
    model = tiny_resnet(seed=1)
    data = digits_image_dataset(num_samples=48)
    batches = [
        {"pixel_values": data.pixel_values[i : i + n], "labels": data.labels[i : i + n]}
        for i, n in ((0, 5), (5, 30), (35, 13))
    ]
    inputs = _bn_inputs(model, batches[:2])
    result = recalibrate_bn(model, iter(batches), num_batches=2)
    assert result["num_batches"] == 2 and result["num_samples"] == 35
    for name, bn in batchnorm_modules(model):
        x = inputs[name].transpose(0, 1).reshape(bn.num_features, -1)  # per channel over (N, H, W)
        torch.testing.assert_close(bn.running_mean, x.mean(1).float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, x.var(1, unbiased=True).float(), rtol=1e-5, atol=1e-6)


def test_recalibrate_bn_skips_frozen_and_untracked_layers_and_validates():
    model = nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm1d(2, track_running_stats=False), nn.BatchNorm1d(2))
    freeze_bn(model[2:])
    result = recalibrate_bn(model, [torch.randn(8, 2) + 4])
    assert result["num_layers"] == 1
    assert model[0].running_mean.mean() > 3
    assert torch.equal(model[2].running_mean, torch.zeros(2))
    with pytest.raises(ConfigError, match="num_batches"):
        recalibrate_bn(model, [], num_batches=0)


def test_recalibration_callback_recalibrates_right_before_each_evaluation(tmp_path, digits):
    train, val = digits
    model = tiny_resnet(seed=0)
    fixed_batches = [
        {"pixel_values": train.pixel_values[i : i + n], "labels": train.labels[i : i + n]}
        for i, n in ((0, 7), (7, 25))
    ]
    checks: list[tuple[int, bool]] = []

    class SpyOnEvaluate(TrainerCallback):
        def on_evaluate(self, args, state, control, **kwargs):
            # Recalibrating a copy with the same data must change nothing iff it was just done with these weights.
            expected = copy.deepcopy(trainer.model)
            recalibrate_bn(expected, fixed_batches)
            same = all(
                torch.allclose(a, b, rtol=1e-6, atol=1e-7)
                for a, b in zip(bn_buffers(trainer.model).values(), bn_buffers(expected).values())
            )
            checks.append((state.global_step, same))

    args = training_args(tmp_path, eval_strategy="steps", eval_steps=2, max_steps=4)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val)
    callback = BNRecalibrationCallback(trainer, num_batches=2, dataloader=fixed_batches)
    trainer.add_callback(callback)
    trainer.add_callback(SpyOnEvaluate())
    trainer.train()
    assert checks == [(2, True), (4, True)]
    logged = [log for log in trainer.state.log_history if "bn/recalibration_samples" in log]
    assert [log["bn/recalibration_samples"] for log in logged] == [32.0, 32.0, 32.0]  # 2 evaluations + train end
    # Logging from on_step_end did not swallow the Trainer's own per-step loss line.
    assert [log["step"] for log in trainer.state.log_history if "loss" in log] == [1, 2, 3, 4]


def test_recalibration_callback_default_dataloader_and_validation(tmp_path, digits):
    train, val = digits
    trainer = Trainer(model=tiny_resnet(), args=training_args(tmp_path, max_steps=1), train_dataset=train)
    callback = BNRecalibrationCallback(trainer, num_batches=3, on_evaluate=False)
    trainer.add_callback(callback)
    trainer.train()
    assert callback.last_result == {"num_batches": 3, "num_samples": 48, "num_layers": 6}
    with pytest.raises(ConfigError, match="no BatchNorm"):
        BNRecalibrationCallback(Trainer(model=nn.Linear(2, 2), args=training_args(tmp_path)))
    with pytest.raises(ConfigError, match="num_batches"):
        BNRecalibrationCallback(trainer, num_batches=0)
    with pytest.raises(ConfigError, match="does nothing"):
        BNRecalibrationCallback(trainer, on_evaluate=False, on_train_end=False)


# ---------------------------------------------------------------------------------------------------------------
# Freezing
# ---------------------------------------------------------------------------------------------------------------


def test_freeze_bn_survives_model_train_and_is_reversible():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    assert freeze_bn(model, freeze_affine=True) == 1
    assert freeze_bn(model) == 0  # idempotent
    model.train()
    x = torch.randn(16, 3) + 2
    out = model(x)
    assert torch.equal(model[1].running_mean, torch.zeros(4)) and model[1].num_batches_tracked.item() == 0
    # Inference-mode normalisation with the initial running statistics (mean 0, var 1): h / sqrt(1 + eps).
    torch.testing.assert_close(out, model[0](x) / (1 + model[1].eps) ** 0.5)
    assert not model[1].weight.requires_grad and model[0].weight.requires_grad
    assert unfreeze_bn(model) == 1 and not is_bn_frozen(model[1])
    assert model[1].weight.requires_grad and model[1].training
    model(torch.randn(16, 3) + 2)
    assert model[1].num_batches_tracked.item() == 1 and model[1].running_mean.abs().sum() > 0


def test_freeze_callback_keeps_running_stats_through_trainer_train(tmp_path, digits):
    train, _ = digits
    model = tiny_resnet(seed=0)
    before = bn_buffers(model)
    bn_affine = {n: p.detach().clone() for n, p in model.named_parameters() if "normalization" in n}
    other = {n: p.detach().clone() for n, p in model.named_parameters() if "normalization" not in n}
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=3), train_dataset=train)
    trainer.add_callback(FreezeBNCallback(trainer, freeze_affine=True))
    trainer.train()
    assert_same(bn_buffers(model), before)  # Trainer's per-step model.train() did not unfreeze
    for name, p in model.named_parameters():
        if name in bn_affine:
            assert torch.equal(p, bn_affine[name]), name
    assert any(not torch.equal(p, other[n]) for n, p in model.named_parameters() if n in other)
    assert not any(is_bn_frozen(bn) for _, bn in batchnorm_modules(model))  # unfrozen at train end
    assert all(p.requires_grad for p in model.parameters())


def test_freeze_callback_after_step(tmp_path, digits):
    train, _ = digits
    model = tiny_resnet(seed=0)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=4), train_dataset=train)
    trainer.add_callback(FreezeBNCallback(trainer, after_step=2, unfreeze_at_end=False))
    trainer.train()
    # Steps 1-2 update the statistics once each, steps 3-4 run frozen.
    assert {bn.num_batches_tracked.item() for _, bn in batchnorm_modules(model)} == {2}
    assert all(is_bn_frozen(bn) for _, bn in batchnorm_modules(model))
    with pytest.raises(ConfigError, match="after_step"):
        FreezeBNCallback(trainer, after_step=-1)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------


def test_resume_from_checkpoint_restores_bn_running_statistics(tmp_path, digits):
    train, _ = digits
    at_step: dict[int, dict[str, torch.Tensor]] = {}

    class Snapshot(TrainerCallback):
        def __init__(self, model):
            self.model = model

        def on_step_end(self, args, state, control, **kwargs):
            at_step[state.global_step] = bn_buffers(self.model)

        def on_train_begin(self, args, state, control, **kwargs):
            at_step.setdefault(-1, bn_buffers(self.model))

    args = training_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    model = tiny_resnet(seed=0)
    Trainer(model=model, args=args, train_dataset=train, callbacks=[Snapshot(model)]).train()
    uninterrupted = at_step.copy()
    at_step.clear()

    resumed_model = tiny_resnet(seed=5)  # different init: only the checkpoint can supply the statistics
    trainer = Trainer(model=resumed_model, args=args, train_dataset=train, callbacks=[Snapshot(resumed_model)])
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert_same(at_step[-1], uninterrupted[2])  # restored exactly, num_batches_tracked included
    assert_same(at_step[4], uninterrupted[4])  # and training continues exactly as without the interruption


_RANK_SCRIPT = """
import sys, torch
from torch import nn
from hf_batchsched.transforms import recalibrate_bn
rank, init_file, out_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.distributed.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))  # same weights on both ranks
batches = torch.load(out_file + ".batches")[rank::2]  # rank 0: sizes 3 and 40; rank 1: size 17
recalibrate_bn(model, [(x,) for x in batches])
torch.save(model.state_dict(), out_file + str(rank))
torch.distributed.destroy_process_group()
"""


def test_recalibrate_bn_all_reduces_sums_across_ranks(tmp_path):
    import subprocess
    import sys

    out_file = str(tmp_path / "state")
    batches = [b["x"] for b in _unequal_batches()]
    torch.save(batches, out_file + ".batches")
    command = [sys.executable, "-c", _RANK_SCRIPT]
    ranks = [subprocess.Popen([*command, str(r), str(tmp_path / "init"), out_file]) for r in range(2)]
    assert [process.wait(timeout=120) for process in ranks] == [0, 0]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with torch.no_grad():
        h = model[0](torch.cat(batches)).double()
    for rank in range(2):
        state = torch.load(out_file + str(rank))
        # Both ranks hold the statistics pooled over all 60 samples, not over their own 43 or 17.
        torch.testing.assert_close(state["1.running_mean"], h.mean(0).float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state["1.running_var"], h.var(0, unbiased=True).float(), rtol=1e-5, atol=1e-6)


def test_recalibrate_bn_micro_batches_split_every_tensor_and_keep_pooled_statistics():
    model = tiny_resnet(seed=1)
    data = digits_image_dataset(num_samples=35)
    batches = [
        {"pixel_values": data.pixel_values[i : i + n], "labels": data.labels[i : i + n], "return_dict": True}
        for i, n in ((0, 5), (5, 30))
    ]
    chunk_sizes = []

    def forward(model, batch):
        assert batch["labels"].shape[0] == batch["pixel_values"].shape[0]  # every batch tensor sliced alike
        chunk_sizes.append(batch["pixel_values"].shape[0])
        return model(**batch)

    first_bn = batchnorm_modules(model)[0][1]  # its input depends on no earlier BN, so not on the split
    reference = copy.deepcopy(model)
    recalibrate_bn(reference, batches)
    result = recalibrate_bn(model, batches, forward_fn=forward, micro_batch_size=8)
    assert chunk_sizes == [5, 8, 8, 8, 6] and result["num_batches"] == 2 and result["num_samples"] == 35
    ref_bn = batchnorm_modules(reference)[0][1]
    torch.testing.assert_close(first_bn.running_mean, ref_bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first_bn.running_var, ref_bn.running_var, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Under the batch ramp (BatchRampTrainer, hf_batchsched/trainer/)
# ---------------------------------------------------------------------------------------------------------------


class BNTokenModel(nn.Module):
    """Embedding -> BatchNorm1d over the hidden channels -> LM head: a BN model that takes token batches."""

    def __init__(self, vocab_size: int = 128, hidden_size: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.norm = nn.BatchNorm1d(hidden_size)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(self.norm(self.embed(input_ids).transpose(1, 2)).transpose(1, 2))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return {"loss": loss, "logits": logits}


def test_under_the_ramp_bn_sees_micro_chunks_of_the_configured_size(tmp_path):
    from hf_batchsched.assets import synthetic_lm_dataset
    from hf_batchsched.trainer import BatchRampTrainer

    torch.manual_seed(0)
    model = BNTokenModel()
    seen: list[tuple[bool, int]] = []  # (autograd on: a training forward, BN input batch size)
    model.norm.register_forward_pre_hook(lambda m, a: seen.append((torch.is_grad_enabled(), a[0].shape[0])))
    args = training_args(tmp_path, max_steps=3, per_device_train_batch_size=8)
    trainer = BatchRampTrainer(
        model=model,
        args=args,
        train_dataset=synthetic_lm_dataset(num_samples=64),
        batch_schedule=lambda consumed: 16 if consumed < 32 else 32,  # steps of 16, 16, 32 samples
        max_micro_batch_size=8,
    )
    recalibration = BNRecalibrationCallback(trainer, num_batches=1, on_evaluate=False)
    trainer.add_callback(recalibration)
    trainer.train()
    assert trainer.ramp_plan[:3] == [16, 16, 32]
    # Training: 2 + 2 + 4 forwards, each of 8 samples: ghost BN at the micro-batch size, with no surgery,
    # and one running-statistics update per micro-chunk.
    assert [size for grad, size in seen if grad] == [8] * 8
    assert model.norm.num_batches_tracked.item() == 8
    # The recalibration at train end forwards the ramp's step batch in micro-chunks of the same size.
    assert recalibration.micro_batch_size == 8
    recalibration_sizes = [size for grad, size in seen if not grad]
    assert recalibration_sizes and set(recalibration_sizes) == {8}
