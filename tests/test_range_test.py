"""LR range test on a real Trainer: the curve, the suggestion, and a bit-for-bit restore."""

from __future__ import annotations

import copy
import json
import math
import random

import numpy as np
import pytest
import torch
from helpers import tiny_training_args
from transformers import PrinterCallback, Trainer

from hf_batchsched.assets import synthetic_lm_dataset, tiny_llama
from hf_batchsched.bench.range_test import lr_range_test, range_test_lrs, suggest_lr
from hf_batchsched.cli import main
from hf_batchsched.errors import ConfigError
from hf_batchsched.trainer import BatchRampTrainer


def make_trainer(tmp_path, model=None, trainer_cls=Trainer, **overrides):
    trainer = trainer_cls(
        model=model or tiny_llama(seed=0, attention_dropout=0.1),  # dropout: the test consumes RNG
        args=tiny_training_args(tmp_path / "out", **{"max_steps": 6, **overrides}),
        train_dataset=synthetic_lm_dataset(32, seq_len=8),
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def model_state(model):
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
        "grads": {k: None if v.grad is None else v.grad.clone() for k, v in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
    }


def assert_same_model(a, b):
    for part in ("params", "buffers"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    for key, grad in a["grads"].items():
        other = b["grads"][key]
        assert (grad is None and other is None) or torch.equal(grad, other), key
    assert a["training"] == b["training"]


def test_range_test_restores_everything_bit_for_bit(tmp_path):
    trainer = make_trainer(tmp_path)
    model = trainer.model
    # An optimizer with state (one real update) and a model left in eval mode with a gradient on one weight.
    trainer.create_optimizer()
    model(**{k: torch.tensor(v[:4]) for k, v in trainer.train_dataset[:4].items()}).loss.backward()
    trainer.optimizer.step()
    model.eval()
    first = next(model.parameters())
    first.grad = torch.full_like(first, 0.5)
    before = model_state(model)
    optimizer_before = copy.deepcopy(trainer.optimizer.state_dict())
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    rng_before = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)

    result = lr_range_test(trainer, start_lr=1e-5, end_lr=1.0, num_steps=20, skip_start=2, skip_end=2)

    assert (random.random(), np.random.rand()) == rng_before[:2] and torch.equal(torch.rand(3), rng_before[2])
    assert_same_model(before, model_state(model))
    after = trainer.optimizer.state_dict()
    assert after["param_groups"] == optimizer_before["param_groups"]
    for index, entry in optimizer_before["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, after["state"][index][name]), (index, name)
    # The curve: geometric LRs, finite losses, a suggestion inside the range.
    assert result.lrs == pytest.approx(range_test_lrs(1e-5, 1.0, 20)[: len(result.lrs)], rel=1e-12)
    assert all(math.isfinite(loss) for loss in result.losses[:10])
    assert result.suggestion is not None and 1e-6 <= result.suggestion <= 0.1


def test_training_after_a_range_test_equals_training_without(tmp_path):
    # The strongest restore check: the same Trainer trains identically with or without a range test first
    # (optimizer created by the test and dropped again; RNG, weights and data order untouched).
    plain = make_trainer(tmp_path / "plain")
    plain.train()
    probed = make_trainer(tmp_path / "probed")
    lr_range_test(probed, num_steps=12, skip_start=1, skip_end=1)
    assert probed.optimizer is None
    probed.train()
    losses = [[log["loss"] for log in t.state.log_history if "loss" in log] for t in (plain, probed)]
    assert losses[0] == losses[1]


def test_range_test_on_peft_batch_ramp_trainer_and_plot(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(seed=0), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer = make_trainer(tmp_path, model=model, trainer_cls=BatchRampTrainer)
    before = model_state(model)
    clock_before = trainer.clock.state_dict()
    result = lr_range_test(trainer, start_lr=1e-4, end_lr=1.0, num_steps=15)
    assert_same_model(before, model_state(model))
    assert trainer.clock.state_dict() == clock_before  # the ramp's clock is restored too
    assert len(result.losses) == 15 and len(set(result.losses)) > 1  # the LoRA weights did train during the test
    path = result.plot(str(tmp_path / "plots" / "range.png"))
    with open(path, "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"


def test_range_test_stops_on_divergence(tmp_path):
    trainer = make_trainer(tmp_path, max_grad_norm=0.0)
    result = lr_range_test(trainer, start_lr=1e-3, end_lr=100.0, num_steps=30, smooth=1.0, diverge_threshold=2.0)
    assert result.diverged_at is not None and len(result.lrs) == result.diverged_at + 1 < 30
    assert result.smoothed_losses[-1] > 2.0 * min(result.smoothed_losses[:-1]) or not math.isfinite(result.losses[-1])


def test_suggestion_rules_and_bad_input():
    lrs = range_test_lrs(1e-6, 1e-1, 21)
    losses = [2.0 - 1.5 / (1 + math.exp(-4 * (math.log10(lr) + 3))) for lr in lrs]  # steepest at 1e-3
    assert suggest_lr(lrs, losses, skip_start=0, skip_end=0) == pytest.approx(1e-4, rel=1e-9)  # 1e-3 / 10
    assert suggest_lr(lrs, losses, rule="minimum", skip_start=0, skip_end=0, safety_factor=1) == pytest.approx(0.1)
    assert suggest_lr(lrs[:4], losses[:4]) is None  # nothing left after trimming
    with pytest.raises(ConfigError, match="start_lr < end_lr"):
        range_test_lrs(1e-2, 1e-3, 10)
    with pytest.raises(ConfigError, match="unknown mode"):
        range_test_lrs(1e-6, 1e-3, 10, mode="cubic")


def test_range_test_cli(tmp_path, capsys):
    code = main(["range-test", "--output-dir", str(tmp_path), "--num-steps", "15", "--end-lr", "0.1"])
    assert code == 0
    saved = json.loads((tmp_path / "range_test.json").read_text())
    assert len(saved["lrs"]) == 15 and (tmp_path / "range_test.png").is_file()
    assert "suggested LR" in capsys.readouterr().out
    assert main(["range-test", "--output-dir", str(tmp_path), "--mode", "cubic"]) == 2
    assert main(["range-test", "--config", str(tmp_path / "missing.yaml")]) == 2
