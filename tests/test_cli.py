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
