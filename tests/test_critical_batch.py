"""Critical batch size by branch runs: the estimator's definition, the checkpoint reader and the command."""

import json

import pytest
import torch
from helpers import tiny_training_args

from hf_batchsched import critical_batch as cb
from hf_batchsched.assets import synthetic_lm_dataset, tiny_llama
from hf_batchsched.cli import main
from hf_batchsched.errors import ConfigError


def _rows(n, seed):
    return torch.tensor(synthetic_lm_dataset(num_samples=n, seq_len=16, seed=seed)["input_ids"])


def test_b_crit_is_largest_batch_within_tolerance(monkeypatch):
    # Stub the branch losses: B_crit is the largest batch before the first branch more than 1% worse than B_min.
    losses = iter([2.00, 2.01, 2.019, 2.05, 2.00])
    monkeypatch.setattr(cb, "_branch", lambda model, *a, **k: model)
    monkeypatch.setattr(cb, "eval_loss", lambda model, rows: next(losses))
    result = cb.critical_batch_size(
        torch.nn.Linear(1, 1),
        _rows(64, 0),
        _rows(8, 1),
        batch_sizes=[4, 8, 16],
        budget_samples=32,
        learning_rate=1e-3,
        noise_repeats=0,
    )
    # first value is loss_start; branches 4 -> 2.01, 8 -> 2.019 (+0.45%), 16 -> 2.05 (+2.0%)
    assert result.loss_start == 2.00 and result.losses == [2.01, 2.019, 2.05]
    assert result.b_crit == 8
    assert result.learning_rates == pytest.approx([1e-3, 1e-3 * 2**0.5, 2e-3])


def test_branches_train_and_leave_model_unchanged():
    model = tiny_llama(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = cb.critical_batch_size(
        model,
        _rows(128, 0),
        _rows(16, 1),
        batch_sizes=[4, 16],
        budget_samples=64,
        learning_rate=3e-3,
        noise_repeats=2,
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(loss < result.loss_start for loss in result.losses)  # 16 resp. 4 Adam steps at lr 3e-3 learn
    assert result.b_crit in (4, 16) and result.noise_scale is not None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_sizes=[4, 12]), "not a multiple"),
        (dict(budget_samples=4096), "exceeds"),
        (dict(tolerance=0.0), "tolerance"),
        (dict(lr_rule="cube"), "lr_rule"),
    ],
)
def test_bad_settings_refused(kwargs, match):
    settings = {**dict(batch_sizes=[4, 8], budget_samples=32, learning_rate=1e-3, noise_repeats=0), **kwargs}
    with pytest.raises(ConfigError, match=match):
        cb.critical_batch_size(tiny_llama(seed=0), _rows(64, 0), _rows(8, 1), **settings)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from transformers import Trainer

    from hf_batchsched.assets import demo_tokenizer

    out = tmp_path_factory.mktemp("run")
    text = "def f(x):\n    return x + 1\n" * 400
    tokenizer = demo_tokenizer([text], vocab_size=300, directory=out / "tok")
    ids = tokenizer(text)["input_ids"]
    rows = [ids[i : i + 16] for i in range(0, len(ids) - 16, 16)]
    from datasets import Dataset

    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    args = tiny_training_args(
        out,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        per_device_train_batch_size=4,
        lr_scheduler_type="constant",
    )
    trainer = Trainer(
        model=tiny_llama(seed=0, vocab_size=len(tokenizer)), args=args, train_dataset=data, processing_class=tokenizer
    )
    trainer.train()
    (out / "text.txt").write_text(text)
    return out


def test_command_measures_every_checkpoint(run_dir, capsys):
    target = run_dir / "cb.json"
    code = main(
        [
            "critical-batch",
            str(run_dir),
            "--text",
            str(run_dir / "text.txt"),
            "--seq-length",
            "16",
            "--batch-sizes",
            "2,4,8",
            "--budget-samples",
            "16",
            "--eval-samples",
            "8",
            "--noise-repeats",
            "1",
            "--json",
            str(target),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "B_crit" in out and "B_simple" in out
    results = json.loads(target.read_text())
    assert [r["step"] for r in results] == [2, 4]
    assert all(r["b_crit"] in (2, 4, 8) and len(r["losses"]) == 3 for r in results)
    assert results[0]["learning_rates"][0] > 0  # the checkpoint's own LR


@pytest.mark.parametrize(
    "argv, match",
    [
        (["/nonexistent/run", "--data", "demo-code"], "is not a directory"),
        (["{tmp}", "--data", "demo-code"], "no checkpoint-N folders"),
        (["{run}"], "pass the text"),
        (["{run}", "--text", "/nonexistent.txt"], "not found"),
    ],
)
def test_command_bad_input_one_line_exit_2(argv, match, run_dir, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, run=run_dir) for a in argv]
    assert main(["critical-batch", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err and "Traceback" not in err


def test_adapter_without_a_base_needs_base_model(run_dir, tmp_path, capsys):
    """A LoRA run on a model built in memory saves adapters whose config names no base: refused in one line (not
    transformers' hub error in a traceback), then measured on the base given with --base-model."""
    from peft import LoraConfig, get_peft_model

    vocab_size = json.loads((run_dir / "checkpoint-2" / "config.json").read_text())["vocab_size"]
    base = tiny_llama(seed=0, vocab_size=vocab_size)
    base.save_pretrained(tmp_path / "base")
    base.name_or_path = ""  # as for a model built from a config
    adapter = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    checkpoint = tmp_path / "run" / "checkpoint-1"
    adapter.save_pretrained(checkpoint)
    assert not json.loads((checkpoint / "adapter_config.json").read_text()).get("base_model_name_or_path")
    common = ["--text", str(run_dir / "text.txt"), "--tokenizer", str(run_dir / "checkpoint-2"), "--seq-length", "16",
              "--batch-sizes", "2,4", "--budget-samples", "8", "--eval-samples", "4", "--noise-repeats", "1",
              "--learning-rate", "1e-3", "--json", str(tmp_path / "cb.json")]  # fmt: skip
    capsys.readouterr()
    assert main(["critical-batch", str(tmp_path / "run"), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert "names no base model" in err and "--base-model" in err and "\n" not in err
    assert main(["critical-batch", str(tmp_path / "run"), *common, "--base-model", str(tmp_path / "base")]) == 0
    [result] = json.loads((tmp_path / "cb.json").read_text())
    assert result["b_crit"] in (2, 4) and len(result["losses"]) == 2
