"""The ``hf-batchsched`` command: every subcommand has --help, and bad input is one line with exit code 2."""

import subprocess
import sys

import pytest

from hf_batchsched.cli import COMMANDS, _available_commands, main


def test_every_listed_subcommand_exists():
    assert set(_available_commands()) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_of_each_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: hf-batchsched " + command in capsys.readouterr().out


def test_console_script_bad_subcommand_exits_2():
    result = subprocess.run(
        [sys.executable, "-m", "hf_batchsched.cli", "no-such-command"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"a usage error must be one line, got: {result.stderr!r}"


BAD_INPUTS = [
    (["plot", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["plot", "--batch", "0:32 1M:0", "--samples", "2M", "--no-png"], "must be a positive integer"),
    (["plot", "--batch", "0:32", "--no-png"], "give the run's length"),
    (["demo", "--max-steps", "-3"], "--max-steps must be a positive"),
    (["demo", "--max-steps", "two"], "invalid int value: 'two'"),
    (["demo", "--threads", "0"], "--threads must be at least 1"),
    (["lrbench", "--config", "/nonexistent/lrbench.yaml"], "does not exist"),
    (["range-test", "--start-lr", "-1"], "0 < start_lr < end_lr"),
    (["reproduce", "no-such-paper"], "unknown experiment 'no-such-paper'"),
    (["finetune", "--config", "recipes/configs/demo_cpu.yaml", "--learning_rate", "abc"], "invalid float value"),
    (["finetune", "--config", "recipes/configs/demo_cpu.yaml", "--lerning_rate", "1"], "--lerning_rate"),
    # options are spelled in full: an abbreviation is an unknown option, not the option it starts
    (["demo", "--max-step", "-3"], "unrecognized arguments: --max-step -3"),
    (["finetune", "--conf", "recipes/configs/demo_cpu.yaml", "--max_seq_length", "0"], "required: --config"),
    (
        ["finetune", "--config", "recipes/configs/demo_cpu.yaml", "--learning_rat", "1e-4", "--max_seq_length", "0"],
        "unknown command-line option(s): --learning_rat 1e-4",
    ),
    (
        ["finetune", "--config", "recipes/configs/demo_cpu.yaml", "--sharpness", '{"every_n_step": 5}'],
        "option(s) every_n_step not used by metric(s) avg; accepted: budget, distributed, every_n_steps,",
    ),
]


@pytest.mark.parametrize("argv,expected", BAD_INPUTS, ids=[" ".join(a[:2]) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_code_2(argv, expected, capsys, monkeypatch):
    import pathlib

    monkeypatch.chdir(pathlib.Path(__file__).resolve().parents[1])
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's own errors exit from inside parse_args
        code = exit_info.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert expected in lines[0]
    assert "Traceback" not in captured.out


def test_finetune_help_lists_the_config_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for group, keys in [
        ("model", "model_name_or_path, attn_implementation"),
        ("adapters", "peft, lora_r, lora_alpha"),
        ("batch schedule and LR policy", "batch_schedule, max_micro_batch_size, lr_policy"),
        ("callback sections (JSON)", "sharpness, stability"),
    ]:
        assert f"{group}: {keys}" in help_text
    training = help_text.split("TrainingArguments: ")[1]
    assert all(key in training for key in ("learning_rate", "per_device_train_batch_size", "seed", "use_cpu"))
