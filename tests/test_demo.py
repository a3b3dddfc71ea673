"""The offline demo: its config matches the shipped YAML, its text and tokenizer are local, it runs end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_batchsched import demo
from hf_batchsched.recipe import load_config_file

ROOT = Path(__file__).resolve().parents[1]


def test_demo_config_is_the_shipped_yaml():
    assert load_config_file(ROOT / "recipes" / "configs" / "demo_cpu.yaml") == demo.DEMO_CONFIG


def test_corpus_holds_out_whole_modules():
    train, held_out = demo.demo_corpus()
    assert len(train) > 1000 and len(held_out) > 100
    assert not set(train) & set(held_out) - {""}, "no docstring is in both splits"


def test_tokenizer_is_trained_once_then_cached(tmp_path):
    texts = ["Return the number of items in a container.", "Split the string at the first separator."] * 50
    first = demo.demo_tokenizer(texts, vocab_size=300, directory=tmp_path)
    files = list(tmp_path.glob("demo-tokenizer-*/tokenizer.json"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    second = demo.demo_tokenizer(texts, vocab_size=300, directory=tmp_path)
    assert files[0].stat().st_mtime_ns == stamp, "the second call loads the cache instead of retraining"
    ids = second(texts[0])["input_ids"]
    assert ids == first(texts[0])["input_ids"] and second.decode(ids) == texts[0]  # byte-level: lossless


@pytest.fixture(scope="module")
def fast_demo(tmp_path_factory):
    import os

    root = tmp_path_factory.mktemp("demo")
    saved = os.environ.get("HF_BATCHSCHED_CACHE")
    os.environ["HF_BATCHSCHED_CACHE"] = str(root / "cache")  # a fresh machine: the tokenizer is trained here
    try:
        return demo.run_demo(output_dir=root / "out", fast=True, show_progress=False)
    finally:
        if saved is None:
            os.environ.pop("HF_BATCHSCHED_CACHE")
        else:
            os.environ["HF_BATCHSCHED_CACHE"] = saved


def test_fast_demo_trains_ramps_probes_and_writes_files(fast_demo):
    result = fast_demo
    assert result.optimizer_steps == 40
    # --fast ramps 8 -> 16 -> 32 at 160 and 320 samples: 20 + 10 + 10 steps = 160 + 160 + 320 samples.
    assert sorted(set(result.batch_sizes)) == [8, 16, 32]
    assert result.samples_seen == 640
    # Measured on this task: 6.28 -> ~5.1 in 40 steps; a 0.5 nat drop fails only if training is broken.
    assert result.eval_loss_end < result.eval_loss_start - 0.5
    out = Path(result.output_dir)
    assert list((out / "runs").rglob("events.out.tfevents.*"))
    names = {Path(p).name for p in result.plots}
    assert {"loss.png", "learning_rate.png", "batchsched_batch_size.png", "sharpness_avg.png"} <= names
    assert (out / "adapter" / "adapter_config.json").exists()
    summary = (out / "summary.txt").read_text()
    assert f"{result.eval_loss_start:.3f} -> {result.eval_loss_end:.3f}" in summary
    assert "batch sizes used  8, 16, 32" in summary


def test_demo_command_prints_the_summary(monkeypatch, capsys, tmp_path):
    from hf_batchsched.cli import main

    fake = demo.DemoResult(6.0, 3.0, 396, 5440, [8, 16, 32], 60.0, str(tmp_path), plots=["a/loss.png"])
    calls = {}

    def fake_run_demo(**kwargs):
        calls.update(kwargs)
        return fake

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert main(["demo", "--fast", "--output-dir", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "6.000 -> 3.000  (50.0% lower)" in out and "optimizer steps   396" in out
    assert calls == {"output_dir": str(tmp_path), "max_steps": None, "fast": True, "show_progress": False}
