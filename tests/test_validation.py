"""Arguments are checked where they are given (at construction), with a message naming them."""

from __future__ import annotations

import math

import pytest
from test_trainer_ramp import make_args, make_trainer

from hf_batchsched.callbacks.sharpness import SharpnessProbeCallback
from hf_batchsched.data import RampBatchSampler
from hf_batchsched.errors import ConfigError, check_positive
from hf_batchsched.launch import check_distributed_launch
from hf_batchsched.lr_cuts import PlateauTracker
from hf_batchsched.recipe import parse_config
from hf_batchsched.trainer import BatchRampTrainer


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "1", True])
def test_check_positive_refuses_non_finite_and_non_numbers(value):
    with pytest.raises(ConfigError, match="^threshold must be"):
        check_positive("threshold", value, allow_zero=True)
    with pytest.raises(ConfigError, match="^sigma must be"):
        check_positive("sigma", value)


def test_check_positive_allow_inf_only_when_asked():
    check_positive("total_rows", math.inf, allow_inf=True)
    check_positive("patience", 0, allow_zero=True)
    with pytest.raises(ConfigError, match="must be > 0, got 0"):
        check_positive("every_n_steps", 0)


def test_plateau_threshold_nan_is_refused_at_construction():
    with pytest.raises(ConfigError, match="threshold must be a finite number >= 0, got nan"):
        PlateauTracker(threshold=math.nan)
    with pytest.raises(ConfigError, match="patience must be a finite number >= 0, got inf"):
        PlateauTracker(patience=math.inf)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"num_samples": 3}, r"num_samples must be an even number >= 2 \(antithetic pairs\), got 3"),
        ({"num_samples": 0}, "num_samples must be an even number >= 2"),
        ({"sigma": math.nan}, "sigma must be a finite number > 0, got nan"),
        ({"metrics": ["trace"], "num_probes": 1}, "num_probes must be an integer >= 2"),
        ({"metrics": ["lambda_max"], "max_steps": 0}, "max_steps must be > 0"),
        ({"metrics": ["keskar"], "eps": -1.0}, "eps must be > 0"),
    ],
)
def test_sharpness_option_values_are_checked_at_construction(options, message):
    """Refused before the callback looks at the trainer (the first probe would have failed hours in)."""
    with pytest.raises(ConfigError, match=message):
        SharpnessProbeCallback(trainer=None, **options)
    with pytest.raises(ConfigError, match=f"config key 'sharpness': {message}"):
        parse_config({"sharpness": options})


def test_sharpness_typo_lists_every_accepted_key():
    with pytest.raises(ConfigError) as error:
        parse_config({"sharpness": {"every_n_step": 50}})
    accepted = str(error.value).split("accepted: ")[1].split(", ")
    assert {"every_n_steps", "budget", "num_probe_samples", "on_evaluate", "sigma", "num_samples"} <= set(accepted)
    assert "trainer" not in accepted
    with pytest.raises(ConfigError, match="accepted: .*every_n_steps"):
        SharpnessProbeCallback(trainer=None, every_n_step=50)


def test_seed_must_be_an_integer(tmp_path):
    with pytest.raises(ConfigError, match="^seed must be an integer, got 'abc'$"):
        RampBatchSampler(10, 2, seed="abc")
    with pytest.raises(ConfigError, match="^seed must be an integer, got 'abc'$"):
        make_trainer(tmp_path, seed="abc")


@pytest.mark.parametrize("value", [math.nan, math.inf, None, "8"])
def test_schedule_returning_a_non_number_names_the_schedule(value):
    def schedule(consumed):
        return 4 if consumed < 4 else value

    sampler = RampBatchSampler(16, schedule, seed=0)
    with pytest.raises(ConfigError, match=r"the batch schedule .*schedule.* returned .* at samples=4; it must return"):
        sampler.plan()


@pytest.mark.parametrize("key,default", [("max_micro_batch_size", "per_device_train_batch_size"),
                                         ("batch_size_multiple", "the world size")])  # fmt: skip
@pytest.mark.parametrize("value", [0, -2, 2.5])
def test_zero_is_not_unset_in_python_either(tmp_path, key, default, value):
    """As in the recipe (which refuses 0), 0 is refused; None is the way to ask for the default."""
    with pytest.raises(
        ConfigError, match=f"^{key} must be a positive integer, got {value}; leave it None .*{default}"
    ):
        make_trainer(tmp_path, args=make_args(tmp_path / "out"), **{key: value})
    with pytest.raises(ConfigError, match="'max_micro_batch_size' must be > 0, got 0"):
        parse_config({"max_micro_batch_size": 0})
    assert not (tmp_path / "out").exists()


def test_not_distributed_launch_is_refused_before_the_output_dir(tmp_path, monkeypatch):
    """One process of a 2-process launch whose TrainingArguments are not distributed (no --use_cpu on CPU)."""
    args = make_args(tmp_path / "run")
    assert args.world_size == 1  # set up (and cached) before the launch's environment is faked below
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 .* not distributed.*--use_cpu true --ddp_backend gloo"):
        make_trainer(tmp_path, args=args, cls=BatchRampTrainer)
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_distributed_launch(args)  # a single process is fine
