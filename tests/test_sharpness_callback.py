"""SharpnessProbeCallback in a real Trainer.train: TensorBoard, checkpoints/resume, budget, evaluation, DDP."""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch
from torch import nn

from hf_batchsched.callbacks.sharpness import SharpnessProbeCallback
from hf_batchsched.errors import ConfigError


def _lora_model():
    from peft import LoraConfig, get_peft_model

    from hf_batchsched.assets import tiny_llama

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return get_peft_model(tiny_llama(seed=0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def _trainer(tmp_path, model=None, dataset="default", **args):
    from helpers import tiny_training_args
    from transformers import Trainer

    from hf_batchsched.assets import synthetic_lm_dataset

    ds = synthetic_lm_dataset(num_samples=32, seq_len=12) if dataset == "default" else dataset
    return Trainer(
        model=model if model is not None else _lora_model(),
        args=tiny_training_args(tmp_path, **{"max_steps": 4, **args}),
        train_dataset=ds,
        eval_dataset=ds,
    )


def _probe_logs(trainer, name="sharpness/avg"):
    return [(entry["step"], entry[name]) for entry in trainer.state.log_history if name in entry]


def test_values_reach_tensorboard_and_checkpoint_state(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = _trainer(
        tmp_path, report_to="tensorboard", save_strategy="steps", save_steps=4, lr_scheduler_type="constant"
    )
    callback = SharpnessProbeCallback(
        trainer,
        metrics=("avg", "lambda_max"),
        every_n_steps=2,
        num_probe_samples=8,
        probe_batch_size=4,
        max_steps=3,
        budget=None,
    )
    trainer.add_callback(callback)
    trainer.train()

    logged = _probe_logs(trainer)
    assert [step for step, _ in logged] == [2, 4]
    eos = _probe_logs(trainer, "sharpness/eos_ratio")  # AdamW statistics exist after the first step
    assert [step for step, _ in eos] == [2, 4] and all(value > 0 for _, value in eos)
    assert not _probe_logs(trainer, "sharpness/lambda_max_hvps")  # counters are not logged

    event_files = list(pathlib.Path(tmp_path).rglob("events.out.tfevents.*"))
    assert event_files
    scalars = {}
    for path in event_files:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    # the Trainer's TensorBoard callback prefixes training logs with "train/"
    assert sorted(step for step, _ in scalars["train/sharpness/avg"]) == [2, 4]
    for (step, value), (tb_step, tb_value) in zip(logged, sorted(scalars["train/sharpness/avg"])):
        assert step == tb_step and tb_value == pytest.approx(value, rel=1e-6, abs=1e-12)  # float32 in the event
    assert "train/sharpness/lambda_max" in scalars and "train/sharpness/eos_ratio" in scalars

    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    stored = state["stateful_callbacks"][SharpnessProbeCallback.STATE_KEY]
    assert stored["num_probes"] == 2 and stored["last_probe_step"] == 4
    assert stored["probe_indices"] == callback.probe_indices and len(stored["probe_indices"]) == 8

    # resume: the callback picks its state (probe set, counters) back up from the checkpoint
    resumed_trainer = _trainer(tmp_path, max_steps=6, save_strategy="no")
    resumed = SharpnessProbeCallback(resumed_trainer, every_n_steps=2, num_probe_samples=8, seed=123, budget=None)
    resumed_trainer.add_callback(resumed)
    resumed_trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert resumed.num_probes == 3 and resumed.seed == 0 and resumed.probe_indices == callback.probe_indices
    assert [step for step, _ in _probe_logs(resumed_trainer)] == [2, 4, 6]  # log_history comes back too


def test_budget_skips_probes_and_on_evaluate_probes(tmp_path):
    trainer = _trainer(tmp_path, max_steps=3)
    callback = SharpnessProbeCallback(trainer, every_n_steps=1, budget=1e-9, num_probe_samples=4, num_samples=2)
    trainer.add_callback(callback)
    trainer.train()
    # the first probe has no measured cost and runs; after it the share is far above 1e-9
    assert callback.num_probes == 1 and callback.num_skipped == 2
    assert [step for step, _ in _probe_logs(trainer)] == [1]

    trainer = _trainer(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=8)
    callback = SharpnessProbeCallback(trainer, every_n_steps=None, on_evaluate=True, num_probe_samples=4, budget=None)
    trainer.add_callback(callback)
    trainer.train()
    assert [step for step, _ in _probe_logs(trainer)] == [2, 4]


def test_default_budget_caps_probing_at_three_percent(tmp_path):
    """By default probing may take at most 3% of training time: a probe every step of a tiny run (where one probe
    costs several training steps) runs once, then is skipped. The margin is large: the share after one probe is
    tens of percent, not close to 3%."""
    trainer = _trainer(tmp_path, max_steps=4)
    callback = SharpnessProbeCallback(trainer, every_n_steps=1, num_probe_samples=4)
    trainer.add_callback(callback)
    trainer.train()
    assert callback.budget == 0.03
    assert callback.num_probes == 1 and callback.num_skipped == 3


def test_state_dict_round_trip(tmp_path):
    trainer = _trainer(tmp_path)
    callback = SharpnessProbeCallback(trainer, num_probe_samples=5, seed=3)
    batches = callback.probe_batches()
    assert sum(len(b["input_ids"]) for b in batches) == 5
    other = SharpnessProbeCallback(trainer, num_probe_samples=5, seed=4)
    other.load_state_dict(callback.state_dict())
    assert other.probe_indices == callback.probe_indices and other.seed == 3


def test_bad_input(tmp_path):
    trainer = _trainer(tmp_path)
    with pytest.raises(ConfigError, match="valid choices: avg, keskar, lambda_max, trace"):
        SharpnessProbeCallback(trainer, metrics=("flatness",))
    with pytest.raises(ConfigError, match="not used by metric"):
        SharpnessProbeCallback(trainer, metrics=("avg",), max_steps=5)
    with pytest.raises(ConfigError, match="every_n_steps"):
        SharpnessProbeCallback(trainer, every_n_steps=0)
    with pytest.raises(ConfigError, match="never run"):
        SharpnessProbeCallback(trainer, every_n_steps=None, on_evaluate=False)
    with pytest.raises(ConfigError, match="budget"):
        SharpnessProbeCallback(trainer, budget=1.5)
    with pytest.raises(ConfigError, match="probe_batch_size"):
        SharpnessProbeCallback(trainer, probe_batch_size=0)
    frozen = _trainer(tmp_path, model=_lora_model().requires_grad_(False))
    with pytest.raises(ConfigError, match="no trainable parameters"):
        SharpnessProbeCallback(frozen)
    no_data = _trainer(tmp_path, dataset=None)
    with pytest.raises(ConfigError, match="no probe data"):
        SharpnessProbeCallback(no_data)


# ----------------------------------------------------------------------------------------------------------
# DDP: two gloo processes, each with half the probe batches, agree with one process holding all of them
# ----------------------------------------------------------------------------------------------------------


def _mlp_and_batches():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    generator = torch.Generator().manual_seed(1)
    batches = [
        {"x": torch.randn(n, 5, generator=generator, dtype=torch.float64), "labels": torch.arange(n) % 2}
        for n in (6, 10, 4, 12)
    ]
    return model, batches


def _ce(model, batch):
    return nn.functional.cross_entropy(model(batch["x"]), batch["labels"])


_DDP_METRICS = ("avg", "keskar", "lambda_max", "trace")
_DDP_OPTIONS = {"num_samples": 4, "maxiter": 3, "subspace_dim": 4, "max_steps": 6, "num_probes": 3, "loss_fn": _ce}


def _ddp_worker(rank, world, init_file, out_dir):
    from hf_batchsched.probes.sharpness import estimate_sharpness

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model, batches = _mlp_and_batches()
    result = estimate_sharpness(model, batches[rank::world], _DDP_METRICS, **_DDP_OPTIONS)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_ddp_ranks_agree_with_single_process(tmp_path):
    import torch.multiprocessing as mp

    from hf_batchsched.probes.sharpness import estimate_sharpness

    # fork: the children inherit the imported modules (spawn would re-import transformers, ~20 s of CPU)
    mp.start_processes(
        _ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    model, batches = _mlp_and_batches()
    single = estimate_sharpness(model, batches, _DDP_METRICS, **_DDP_OPTIONS)
    assert rank0 == rank1  # all-reduced sums: both ranks take identical decisions and report identical numbers
    for key, value in single.items():
        # same sums in a different order: float64 rounding only
        assert rank0[key] == pytest.approx(value, rel=1e-8, abs=1e-12), key
