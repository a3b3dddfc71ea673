"""The recipe from the command line: a run killed (SIGKILL) during a save and resumed with
``hf-batchsched finetune ... --resume_from_checkpoint true`` equals the uninterrupted run; bad inputs are one line,
exit code 2, and nothing is written.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_batchsched.cli import main

ROOT = Path(__file__).resolve().parents[1]

# SIGKILL this process in the save of checkpoint-4, after its model, optimizer and scheduler files, before its RNG
# state and trainer_state.json: the last complete checkpoint is checkpoint-2.
KILLED_IN_SAVE = """
import os, signal, sys
from transformers import set_seed
from hf_batchsched.trainer import BatchRampTrainer
original = BatchRampTrainer._save_rng_state
def _save_rng_state(self, output_dir):
    if self.state.global_step == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, output_dir)
BatchRampTrainer._save_rng_state = _save_rng_state
set_seed(0)
from hf_batchsched.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def recipe_config(tmp_path_factory) -> Path:
    """A LoRA recipe (lora_dropout 0.05) with a 4 -> 8 -> 16 ramp on a tiny local Llama, saving every 2 steps."""
    from hf_batchsched.assets import demo_tokenizer, tiny_llama

    root = tmp_path_factory.mktemp("recipe")
    words = "the batch grows while the learning rate stays and the loss falls on every step of training".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12 + i % 9)) for i in range(300)]
    tokenizer = demo_tokenizer(texts, vocab_size=300, directory=root / "cache")
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=64)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "data.jsonl").write_text("\n".join(json.dumps({"text": text}) for text in texts))
    config = {
        "model_name_or_path": str(root / "model"),
        "dtype": "float32",
        "data_files": [str(root / "data.jsonl")],
        "max_seq_length": 32,
        "eval_fraction": 0,
        "peft": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.05,
        "lora_target_modules": ["q_proj", "v_proj"],
        "batch_schedule": "0:4 8:8 24:16",
        "per_device_train_batch_size": 4,
        "max_steps": 6,
        "learning_rate": 1e-3,
        "save_strategy": "steps",
        "save_steps": 2,
        "logging_steps": 1,
        "eval_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    path = root / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def _result(output_dir: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    state = json.loads((output_dir / "checkpoint-6" / "trainer_state.json").read_text())
    losses = {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}
    return losses, load_file(output_dir / "adapter_model.safetensors")


def test_recipe_killed_in_a_save_and_resumed_from_the_cli_equals_the_uninterrupted_run(
    recipe_config, tmp_path, caplog
):
    from transformers import set_seed

    full, killed = tmp_path / "full", tmp_path / "killed"
    config = ["finetune", "--config", str(recipe_config)]
    # One thread here and in the child; the seed makes the LoRA init (drawn from the global generator before the
    # Trainer seeds it) the same in both processes.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    crashing = subprocess.Popen(
        [sys.executable, "-c", KILLED_IN_SAVE, *config, "--output_dir", str(killed)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    set_seed(0)
    assert main([*config, "--output_dir", str(full)]) == 0
    _, stderr = crashing.communicate(timeout=600)
    assert crashing.returncode == -9, stderr[-3000:]  # SIGKILL
    assert (killed / "checkpoint-4" / "optimizer.pt").exists()
    assert not (killed / "checkpoint-4" / "trainer_state.json").exists()

    set_seed(1)  # the resumed run takes everything from the checkpoint, whatever the RNG holds before
    with caplog.at_level(logging.WARNING, logger="hf_batchsched.checkpoint"):
        assert main([*config, "--output_dir", str(killed), "--resume_from_checkpoint", "true"]) == 0
    (line,) = [record.getMessage() for record in caplog.records if "passed over" in record.getMessage()]
    assert "checkpoint-2, the newest complete checkpoint" in line
    assert "passed over the incomplete checkpoint-4 (trainer_state.json is missing" in line
    losses, adapter = _result(killed)
    expected_losses, expected_adapter = _result(full)
    assert sorted(losses) == list(range(1, 7))
    assert losses == expected_losses  # exact: same computation, same build, one thread
    assert adapter.keys() == expected_adapter.keys()
    assert all(torch.equal(adapter[name], expected_adapter[name]) for name in adapter)


def _one_line_error(argv: list[str], capsys) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_bad_inputs_are_one_line_exit_2_and_write_nothing(recipe_config, tmp_path, capsys):
    output_dir = tmp_path / "out"
    config = ["finetune", "--config", str(recipe_config), "--output_dir", str(output_dir)]

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("learning_rate: 1e-4\nbatch_schedule:\n  name: constant\n size: 8\n")
    line = _one_line_error(["finetune", "--config", str(bad_yaml)], capsys)
    assert "bad.yaml', line 4, column 2: invalid YAML" in line

    missing = tmp_path / "no-such-model"
    line = _one_line_error([*config, "--model_name_or_path", str(missing)], capsys)
    assert f"'model_name_or_path': {str(missing)!r} does not exist" in line

    line = _one_line_error([*config, "--model_name_or_path", "no-such-org/no-such-model"], capsys)  # hub offline
    assert "'model_name_or_path': cannot load 'no-such-org/no-such-model'" in line

    line = _one_line_error([*config, "--resume_from_checkpoint", str(tmp_path / "checkpoint-9")], capsys)
    assert "checkpoint-9' does not exist" in line

    damaged = tmp_path / "old" / "checkpoint-2"
    damaged.mkdir(parents=True)
    (damaged / "trainer_state.json").write_text('{"global_step": 2, "stateful_callbacks": {"hf_batchsched.Batch')
    line = _one_line_error([*config, "--resume_from_checkpoint", str(damaged)], capsys)
    assert "checkpoint-2 is incomplete: trainer_state.json is cut off or not JSON" in line

    line = _one_line_error([*config, "--resume_from_checkpoint", "true"], capsys)
    assert "there is no checkpoint in output_dir" in line
    assert not output_dir.exists()
