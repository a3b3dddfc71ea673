"""``hf-batchsched plot``: PNG written, table printed, --json parses, bad input is one line with exit code 2."""

import json
from importlib import resources

import pytest

from hf_batchsched.bench.schedule_view import describe_run
from hf_batchsched.cli import main
from hf_batchsched.commands.plot import EXAMPLE_CONFIG, load_plot_config
from hf_batchsched.schedules.batch_config import batch_schedule_from_config
from hf_batchsched.schedules.simulate import simulate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_example_config_ships_with_the_package():
    path = resources.files("hf_batchsched").joinpath(EXAMPLE_CONFIG)
    config = load_plot_config(path)
    assert config["lr_policy"]["name"] == "NSTEP" and config["equivalent_to_lr"]["base_batch_size"] == 128


def test_example_writes_png_and_prints_smiths_table(tmp_path, capsys):
    png = tmp_path / "smith.png"
    assert main(["plot", "--example", "--output", str(png)]) == 0
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 10_000
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["progress", "samples", "epochs", "lr", "batch", "steps"]
    # 40% of the run = epoch 80: the batch has grown 5x, the LR is still 0.1; at 90% the batch is capped at 5120
    # and the LR has taken over the rest of the decay (0.1 * 0.2**3 * 5120 / 128 = 0.032).
    assert lines[5].split() == ["40%", "4,000,000", "80", "0.1", "640", "25,000"]
    assert lines[10].split() == ["90%", "9,000,000", "180", "0.032", "5120", "28,946"]
    assert "optimizer steps: 29,142" in out and "takes 78,125" in out


def test_example_config_file_and_flags_override(tmp_path, capsys):
    path = str(resources.files("hf_batchsched").joinpath(EXAMPLE_CONFIG))
    assert main(["plot", "--config", path, "--max-batch-size", "640", "--no-png", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["baseline_num_steps"] == 78_125 and data["lr_is_residual"] is True
    assert max(row["batch_size"] for row in data["rows"]) == 640  # the flag overrode the file's 5120
    assert data["png"] is None and not list(tmp_path.iterdir())


def test_json_batch_schedule_of_equivalent_to_lr_round_trips(capsys):
    """``--json`` prints the equivalent_to_lr schedule's config (it used to print null), and it rebuilds the run."""
    assert main(["plot", "--example", "--no-png", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    config = data["batch_schedule"]
    assert config["name"] == "equivalent_to_lr" and config["lr_policy"]["name"] == "NSTEP"
    assert (config["base_batch_size"], config["dataset_size"], config["max_batch_size"]) == (128, 50_000, 5120)
    run = simulate(batch_schedule_from_config(config), data["samples"])
    assert run.num_steps == data["num_steps"] == 29_142
    rows = describe_run(None, run, dataset_size=data["dataset_size"])
    assert [row["batch_size"] for row in rows] == [row["batch_size"] for row in data["rows"]]


def test_adaptive_schedule_is_refused_in_one_line(tmp_path, capsys):
    config = tmp_path / "adaptive.yaml"
    config.write_text("batch_schedule: {name: adaptive, min_size: 32, max_size: 512}\nsamples: 10000\n")
    assert main(["plot", "--config", str(config), "--no-png"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("hf-batchsched plot: error: AdaptiveBatchSchedule")
    assert "cannot be simulated or plotted ahead of time" in err and "starting size is 32" in err


def test_flags_only_json(tmp_path, capsys):
    png = tmp_path / "nested" / "cos.png"
    argv = ["plot", "--lr-policy", "COS", "--lr-param", "k0=0", "--lr-param", "k1=1e-4", "--lr-param", "l=1M"]
    argv += ["--lr-unit", "samples", "--batch", "0:32 200K:64 500K:128", "--samples", "1M", "--rows", "5"]
    assert main([*argv, "--output", str(png), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert png.read_bytes().startswith(PNG_MAGIC) and data["png"] == str(png)
    assert data["samples"] == 1_000_000 and data["batch_schedule"]["schedule"] == "0:32 200K:64 500K:128"
    # 200,000/32 + 300,000/64 + 500,000/128 steps
    assert data["num_steps"] == 6250 + 4688 + 3906
    assert [row["batch_size"] for row in data["rows"]] == [32, 64, 64, 128, 128]
    assert data["rows"][0]["lr"] == pytest.approx(1e-4) and data["rows"][2]["lr"] == pytest.approx(5e-5, rel=1e-3)
    assert data["lr_policy"] == {"name": "COS", "unit": "samples", "k0": 0, "k1": 1e-4, "l": 1e6}


def test_steps_unit_policy_and_multiplier(capsys):
    argv = ["plot", "--lr-policy", "linear_decay", "--lr-param", "total=100", "--base-lr", "0.01"]
    argv += ["--batch", "10", "--samples", "1000", "--rows", "3", "--no-png", "--json"]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    # A steps policy is read at the step count: 100 steps of 10 samples; row 2 is the last step (index 99).
    assert [row["lr"] for row in rows] == pytest.approx([0.01, 0.005, 0.01 * (1 - 99 / 100)])
    assert [row["steps"] for row in rows] == [0, 50, 100]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch", "0:32 8M:64 2M:128", "--samples", "1M"], "thresholds must strictly increase"),
        (["--batch", "0:32", "--samples", "lots"], "cannot read 'lots' as a quantity"),
        (["--batch", "0:32"], "give the run's length"),
        (["--samples", "1M"], "give a batch schedule"),
        (["--lr-policy", "NOPE", "--batch", "8", "--samples", "100"], "unknown LR policy 'NOPE'"),
        (["--lr-param", "k0=1", "--batch", "8", "--samples", "100"], "need --lr-policy"),
        (["--example", "--max-batch-size", "64"], "max_batch_size 64 is below base_batch_size 128"),
        (["--config", "/nonexistent/plot.yaml"], "No such file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(["plot", *argv, "--no-png"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("hf-batchsched plot: error:")
    assert message in err


def test_bad_config_key_and_unknown_flag(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("lr_policy: {name: FIX, k0: 0.1}\nbatch_schedul: 32\nsamples: 100\n")
    assert main(["plot", "--config", str(config), "--no-png"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unknown key(s) batch_schedul" in err
    # An unknown flag is argparse's: exit code 2, and the error line names the flag.
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", "--no-such-flag"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err.strip().splitlines()[-1]
