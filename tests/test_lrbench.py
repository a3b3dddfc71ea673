"""``hf-batchsched lrbench``: candidates trained on one task, measured, ranked, reported and plotted."""

from __future__ import annotations

import csv
import json

import pytest

from hf_batchsched.bench.lrbench import (
    UTILITIES,
    evaluate_utility,
    load_lrbench_config,
    rank_results,
    run_lrbench,
)
from hf_batchsched.cli import main
from hf_batchsched.commands.lrbench import EXAMPLE_CONFIG
from hf_batchsched.errors import ConfigError

SMALL = {
    "task": {"num_train_samples": 64, "num_eval_samples": 16, "seq_len": 8},
    "training": {"max_steps": 4, "per_device_train_batch_size": 8, "learning_rate": 3e-3, "use_cpu": True},
    "num_evals": 2,
}


def small_config(**overrides):
    config = json.loads(json.dumps(SMALL))
    config["candidates"] = [
        {"name": "constant", "policy": {"name": "constant"}},
        {"name": "half", "policy": {"name": "constant", "factor": 0.5}},
        {"name": "FIX", "policy": {"name": "FIX", "k0": 1e-2, "unit": "fraction"}},
    ]
    config.update(overrides)
    return config


def test_shipped_example_runs_through_the_cli(tmp_path, capsys):
    # The shipped config (three policies), cut to 3 updates per candidate.
    code = main(["lrbench", "--config", EXAMPLE_CONFIG, "--output-dir", str(tmp_path), "--max-steps", "3"])
    assert code == 0
    for name in ("results.md", "results.csv", "results.json", "lr_curves.png", "loss_curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "results.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["rank"] for row in rows] == ["1", "2", "3"]
    assert {row["name"] for row in rows} == {"constant", "warmup_cosine", "lrbench_SINEXP"}
    utilities = [float(row["utility"]) for row in rows]
    assert utilities == sorted(utilities)  # best (lowest best_eval_loss) first
    assert "| rank | name |" in capsys.readouterr().out


def test_three_policies_measured_and_ranked(tmp_path):
    outcome = run_lrbench(small_config(), str(tmp_path), log=lambda message: None)
    ranking = outcome["ranking"]
    assert len(ranking) == 3
    by_name = {result.name: result for result in ranking}
    # The candidates' LRs are the policies': base LR 3e-3 times 1 and 0.5, and FIX's absolute 1e-2.
    assert by_name["constant"].curves["lr"] == pytest.approx([3e-3] * 4)
    assert by_name["half"].curves["lr"] == pytest.approx([1.5e-3] * 4)
    assert by_name["FIX"].curves["lr"] == pytest.approx([1e-2] * 4)
    for result in ranking:
        assert result.optimizer_updates == 4
        assert [step for step, _ in result.curves["eval_loss"]] == [2, 4]
        assert result.best_eval_loss == min(loss for _, loss in result.curves["eval_loss"])
        assert result.final_eval_loss == result.curves["eval_loss"][-1][1]
        assert result.train_eval_gap == pytest.approx(result.final_eval_loss - result.final_train_loss)
        assert result.wall_time_s > 0 and result.sharpness is None
    assert [r.best_eval_loss for r in ranking] == sorted(r.best_eval_loss for r in ranking)
    # Same init and data for everyone: a higher LR learns faster on this task at 4 updates.
    assert by_name["FIX"].best_eval_loss < by_name["constant"].best_eval_loss < by_name["half"].best_eval_loss
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [row["name"] for row in saved["ranking"]] == [r.name for r in ranking]
    assert "| 1 | FIX |" in (tmp_path / "results.md").read_text()


def test_successive_halving_keeps_the_better_half_and_doubles_the_budget(tmp_path):
    outcome = run_lrbench(small_config(halving=True), str(tmp_path), log=lambda message: None)
    rounds = [(run.round, run.name, run.budget_steps) for run in outcome["all_runs"]]
    assert [(r, b) for r, _, b in rounds] == [(0, 4), (0, 4), (0, 4), (1, 8), (1, 8), (2, 16)]
    round0 = rank_results([run for run in outcome["all_runs"] if run.round == 0], "best_eval_loss")
    assert {name for r, name, _ in rounds if r == 1} == {round0[0].name, round0[1].name}
    assert outcome["ranking"][0].round == 2 and outcome["ranking"][0].name == rounds[-1][1]
    assert [run.round for run in outcome["ranking"]] == [2, 1, 0]


def test_utilities_and_safe_expressions():
    metrics = {"best_eval_loss": 2.0, "final_eval_loss": 2.5, "train_eval_gap": 0.25, "optimizer_updates": 8}
    assert evaluate_utility("robust_eval_loss", metrics) == 2.75
    assert "loss_per_update" in UTILITIES
    assert evaluate_utility("sqrt(best_eval_loss ** 2) - -1", metrics) == 3.0
    for bad, match in [
        ("best_eval_loss.__class__", "Attribute"),
        ("open('x')", "may be called"),
        ("eval_accuracy", "not a metric"),
        ("best_eval_loss +", "not valid"),
        ("[best_eval_loss][0]", "only numbers"),
        ("'a' * 3", "numeric constants"),
    ]:
        with pytest.raises(ConfigError, match=match):
            evaluate_utility(bad, metrics)
    with pytest.raises(ConfigError, match="was not measured"):
        evaluate_utility("sharpness * 2", {**metrics, "sharpness": None})


@pytest.mark.parametrize(
    "change,match",
    [
        ({"candidates": []}, "non-empty list"),
        ({"candidates": [{"policy": {"name": "nope"}}]}, "unknown LR policy"),
        ({"candidates": [{"policy": {"name": "FIX", "k0": -1.0}}]}, "must be > 0"),
        ({"candidates": [{"name": "a", "policy": {"name": "constant"}}] * 2}, "two candidates"),
        ({"rank_by": "loss; import os"}, "not valid"),
        ({"rank_mode": "best"}, "unknown rank_mode"),
        ({"epochs": 3}, "unknown lrbench config key"),
        ({"training": {"max_steps": 0}}, "max_steps"),
    ],
)
def test_bad_configs(change, match):
    with pytest.raises(ConfigError, match=match):
        load_lrbench_config(small_config(**change))


def test_cli_bad_input_returns_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("candidates:\n  - policy: {name: COS, k0: 0.0, k1: 0.1}\n")  # COS needs l
    assert main(["lrbench", "--config", str(bad), "--output-dir", str(tmp_path / "out")]) == 2
    assert "missing required parameter(s): l" in capsys.readouterr().err
    assert main(["lrbench", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert main(["lrbench", "--config", EXAMPLE_CONFIG, "--rank-by", "__import__('os')"]) == 2


def test_sharpness_is_measured_when_enabled(tmp_path):
    config = small_config(sharpness=True, rank_by="best_eval_loss + 0 * sharpness")
    config["candidates"] = config["candidates"][:1]
    result = run_lrbench(config, str(tmp_path), log=lambda message: None)["ranking"][0]
    assert result.sharpness is not None and result.sharpness > 0  # lambda_max of a trained LM is positive
    assert result.utility == result.best_eval_loss


def test_training_section_must_hold_training_arguments(tmp_path):
    config = small_config(training={"max_steps": 2, "learning_rate_typo": 1e-3})
    config["candidates"] = config["candidates"][:1]
    with pytest.raises(ConfigError, match="learning_rate_typo"):
        run_lrbench(config, str(tmp_path), log=lambda message: None)
