"""``couple:`` and a seesaw ``batch_schedule:`` in a recipe config, and ``--couple`` on the command line."""

from __future__ import annotations

import pytest
import yaml
from test_recipes import ROOT, tiny_local, tiny_overrides  # noqa: F401  (tiny_local is a fixture)

from hf_batchsched.errors import ConfigError
from hf_batchsched.recipe import load_config_file, parse_config

SEESAW = {
    "name": "seesaw",
    "base_batch_size": 4,
    "max_batch_size": 16,
    "lr_policy": {"name": "cosine", "total": 96, "unit": "samples"},
}


def recipe_config(root, output_dir, **extra) -> dict:
    shipped = load_config_file(ROOT / "recipes" / "configs" / "demo_cpu.yaml")
    config = {**shipped, **tiny_overrides(root, output_dir), "sharpness": None, "lr_policy": None}
    config.update(max_steps=-1, max_train_samples=96, num_train_epochs=1, max_micro_batch_size=4, **extra)
    return config


def test_cli_runs_seesaw_from_yaml_with_couple_flag(tiny_local, tmp_path, capsys):  # noqa: F811
    from hf_batchsched.cli import main

    config = recipe_config(tiny_local, tmp_path / "out", batch_schedule=SEESAW, weight_decay=0.1)
    config.pop("dataset_name")
    path = tmp_path / "seesaw.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["finetune", "--config", str(path), "--couple", "wd,betas", "--logging_steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "train_loss" in out
    with pytest.raises(
        ConfigError, match="config key 'couple': unknown couple lr 'cubic'; valid choices: linear, sqrt"
    ):
        parse_config({**config, "couple": "lr=cubic"})
    assert main(["finetune", "--config", str(path), "--couple", "lr=cubic"]) == 2
    err = capsys.readouterr().err
    assert "unknown couple lr 'cubic'" in err and len(err.strip().splitlines()) == 1


def test_recipe_couple_section_reaches_the_trainer(tiny_local, tmp_path):  # noqa: F811
    from hf_batchsched.recipe import finetune
    from hf_batchsched.schedules.simulate import simulate

    config = recipe_config(
        tiny_local,
        tmp_path,
        batch_schedule=SEESAW,
        weight_decay=0.1,
        couple={"weight_decay": True, "betas": True},
        logging_steps=1,
    )
    trainer = finetune(parse_config(config))
    assert str(trainer.couple) == "wd,betas"
    history = trainer.state.log_history
    sizes = [entry["batchsched/batch_size"] for entry in history if "batchsched/batch_size" in entry]
    assert trainer.ramp_plan == simulate(trainer.batch_schedule, len(trainer.train_dataset)).step_sizes
    assert max(sizes) == 16
    # beta2 logged at every logging step (logging_steps 1): 0.999 ** (B / 4); weight decay x sqrt(B / 4)
    coupled = [entry for entry in history if "batchsched/beta2" in entry]
    assert len(coupled) == len(sizes) and {entry["batchsched/batch_size"] for entry in coupled} >= {4, 16}
    for entry in coupled:
        k = entry["batchsched/batch_size"] / 4
        assert entry["batchsched/beta2"] == pytest.approx(0.999**k, rel=1e-12)
        assert entry["batchsched/weight_decay"] == pytest.approx(0.1 * k**0.5, rel=1e-12)
    assert trainer.lr_policy.name == "seesaw(cosine)"


def test_recipe_refuses_couple_without_a_batch_schedule_and_a_second_lr_with_seesaw():
    with pytest.raises(ConfigError, match="'couple' needs a 'batch_schedule'"):
        parse_config({"couple": "lr=sqrt", "report_to": "none", "use_cpu": True})
    with pytest.raises(ConfigError, match="the seesaw batch_schedule sets the LR itself"):
        parse_config({"batch_schedule": SEESAW, "lr_policy": "constant", "report_to": "none", "use_cpu": True})
