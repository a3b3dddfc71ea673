"""The shared task of the language-model reproductions (``reproduce_seesaw``, ``reproduce_critical_batch``).

Two tasks, both on the demo's offline text and tokenizer (``hf_batchsched.demo``), sequences of 64 tokens:

- ``pretrain``: ``demo_model`` (a 0.46 M-parameter Llama) trained from scratch on the standard-library code
  (``demo_corpus(max_train_chars=None)``, about 1.2 M tokens), eval on the held-out modules;
- ``lora``: the demo's LoRA fine-tune (r=16 on every linear layer and the head) of the demo base model on the
  demo's training code, eval on the held-out modules.

Every run (``train_run``) is a ``BatchRampTrainer`` on the samples clock with AdamW (weight decay
``weight_decay``), the same data budget ``total_samples`` and a linear warmup then cosine decay to 0
(``cosine_policy``). ``LMConfig`` holds the sizes of both experiments.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass

import torch

from ..critical_batch import eval_loss, windows
from ..errors import ConfigError, check_choice
from .common import quiet_cpu_args

__all__ = [
    "LMConfig",
    "Snapshots",
    "TASKS",
    "check_config",
    "constant_schedules",
    "cosine_policy",
    "make_trainer",
    "output_name",
    "task_data",
    "train_run",
]

TASKS = ("pretrain", "lora")


@dataclass(frozen=True)
class LMConfig:
    """Sizes of the language-model reproductions (the defaults are the full run; ``quick()`` the CI one)."""

    total_samples: int = 8192
    base_batch_size: int = 16
    max_batch_size: int = 128
    max_micro_batch_size: int = 32
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_samples: int = 256
    cbs_fractions: tuple[float, ...] = (0.0, 0.25, 0.5)
    cbs_batch_sizes: tuple[int, ...] = (16, 32, 64, 128)
    cbs_budget_samples: int = 2048
    cbs_tolerance: float = 0.01
    range_test_steps: int = 30
    seq_length: int = 64
    fast_base: bool = False
    tasks: tuple[str, ...] = TASKS

    @classmethod
    def quick(cls) -> LMConfig:
        """Seconds-long settings for tests and CI (256 sequences per run, two seeds, two LRs)."""
        return cls(
            total_samples=256,
            base_batch_size=8,
            max_batch_size=32,
            max_micro_batch_size=32,
            lrs=(3e-3, 1e-2),
            seeds=(0, 1),
            eval_samples=32,
            cbs_fractions=(0.0, 0.5),
            cbs_batch_sizes=(8, 16, 32),
            cbs_budget_samples=64,
            range_test_steps=8,
            fast_base=True,
        )

    @property
    def warmup_samples(self) -> int:
        """Samples of the linear warmup, ``warmup_fraction * total_samples`` (at least 1)."""
        return max(1, round(self.warmup_fraction * self.total_samples))


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.rows[index], "labels": self.rows[index]}


def _ids(tokenizer, texts) -> list[int]:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    return ids


def task_data(task: str, config: LMConfig) -> dict:
    """Token rows and a model factory for ``task``."""
    from .. import assets

    base_path, _ = assets.demo_base_model(fast=config.fast_base)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    if task == "pretrain":
        train, held_out = assets.demo_corpus(max_train_chars=None)
        if config.total_samples <= 256:  # quick: a prefix of the text is enough
            train = assets.demo_corpus()[0]

        def make_model(seed: int):
            return assets.demo_model(len(tokenizer), seed=seed)

    else:
        train, held_out = assets.demo_corpus()

        def make_model(seed: int):
            from peft import LoraConfig, get_peft_model
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(base_path))
            cfg = assets.DEMO_CONFIG
            lora = LoraConfig(
                r=cfg["lora_r"],
                lora_alpha=cfg["lora_alpha"],
                lora_dropout=0.0,
                target_modules=list(cfg["lora_target_modules"]),
                task_type="CAUSAL_LM",
            )
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                return get_peft_model(model, lora)

    train_rows = windows(_ids(tokenizer, train), config.seq_length)
    eval_rows = windows(_ids(tokenizer, held_out), config.seq_length)[: config.eval_samples]
    if len(train_rows) < config.max_batch_size:
        raise ConfigError(
            f"{task}: {len(train_rows)} training rows, fewer than max_batch_size {config.max_batch_size}"
        )
    return {"train_rows": train_rows, "eval_rows": eval_rows, "make_model": make_model}


def cosine_policy(config: LMConfig):
    """The runs' LR shape on the samples clock: linear warmup over ``warmup_samples``, then cosine decay to 0."""
    from ..schedules.lr_config import lr_policy_from_config

    warmup = config.warmup_samples
    return lr_policy_from_config(
        {
            "name": "warmup",
            "unit": "samples",
            "warmup": warmup,
            "policy": {"name": "cosine", "total": config.total_samples - warmup},
        }
    )


def constant_schedules(config: LMConfig) -> dict:
    """The reference run's schedules: constant batch ``B0`` and the cosine policy (the ``constant`` arm)."""
    return {"batch_schedule": config.base_batch_size, "lr_policy": cosine_policy(config)}


class Snapshots:
    """A callback that keeps ``(model state, optimizer state)`` when the consumed samples first reach each fraction."""

    def __init__(self, fractions, total):
        from transformers import TrainerCallback

        marks = sorted(round(f * total) for f in fractions if f > 0)
        store: dict = {}
        self.store = store

        class _Cb(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
                consumed = trainer_ref["trainer"].clock.consumed_samples
                for mark in marks:
                    if mark not in store and consumed >= mark:
                        store[mark] = (
                            copy.deepcopy(model.state_dict()),
                            copy.deepcopy(optimizer.state_dict()),
                            consumed,
                        )

        trainer_ref: dict = {}
        self.trainer_ref = trainer_ref
        self.callback = _Cb()


def make_trainer(model, data, config, *, learning_rate, seed, batch_schedule, lr_policy, couple=None, callbacks=()):
    """A quiet CPU ``BatchRampTrainer`` on ``data["train_rows"]`` and its temporary output folder (remove it after)."""
    from transformers import PrinterCallback

    from ..schedules.seesaw_pair import SeesawBatch
    from ..trainer import BatchRampTrainer

    output_dir = tempfile.mkdtemp(prefix="hf-batchsched-lm-")
    args = quiet_cpu_args(
        output_dir,
        own_lr=lr_policy is not None or isinstance(batch_schedule, SeesawBatch),
        num_train_epochs=config.total_samples / len(data["train_rows"]),
        per_device_train_batch_size=config.max_micro_batch_size,
        learning_rate=learning_rate,
        weight_decay=config.weight_decay,
        max_grad_norm=1.0,
        seed=seed,
    )
    trainer = BatchRampTrainer(
        model=model,
        args=args,
        train_dataset=_Rows(data["train_rows"]),
        callbacks=list(callbacks),
        batch_schedule=batch_schedule,
        max_micro_batch_size=config.max_micro_batch_size,
        lr_policy=lr_policy,
        couple=couple,
        seed=seed,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer, output_dir


def train_run(data, config, *, learning_rate, seed, schedules, snapshots: Snapshots | None = None) -> dict:
    """Train a fresh ``data["make_model"](seed)`` under ``schedules``; eval loss, steps, samples, tokens, batch sizes,
    seconds and the trained ``model``."""
    import shutil

    model = data["make_model"](seed)
    callbacks = [snapshots.callback] if snapshots is not None else []
    trainer, output_dir = make_trainer(
        model, data, config, learning_rate=learning_rate, seed=seed, callbacks=callbacks, **schedules
    )
    if snapshots is not None:
        snapshots.trainer_ref["trainer"] = trainer
    start = time.perf_counter()
    try:
        trainer.train()
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    plan = list(trainer.ramp_plan)
    return {
        "eval_loss": eval_loss(model, data["eval_rows"]),
        "optimizer_steps": trainer.clock.optimizer_steps,
        "samples": trainer.clock.consumed_samples,
        "tokens": trainer.clock.consumed_samples * config.seq_length,
        "batch_sizes": sorted(set(plan)),
        "seconds": round(time.perf_counter() - start, 2),
        "model": model,
    }


# --------------------------------------------------------------------------------------------------
# The experiments
# --------------------------------------------------------------------------------------------------


def output_name(stem: str, config: LMConfig) -> str:
    """``stem`` for both tasks, ``stem-<task>`` for one."""
    return stem if tuple(config.tasks) == TASKS else "-".join([stem, *config.tasks])


def check_config(config: LMConfig) -> None:
    """Refuse an unknown task, or critical-batch branches that leave out ``base_batch_size``."""
    for task in config.tasks:
        check_choice("task", task, TASKS)
    if config.base_batch_size not in config.cbs_batch_sizes:
        raise ConfigError("cbs_batch_sizes must include base_batch_size (the branch all others are compared with)")
