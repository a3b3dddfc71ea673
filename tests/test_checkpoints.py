"""Checkpoints that are complete or absent, bit-exact resume with dropout, and resumes that must match the run.

A crash is simulated in-process by raising ``SimulatedKill`` (a ``BaseException``, which no Trainer code catches) at
a precise point of a save; the recipe test below kills a real subprocess with SIGKILL. Every comparison between an
uninterrupted and a resumed run is exact: the same computation repeated on the same build, CPU, one thread.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from helpers import tiny_training_args
from transformers import PrinterCallback

from hf_batchsched.assets import synthetic_lm_dataset, tiny_llama
from hf_batchsched.checkpoint import RAMP_STATE_KEY, find_resume_checkpoint
from hf_batchsched.errors import ConfigError
from hf_batchsched.trainer import BatchRampTrainer

torch.set_num_threads(1)

RAMP = "0:4 8:8 24:16"  # 4 -> 8 -> 16 on the samples clock; 2 passes over 40 samples: 4 4 8 8 16 16 16 8
STEPS = 8


class SimulatedKill(BaseException):
    """Stands for SIGKILL: nothing after the raise point runs, and no ``except Exception`` swallows it."""


def make_trainer(output_dir, *, schedule=RAMP, dataset_size=40, save_total_limit=None, **overrides):
    args = tiny_training_args(
        output_dir,
        per_device_train_batch_size=4,
        num_train_epochs=overrides.pop("num_train_epochs", 2),
        save_strategy="steps",
        save_steps=2,
        save_total_limit=save_total_limit,
        dataloader_pin_memory=False,
        **overrides.pop("args", {}),
    )
    trainer = BatchRampTrainer(
        model=tiny_llama(seed=0, attention_dropout=0.3),  # dropout on: resume must restore the RNG exactly
        args=args,
        train_dataset=synthetic_lm_dataset(dataset_size, seq_len=16),
        batch_schedule=schedule,
        **overrides,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def losses(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def weights(trainer) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in trainer.model.named_parameters()}


def assert_same_run(resumed, reference) -> None:
    assert losses(resumed) == reference["losses"]  # exact: same computation, same build
    current = weights(resumed)
    assert current.keys() == reference["weights"].keys()
    different = [name for name, value in current.items() if not torch.equal(value, reference["weights"][name])]
    assert not different, f"parameters differ from the uninterrupted run: {different}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    trainer = make_trainer(tmp_path_factory.mktemp("reference"))
    trainer.train()
    assert trainer.ramp_plan == [4, 4, 8, 8, 16, 16, 16, 8]
    return {"losses": losses(trainer), "weights": weights(trainer), "dir": trainer.args.output_dir}


# ---- bit-exact resume with dropout ---------------------------------------------------------------------------------
def test_resume_mid_ramp_with_dropout_is_bit_exact(reference, tmp_path):
    """Resume from checkpoint-4 (batch 8, the ramp's middle): the dropout masks of steps 5..8 are the uninterrupted
    run's. Before the fix the DataLoader iterator drew its base seed from the global generator after the Trainer had
    restored the checkpoint's RNG state, which shifted every later mask (losses off by ~1e-3)."""
    resumed = make_trainer(tmp_path)
    resumed.train(resume_from_checkpoint=os.path.join(reference["dir"], "checkpoint-4"))
    assert_same_run(resumed, reference)
    assert resumed.ramp_plan == [4, 4, 8, 8, 16, 16, 16, 8]


# ---- fault injection: a crash at each phase of a save --------------------------------------------------------------
PHASES = ["after_model", "after_optimizer", "before_state", "state_not_renamed", "after_state", "during_rotation"]


def arm_crash(monkeypatch, phase: str, step: int) -> tuple[dict, type]:
    """Raise ``SimulatedKill`` at ``phase`` of the save of checkpoint-``step`` (once)."""
    import transformers.trainer

    import hf_batchsched.checkpoint
    import hf_batchsched.trainer

    armed = {"on": False, "step": step, "fired": False}

    def fire():
        armed["on"], armed["fired"] = False, True
        raise SimulatedKill(phase)

    def wrap(owner, name, *, before=True, when=lambda *a, **k: True):
        original = getattr(owner, name)

        def patched(*args, **kwargs):
            if armed["on"] and when(*args, **kwargs):
                if not before:
                    original(*args, **kwargs)
                fire()
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, patched)

    if phase == "after_model":  # model files written; optimizer, scheduler, RNG, trainer state not
        wrap(BatchRampTrainer, "_save_optimizer_and_scheduler")
    elif phase == "after_optimizer":  # model, optimizer and scheduler written; RNG and trainer state not
        wrap(BatchRampTrainer, "_save_rng_state")
    elif phase == "before_state":  # every file but trainer_state.json (which holds our state)
        wrap(hf_batchsched.checkpoint, "write_text_atomically")
    elif phase == "state_not_renamed":  # trainer_state.json.tmp fully written, the rename not done
        wrap(hf_batchsched.checkpoint.os, "replace", when=lambda source, target: target.endswith("trainer_state.json"))
    elif phase == "after_state":  # the checkpoint is complete; old ones are not rotated yet
        wrap(transformers.trainer, "rotate_checkpoints")
    elif phase == "during_rotation":  # an old checkpoint half deleted: its optimizer.pt is gone, the rest is not
        original_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if armed["on"]:
                os.remove(os.path.join(path, "optimizer.pt"))
                fire()
            return original_rmtree(path, *args, **kwargs)

        monkeypatch.setattr(shutil, "rmtree", rmtree)

    class Arm:
        def on_step_end(self, args, state, control, **kwargs):
            armed["on"] = state.global_step == armed["step"]

    return armed, Arm


def crashed_run(tmp_path, monkeypatch, phase: str, limit: int, step: int = 6) -> str:
    from transformers import TrainerCallback

    armed, Arm = arm_crash(monkeypatch, phase, step)
    trainer = make_trainer(tmp_path, save_total_limit=limit)
    trainer.add_callback(type("ArmCrash", (Arm, TrainerCallback), {})())
    with pytest.raises(SimulatedKill):
        trainer.train()
    assert armed["fired"]
    monkeypatch.undo()
    return trainer.args.output_dir


@pytest.mark.parametrize("limit", [1, 2])
@pytest.mark.parametrize("phase", PHASES)
def test_crash_during_save_then_resume_true_equals_uninterrupted_run(reference, tmp_path, monkeypatch, caplog, phase,
                                                                     limit):  # fmt: skip
    output_dir = crashed_run(tmp_path, monkeypatch, phase, limit)
    kept = sorted(name for name in os.listdir(output_dir) if name.startswith("checkpoint-"))
    complete_6 = phase in ("after_state", "during_rotation")
    # The save of checkpoint-6 deletes nothing before checkpoint-6 is complete (save_total_limit 1 keeps 4 too).
    assert "checkpoint-4" in kept and "checkpoint-6" in kept, kept
    if not complete_6:
        with pytest.raises(ConfigError, match=r"checkpoint-6 is incomplete: .*checkpoint-4: resume from it"):
            find_resume_checkpoint(os.path.join(output_dir, "checkpoint-6"), output_dir)
    if phase == "during_rotation":
        half_deleted = os.path.join(output_dir, kept[0])
        with pytest.raises(ConfigError, match=r"is incomplete: files listed in trainer_state.json are missing: opt"):
            find_resume_checkpoint(half_deleted, output_dir)

    resumed = make_trainer(output_dir, save_total_limit=limit)
    with caplog.at_level(logging.WARNING, logger="hf_batchsched.checkpoint"):
        resumed.train(resume_from_checkpoint=True)
    passed_over = [record.getMessage() for record in caplog.records if "passed over" in record.getMessage()]
    if complete_6:
        assert not passed_over
    else:  # one line naming the incomplete checkpoint and why
        assert len(passed_over) == 1 and "checkpoint-4" in passed_over[0] and "checkpoint-6 (" in passed_over[0]
    assert_same_run(resumed, reference)
    # The resumed run's own checkpoints are complete, and rotation kept `limit` of them.
    assert find_resume_checkpoint(True, output_dir).path.endswith("checkpoint-8")
    assert len([name for name in os.listdir(output_dir) if name.startswith("checkpoint-")]) == limit


def test_crash_during_the_first_save_leaves_no_checkpoint_and_says_so(tmp_path, monkeypatch):
    output_dir = crashed_run(tmp_path, monkeypatch, "after_optimizer", limit=1, step=2)
    with pytest.raises(ConfigError, match=r"no complete checkpoint in .*only incomplete ones: checkpoint-2 \(trainer"):
        make_trainer(output_dir).train(resume_from_checkpoint=True)


def test_missing_and_absent_checkpoints(tmp_path):
    trainer = make_trainer(tmp_path / "out")
    with pytest.raises(ConfigError, match=r"'/no/such/checkpoint-3' does not exist"):
        trainer.train(resume_from_checkpoint="/no/such/checkpoint-3")
    with pytest.raises(ConfigError, match="there is no checkpoint in output_dir"):
        trainer.train(resume_from_checkpoint=True)


# ---- damaged state -------------------------------------------------------------------------------------------------
def _edit_ramp_state(edit):
    def apply(state: dict) -> dict:
        edit(state["stateful_callbacks"][RAMP_STATE_KEY])
        return state

    return apply


DAMAGE = {
    "truncated": (lambda text: text[: len(text) // 2], r"is incomplete: trainer_state.json is cut off or not JSON"),
    "empty": (lambda text: "", r"is incomplete: trainer_state.json is empty"),
    "a list": (lambda text: "[1, 2]", r"trainer_state.json: expected a JSON object, found a list"),
    "state is a list": (
        lambda state: {**state, "stateful_callbacks": {RAMP_STATE_KEY: [4, 24]}},
        r"trainer_state.json: the hf_batchsched state .* is damaged: expected a JSON object, found list",
    ),
    "missing key": (
        _edit_ramp_state(lambda s: s["clock"].pop("consumed_samples")),
        r"is damaged: 'clock.consumed_samples' is missing; resume from another checkpoint",
    ),
    "string count": (
        _edit_ramp_state(lambda s: s["clock"].update(consumed_samples="24")),
        r"is damaged: 'clock.consumed_samples' is '24', expected a count",
    ),
    "clock not at global_step": (  # e.g. a state left from another run
        lambda state: {**state, "global_step": 3},
        r"the batch-size clock is at optimizer step 4 but the Trainer's global_step is 3",
    ),
    "foreign": (
        lambda state: {**state, "stateful_callbacks": {}},
        r"was not saved by a BatchRampTrainer",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_state_is_one_config_error_naming_the_file(reference, tmp_path, case):
    damage, message = DAMAGE[case]
    folder = tmp_path / "checkpoint-4"
    shutil.copytree(os.path.join(reference["dir"], "checkpoint-4"), folder)
    path = folder / "trainer_state.json"
    text = path.read_text()
    if case in ("truncated", "empty", "a list"):
        path.write_text(damage(text))
    else:
        path.write_text(json.dumps(damage(json.loads(text))))
    with pytest.raises(ConfigError, match=message) as error:
        make_trainer(tmp_path / "out").train(resume_from_checkpoint=str(folder))
    assert "checkpoint-4" in str(error.value) and "\n" not in str(error.value)


# ---- resumes that must match the run -------------------------------------------------------------------------------
def test_resume_with_another_schedule_is_refused_unless_allowed(reference, tmp_path, caplog):
    checkpoint = os.path.join(reference["dir"], "checkpoint-4")
    with pytest.raises(ConfigError, match=r"does not match this run's batch plan \(batch_schedule: .*0:4 8:8 24:16"):
        make_trainer(tmp_path / "a", schedule="0:4 8:8 24:32").train(resume_from_checkpoint=checkpoint)
    with pytest.raises(ConfigError, match=r"plan \(max_micro_batch_size: 4 -> 2\)"):
        make_trainer(tmp_path / "b", max_micro_batch_size=2).train(resume_from_checkpoint=checkpoint)
    with pytest.raises(ConfigError, match=r"plan \(batch_size_multiple: 1 -> 4\)"):
        make_trainer(tmp_path / "b2", batch_size_multiple=4).train(resume_from_checkpoint=checkpoint)
    with pytest.raises(ConfigError, match=r'plan \(train_sampling_strategy: "random" -> "sequential"\)'):
        make_trainer(tmp_path / "b3", args={"train_sampling_strategy": "sequential"}).train(
            resume_from_checkpoint=checkpoint
        )
    with pytest.raises(ConfigError, match=r"num_train_epochs: 2.0 -> 3.0"):
        make_trainer(tmp_path / "c", num_train_epochs=3).train(resume_from_checkpoint=checkpoint)

    changed = make_trainer(tmp_path / "d", schedule="0:4 8:8 24:32", allow_schedule_change_on_resume=True)
    with caplog.at_level(logging.WARNING, logger="hf_batchsched.trainer"):
        changed.train(resume_from_checkpoint=checkpoint)
    assert any("changed batch plan" in record.getMessage() for record in caplog.records)
    # The 4 steps taken (4 4 8 8 = 24 samples) stand; the rest of the 80 samples follow the new schedule, with no
    # sample trained twice and none cut: 32, then the 24 left.
    assert changed.ramp_plan == [4, 4, 8, 8, 32, 24]
    assert changed.clock.consumed_samples == 80 and changed.state.global_step == 6


def test_resume_checks_the_batch_sizes_already_taken(reference, tmp_path):
    """A callable schedule has no config: it is identified by name, and its past batch sizes are compared."""

    class Ramp:
        def __init__(self, first_growth):
            self.first_growth = first_growth

        def __call__(self, consumed):
            return 4 if consumed < self.first_growth else 8

    make_trainer(tmp_path / "full", schedule=Ramp(8), num_train_epochs=1).train()  # 4 4 8 8 8 8
    checkpoint = str(tmp_path / "full" / "checkpoint-4")
    other = make_trainer(tmp_path / "other", schedule=Ramp(16), num_train_epochs=1)
    with pytest.raises(ConfigError, match=r"step 3, already taken, had batch size 8; this run plans 4"):
        other.train(resume_from_checkpoint=checkpoint)


def test_dataset_and_seed_must_match_even_when_changes_are_allowed(reference, tmp_path):
    checkpoint = os.path.join(reference["dir"], "checkpoint-4")
    other = make_trainer(tmp_path, dataset_size=48, allow_schedule_change_on_resume=True)
    with pytest.raises(ConfigError, match=r"a dataset of 40 samples and data seed 0, this run has 48 and 0"):
        other.train(resume_from_checkpoint=checkpoint)


def test_resume_past_the_end_says_so(reference, tmp_path):
    final = os.path.join(reference["dir"], f"checkpoint-{STEPS}")
    with pytest.raises(ConfigError, match=r"checkpoint-8 is at the end of training: its 8 steps and 80 samples"):
        make_trainer(tmp_path / "a").train(resume_from_checkpoint=final)
    more = make_trainer(tmp_path / "b", num_train_epochs=3, allow_schedule_change_on_resume=True)
    more.train(resume_from_checkpoint=final)  # a third pass, on purpose: 40 more samples at 16 16 8
    assert more.state.global_step == STEPS + 3 and more.clock.consumed_samples == 120


# ---- DDP -----------------------------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_resume_true_under_ddp_is_bit_exact_on_every_rank(tmp_path):
    """torchrun, 2 CPU processes: every rank restores its own RNG state (rng_state_<rank>.pth, listed in the
    checkpoint), resume=True passes over the incomplete checkpoint-6 on rank 0 only, and the resumed run equals the
    uninterrupted one on both ranks."""
    from conftest import run_torchrun

    ranks = run_torchrun(os.path.join(os.path.dirname(__file__), "ddp_resume_worker.py"), tmp_path)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["plan"] == [4, 4, 8, 8, 16, 16, 16, 8]
    for record in ranks:
        assert record["resumed"] == record["full"] and record["params_equal"]
    assert (
        len(ranks[0]["passed_over"]) == 1
        and "checkpoint-6 (trainer_state.json is missing" in ranks[0]["passed_over"][0]
    )
    assert ranks[1]["passed_over"] == []
