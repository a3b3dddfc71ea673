"""Depth profiles, gradient norms and divergence detection: functional twins and StabilityMonitorCallback."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import tiny_training_args
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_batchsched.assets import digits_image_dataset, synthetic_lm_dataset, tiny_llama, tiny_resnet
from hf_batchsched.callbacks.stability import StabilityMonitorCallback
from hf_batchsched.errors import ConfigError
from hf_batchsched.model_utils import batchnorm_modules
from hf_batchsched.probes.spikes import LossSpikeDetector
from hf_batchsched.probes.stability import (
    activation_profile,
    block_grad_norms,
    bn_profile,
    find_blocks,
    log_rms_slope,
)


def training_args(tmp_path, **overrides) -> TrainingArguments:
    defaults = {
        "per_device_train_batch_size": 16,
        "max_steps": 4,
        "learning_rate": 0.05,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "dataloader_drop_last": True,
    }
    return tiny_training_args(tmp_path, **{**defaults, **overrides})


@pytest.fixture(scope="module")
def digits():
    return digits_image_dataset(num_samples=192)


def monitor_logs(trainer: Trainer) -> list[dict]:
    return [log for log in trainer.state.log_history if "stability/loss_spikes" in log]


def test_find_blocks_picks_decoder_layers_and_resnet_conv_layers():
    assert [name for name, _ in find_blocks(tiny_llama(num_hidden_layers=3))] == [
        "model.layers.0",
        "model.layers.1",
        "model.layers.2",
    ]
    names = [name for name, _ in find_blocks(tiny_resnet())]
    assert names[0] == "resnet.embedder.embedder" and len(names) == 5
    assert all(type(m).__name__ == "ResNetConvLayer" for _, m in find_blocks(tiny_resnet()))
    mlps = [n for n, _ in find_blocks(tiny_llama(), block_class="LlamaMLP")]
    assert mlps == ["model.layers.0.mlp", "model.layers.1.mlp"]
    with pytest.raises(ConfigError, match="block_class"):
        find_blocks(tiny_llama(), block_class="NoSuchLayer")
    from peft import LoraConfig, get_peft_model

    # LoRA wraps 4 projections per layer (8 lora.Linear > 2 decoder layers): still the decoder layers.
    lora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    assert [n for n, _ in find_blocks(lora)] == ["base_model.model.model.layers.0", "base_model.model.model.layers.1"]


def test_log_rms_slope_and_growth():
    assert log_rms_slope([1.0, math.e, math.e**2, math.e**3]) == pytest.approx(1.0)
    assert math.isnan(log_rms_slope([1.0]))
    assert math.isnan(log_rms_slope([1.0, float("inf")]))
    assert math.isnan(log_rms_slope([1.0, 0.0]))


def test_activation_profile_matches_direct_computation_and_leaves_model_untouched():
    model = tiny_resnet(seed=0).train()
    model.classifier[1].weight.grad = torch.ones_like(model.classifier[1].weight)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    batch = {"pixel_values": torch.randn(12, 1, 16, 16, generator=torch.Generator().manual_seed(0))}
    profile = activation_profile(model, batch)
    # BN buffers, parameters, grads, mode and RNG exactly as before.
    for key, value in model.state_dict().items():
        assert torch.equal(value, buffers[key]), key
    assert torch.equal(model.classifier[1].weight.grad, torch.ones_like(model.classifier[1].weight))
    assert all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    # Reference: outputs of the blocks captured by plain hooks on a copy (cloned: ResNet adds the residual in place).
    reference = copy.deepcopy(model)
    outputs = []
    hooks = [
        m.register_forward_hook(lambda m, a, o: outputs.append(o.detach().clone())) for _, m in find_blocks(reference)
    ]
    with torch.no_grad():
        reference(**batch)
    for hook in hooks:
        hook.remove()
    assert profile.names == [name for name, _ in find_blocks(model)]
    # float32 reductions in a different order: agreement to 1e-5 relative.
    assert profile.rms == pytest.approx([o.square().mean().sqrt().item() for o in outputs], rel=1e-5)
    assert profile.mean == pytest.approx([o.mean().item() for o in outputs], rel=1e-4, abs=1e-6)
    metrics = profile.to_metrics("stability/act_")
    assert metrics["stability/act_growth"] == pytest.approx(profile.rms[-1] / profile.rms[0])
    assert f"stability/act_rms/{profile.names[2]}" in metrics


def test_bn_profile_reads_running_statistics():
    model = tiny_resnet(seed=0)
    layers = batchnorm_modules(model)
    with torch.no_grad():
        for depth, (_, bn) in enumerate(layers):
            bn.running_var.fill_(4.0**depth)
            bn.running_mean.fill_(0.0)
    profile = bn_profile(model)
    assert profile.names == [name for name, _ in layers]
    assert profile.rms == pytest.approx([2.0**d for d in range(len(layers))])
    assert profile.log_rms_slope == pytest.approx(math.log(2.0))


def test_block_grad_norms_per_block_and_total():
    model = tiny_llama()
    model(**{k: torch.tensor(v[:1]) for k, v in synthetic_lm_dataset(num_samples=1)[:].items()}).loss.backward()
    names, norms = block_grad_norms(model, find_blocks(model))
    assert names == ["model.layers.0", "model.layers.1"]
    for (_, block), value in zip(find_blocks(model), norms[:-1]):
        expected = torch.cat([p.grad.flatten() for p in block.parameters()]).norm()
        assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    total = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm()
    assert norms[-1].item() == pytest.approx(total.item(), rel=1e-5)


def test_loss_spike_detector_fires_on_jump_and_round_trips_state():
    detector = LossSpikeDetector(window=10, threshold=3.0, min_history=3)
    flags = [detector.update(v) for v in [2.3, 2.2, 2.25, 2.1, 2.0, 7.0, 2.0, float("inf")]]
    assert flags == [False, False, False, False, False, True, False, True]
    assert detector.spikes == 2 and 7.0 not in detector.history
    clone = LossSpikeDetector(window=10, threshold=3.0, min_history=3)
    clone.load_state_dict(json.loads(json.dumps(detector.state_dict(), allow_nan=True)))
    assert clone.history == detector.history and clone.spikes == 2
    assert clone.update(7.5) is True and detector.update(7.5) is True  # reference 2.25 (upper decile)
    with pytest.raises(ConfigError, match="threshold"):
        LossSpikeDetector(threshold=1.0)
    with pytest.raises(ConfigError, match="min_history"):
        LossSpikeDetector(window=3, min_history=4)


def test_monitor_on_resnet_logs_expected_keys_and_does_not_perturb_training(tmp_path, digits):
    def run(with_monitor: bool):
        model = tiny_resnet(seed=0)
        args = training_args(tmp_path / str(with_monitor), max_steps=4, gradient_accumulation_steps=2)
        trainer = Trainer(model=model, args=args, train_dataset=digits)
        if with_monitor:
            trainer.add_callback(StabilityMonitorCallback(trainer, every_n_steps=2))
        trainer.train()
        return trainer, model

    trainer, model = run(True)
    _, plain = run(False)
    # Hooks only read: parameters and BN buffers end bit-identical to a run without the monitor.
    for (key, value), (_, expected) in zip(model.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(value, expected), key
    logs = monitor_logs(trainer)
    assert [log["step"] for log in logs] == [2, 4]
    blocks = [name for name, _ in find_blocks(model)]
    bns = [name for name, _ in batchnorm_modules(model)]
    expected = (
        {f"stability/act_rms/{b}" for b in blocks}
        | {f"stability/act_mean/{b}" for b in blocks}
        | {f"stability/grad_norm/{b}" for b in blocks}
        | {f"bn/rms/{b}" for b in bns}
        | {f"bn/mean/{b}" for b in bns}
        | {
            "stability/act_log_rms_slope",
            "stability/act_growth",
            "stability/act_rms_max",
            "stability/act_growth_alarm",
            "stability/grad_norm_total",
            "stability/loss_spikes",
            "bn/log_rms_slope",
            "bn/growth",
            "bn/rms_max",
        }
    )
    assert expected <= set(logs[-1])
    assert "stability/loss_ratio" not in logs[-1]  # 4 steps < min_history 5: undefined, so not logged as NaN
    # BN layers normalise each block's output: RMS of a BN'd conv layer output stays O(1) (ReLU halves it).
    assert all(0.1 < logs[-1][f"stability/act_rms/{b}"] < 3 for b in blocks)
    assert logs[-1]["stability/act_growth_alarm"] == 0.0 and logs[-1]["stability/loss_spikes"] == 0.0
    # The monitor's per-step loss (two micro-batches per step) is the loss the Trainer logs.
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StabilityMonitorCallback))
    trainer_losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert callback.detector.history == pytest.approx(trainer_losses, rel=1e-4)


def test_monitor_on_tiny_llama_logs_per_decoder_layer_stats(tmp_path):
    model = tiny_llama(seed=0, num_hidden_layers=3)
    args = training_args(tmp_path, max_steps=3, per_device_train_batch_size=8, learning_rate=1e-3, optim="adamw_torch")
    trainer = Trainer(model=model, args=args, train_dataset=synthetic_lm_dataset(num_samples=32))
    trainer.add_callback(StabilityMonitorCallback(trainer, every_n_steps=3))
    trainer.train()
    (log,) = monitor_logs(trainer)
    for i in range(3):
        assert log[f"stability/act_rms/model.layers.{i}"] > 0
        assert log[f"stability/grad_norm/model.layers.{i}"] > 0
    assert math.isfinite(log["stability/act_log_rms_slope"])
    assert not any(key.startswith("bn/") for key in log)  # no BN layers, no bn/ keys
    assert log["stability/grad_norm_total"] >= max(log[f"stability/grad_norm/model.layers.{i}"] for i in range(3))


class PlantLossJump(TrainerCallback):
    """Blow up the classifier at the end of ``step``: the next steps' loss jumps far above the window."""

    def __init__(self, model, step: int):
        self.model, self.step = model, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                self.model.classifier[1].weight.mul_(300.0)


def test_divergence_detector_fires_on_planted_loss_jump_and_stops_training(tmp_path, digits):
    model = tiny_resnet(seed=0)
    args = training_args(tmp_path, max_steps=12, learning_rate=0.01)
    trainer = Trainer(model=model, args=args, train_dataset=digits, callbacks=[PlantLossJump(model, step=6)])
    trainer.add_callback(StabilityMonitorCallback(trainer, every_n_steps=4, stop_on_divergence=True))
    trainer.train()
    logs = monitor_logs(trainer)
    assert [log["stability/loss_spikes"] for log in logs] == [0.0, 2.0]  # steps 7 and 8 spiked, seen at step 8
    assert logs[-1]["stability/loss_ratio"] > 3
    assert trainer.state.global_step == 8  # stopped at the first sampled step after the jump, not at 12


def test_monitor_state_is_saved_with_checkpoints_and_restored_on_resume(tmp_path, digits):
    args = training_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, learning_rate=0.01)
    trainer = Trainer(model=tiny_resnet(seed=0), args=args, train_dataset=digits)
    trainer.add_callback(StabilityMonitorCallback(trainer, every_n_steps=2))
    trainer.train()
    saved = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    detector = saved["stateful_callbacks"][StabilityMonitorCallback.STATE_KEY]["detector"]
    assert len(detector["values"]) == 2

    # The Trainer's own callback restore (it rebuilds callbacks without arguments) leaves the monitor alone.
    resume_args = training_args(
        tmp_path, max_steps=4, save_strategy="steps", save_steps=2, learning_rate=0.01,
        restore_callback_states_from_checkpoint=True,
    )  # fmt: skip
    resumed = Trainer(model=tiny_resnet(seed=0), args=resume_args, train_dataset=digits)
    callback = StabilityMonitorCallback(resumed, every_n_steps=2)
    resumed.add_callback(callback)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    first = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StabilityMonitorCallback))
    assert callback.detector.history == pytest.approx(first.detector.history, rel=1e-5)


def test_monitor_validates_arguments(tmp_path):
    trainer = Trainer(model=tiny_resnet(), args=training_args(tmp_path))
    with pytest.raises(ConfigError, match="every_n_steps"):
        StabilityMonitorCallback(trainer, every_n_steps=0)
    with pytest.raises(ConfigError, match="max_activation_growth"):
        StabilityMonitorCallback(trainer, max_activation_growth=0.5)


class NoLossKwargs(nn.Module):
    """A model whose forward has no ``**kwargs``: the Trainer passes no ``num_items_in_batch`` and each
    micro-batch loss is that micro-batch's own mean."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_resnet(seed=0)

    def forward(self, pixel_values, labels):
        return self.inner(pixel_values=pixel_values, labels=labels)


def test_monitor_step_loss_weights_micro_batch_means_for_models_without_loss_kwargs(tmp_path, digits):
    model = NoLossKwargs()
    args = training_args(tmp_path, max_steps=4, gradient_accumulation_steps=3, per_device_train_batch_size=8)
    trainer = Trainer(model=model, args=args, train_dataset=digits)
    assert not trainer.model_accepts_loss_kwargs
    callback = StabilityMonitorCallback(trainer, every_n_steps=2)
    trainer.add_callback(callback)
    trainer.train()
    # Equal micro-batches: the sample-weighted mean of the three micro-batch means is the Trainer's step loss.
    trainer_losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert callback.detector.history == pytest.approx(trainer_losses, rel=1e-4)
    assert 1.5 < trainer_losses[0] < 3.5  # a mean cross-entropy over 10 classes, not a sum of three


def test_loss_spike_detector_ignores_small_absolute_jumps_near_zero_loss():
    detector = LossSpikeDetector(window=10, threshold=3.0, min_history=3, min_delta=0.1)
    assert [detector.update(v) for v in [0.02, 0.03, 0.02, 0.09, 0.5]] == [False, False, False, False, True]
    with pytest.raises(ConfigError, match="min_delta"):
        LossSpikeDetector(min_delta=-1.0)


def test_loss_ratio_detector_ignores_rounding_near_zero_loss():
    """The stability monitor's ratio to the window's 90th percentile, with ``min_delta=0``: a memorised batch has
    float32 losses of 0 to a few 1e-8, so consecutive ratios of 3x and more are rounding, not divergence. The
    reference is floored at abs_floor (1e-6); a real jump is still caught."""
    from hf_batchsched.probes.spikes import LossSpikeDetector

    detector = LossSpikeDetector(window=50, threshold=3.0, min_history=5, min_delta=0.0)
    generator = torch.Generator().manual_seed(0)
    losses = (torch.randint(0, 4, (200,), generator=generator).double() * 6e-8).tolist()
    assert sum(detector.update(loss) for loss in losses) == 0
    assert detector.update(0.5) and detector.spikes == 1
