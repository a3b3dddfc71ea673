"""``hf-batchsched lrbench``: candidates trained on one task, measured, ranked, reported and plotted."""

from __future__ import annotations

import csv
import json

import pytest

from hf_batchsched.bench.lrbench import rank_results, run_lrbench
from hf_batchsched.bench.lrbench_config import UTILITIES, evaluate_utility, load_lrbench_config
from hf_batchsched.cli import main
from hf_batchsched.commands.lrbench import EXAMPLE_CONFIG, EXAMPLE_RECIPE_CONFIG
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


# --------------------------------------------------------------------------------------------------
# recipe: the task is the user's own recipe fine-tune
# --------------------------------------------------------------------------------------------------


def tiny_recipe(tmp_path) -> dict:
    """A recipe small enough for a test: the demo's fresh small Llama with LoRA r=4, a 60-row local JSONL packed to
    16 tokens, and a batch ramp 2 -> 4 samples per update."""
    data = tmp_path / "code.jsonl"
    rows = [{"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n"} for i in range(60)]
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return {
        "model_name_or_path": None,
        "peft": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "data_files": [str(data)],
        "eval_fraction": 0.25,
        "max_seq_length": 16,
        "max_eval_samples": 8,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 8,
        "batch_schedule": {
            "name": "geometric",
            "unit": "samples",
            "start": 2,
            "factor": 2,
            "milestones": [4],
            "max_size": 4,
        },
        "max_micro_batch_size": 2,
        "learning_rate": 3e-3,
        "lr_policy": {"name": "constant"},  # replaced by each candidate's policy
        "max_steps": 100,  # replaced by lrbench's budget
        "use_cpu": True,
        "report_to": ["tensorboard"],  # lrbench turns per-run integrations off unless recipe_overrides say so
        "seed": 7,
    }


RECIPE_CANDIDATES = [
    {"name": "constant", "policy": {"name": "constant"}},
    {"name": "FIX", "policy": {"name": "FIX", "k0": 1e-2}},
]


def test_recipe_task_runs_each_candidate_from_the_same_start(tmp_path, capsys):
    import yaml

    # The recipe is a file next to the lrbench config, found relative to it (the command runs from elsewhere).
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "my_recipe.yaml").write_text(yaml.safe_dump(tiny_recipe(tmp_path)))
    lrbench = {
        "recipe": "my_recipe.yaml",
        "recipe_overrides": {"lora_r": 2},
        "training": {"max_steps": 4},
        "num_evals": 2,
        "candidates": RECIPE_CANDIDATES,
    }
    (config_dir / "lrbench.yaml").write_text(yaml.safe_dump(lrbench))
    out = tmp_path / "out"
    command = ["lrbench", "--config", str(config_dir / "lrbench.yaml"), "--output-dir", str(out), "--halving"]
    assert main(command) == 0
    for name in ("results.md", "results.csv", "results.json", "lr_curves.png", "loss_curves.png"):
        assert (out / name).stat().st_size > 0, name
    assert "| rank | name |" in capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    # Successive halving: both for 4 updates, then the better one alone for 8 (a fresh model, same start).
    assert [(run["round"], run["optimizer_updates"]) for run in saved["runs"]] == [(0, 4), (0, 4), (1, 8)]
    assert saved["runs"][2]["name"] == saved["ranking"][0]["name"]
    assert len(saved["runs"][2]["curves"]["lr"]) == 8
    runs = {run["name"]: run for run in saved["runs"] if run["round"] == 0}
    assert set(runs) == {"constant", "FIX"}
    # The optimizer used each candidate's LR: the recipe's 3e-3 times 1, and FIX's absolute 1e-2.
    assert runs["constant"]["curves"]["lr"] == pytest.approx([3e-3] * 4)
    assert runs["FIX"]["curves"]["lr"] == pytest.approx([1e-2] * 4)
    for run in runs.values():
        assert run["optimizer_updates"] == 4
        assert [step for step, _ in run["curves"]["eval_loss"]] == [2, 4]
        assert run["train_eval_gap"] == pytest.approx(run["final_eval_loss"] - run["final_train_loss"])
    # Same base weights and the same first batch: the first logged loss, taken before any update, is the same for
    # both (same ops on the same CPU; 1e-6 only allows for float summation order). LoRA's B starts at zero, so this
    # does not see the adapters' A; test_recipe_task_builds_identical_initial_models compares every weight.
    first = [run["curves"]["train_loss"][0] for run in runs.values()]
    assert first[0][0] == first[1][0] == 1 and first[0][1] == pytest.approx(first[1][1], rel=1e-6)
    # ...after which the policies differ, and so do the results.
    assert runs["constant"]["final_eval_loss"] != runs["FIX"]["final_eval_loss"]
    # lrbench's settings win over the recipe's (seed, budget) and its run defaults over the recipe's report_to.
    assert saved["config"]["recipe"]["seed"] == 7 and saved["config"]["seed"] == 0
    assert not (out / "runs" / "constant-r0" / "runs").exists()


def test_recipe_task_builds_identical_initial_models(tmp_path):
    from hf_batchsched.bench.lrbench_tasks import build_task

    config = load_lrbench_config(
        {"recipe": tiny_recipe(tmp_path), "training": {"max_steps": 2}, "candidates": RECIPE_CANDIDATES}
    )
    make_trainer = build_task(config)
    first = make_trainer({"name": "constant"}, 2, 1, str(tmp_path / "a"))
    second = make_trainer({"name": "FIX", "k0": 1e-2}, 2, 1, str(tmp_path / "b"))
    assert hasattr(first.model, "peft_config")  # the recipe's LoRA, not a plain model
    state_a, state_b = first.model.state_dict(), second.model.state_dict()
    assert any("lora_A" in key for key in state_a) and state_a.keys() == state_b.keys()
    for key in state_a:  # lora_A is drawn at random: equal only because the seed is set before each build
        assert torch_equal(state_a[key], state_b[key]), key
    assert first.train_dataset is second.train_dataset  # the data is tokenised once and shared


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"task": {"model": "tiny"}}, "either 'task' or 'recipe'"),
        ({"recipe_overrides": {"lerning_rate": 1e-3}}, "unknown config key 'lerning_rate'"),
        ({"recipe_overrides": {"lr_policy": {"name": "nope"}}}, None),  # replaced by the candidates' policies
        ({"recipe": "no/such/recipe.yaml"}, "recipe file 'no/such/recipe.yaml' not found"),
        ({"training": {"max_steps": 2, "learning_rate": 1e-3}}, "training takes only max_steps"),
        ({"training": {}, "recipe_overrides": {"max_steps": -1}}, "lrbench needs a step budget"),
    ],
)
def test_bad_recipe_configs(tmp_path, change, match):
    config = {"recipe": tiny_recipe(tmp_path), "training": {"max_steps": 2}, "candidates": RECIPE_CANDIDATES}
    config.update(change)
    if match is None:
        assert load_lrbench_config(config)["training"] == {"max_steps": 2}
        return
    with pytest.raises(ConfigError, match=match):
        load_lrbench_config(config)


def test_cli_task_and_recipe_together_is_one_line_and_exit_2(tmp_path, capsys):
    import yaml

    config = tmp_path / "both.yaml"
    config.write_text(yaml.safe_dump({"task": {"model": "tiny"}, "recipe": {}, "candidates": RECIPE_CANDIDATES}))
    assert main(["lrbench", "--config", str(config), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "either 'task' or 'recipe'" in err and len(err.splitlines()) == 1


def test_shipped_recipe_example_is_valid():
    # Loading resolves the recipe (recipes/configs/demo_cpu.yaml, relative to the example) and validates it.
    config = load_lrbench_config(EXAMPLE_RECIPE_CONFIG)
    assert config["recipe"]["peft"] == "lora" and config["recipe_overrides"]["sharpness"] is None
    assert config["training"] == {"max_steps": 40} and len(config["candidates"]) == 3
