"""Reproductions of the seed papers on a CPU in minutes: ``smith``, ``keskar``, ``bjorck`` and ``overheads``.

Each experiment is a function that trains small models (through ``BatchRampTrainer`` where a training run is
involved), writes ``<output_dir>/<name>.json`` and its figures, and returns the result dict. The command
``hf-batchsched reproduce {smith,keskar,bjorck,overheads,all} --output-dir DIR [--quick]`` runs them.

The task is a **teacher-student classification** problem (``make_teacher_task``): Gaussian inputs, a random
two-layer teacher whose softmax *samples* the labels, so the Bayes loss is above zero and SGD noise matters at
the end of training, as it does on CIFAR-10. The student is a ReLU MLP (``MLPClassifier``) whose forward takes
``input_ids`` (the float features) and ``labels`` and returns a ``SequenceClassifierOutput`` like a Hugging Face
model.

| experiment | paper | what is compared |
|---|---|---|
| ``reproduce_smith`` | Smith et al., ICLR 2018 | step LR decay vs increasing batch vs hybrid, same epochs |
| ``reproduce_keskar`` | Keskar et al., ICLR 2017 | small vs large batch (10% of N): sharpness, gap, parametric plot |
| ``reproduce_bjorck`` | Bjorck et al., NeurIPS 2018 | runs ``benchmarks/bench_bjorck.py`` and summarises |
| ``gather_overheads`` | -- | one table of the overheads measured by ``benchmarks/bench_*.py`` |
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import ConfigError, check_choice, check_positive

__all__ = [
    "EXPERIMENTS",
    "KESKAR_METRICS",
    "KeskarConfig",
    "MLPClassifier",
    "SMITH_RUNS",
    "SmithConfig",
    "TeacherTask",
    "gather_overheads",
    "interpolate_state",
    "line_losses",
    "make_teacher_task",
    "mean_loss",
    "parametric_alphas",
    "reproduce_bjorck",
    "reproduce_keskar",
    "reproduce_smith",
    "smith_schedules",
    "summarise_bjorck",
    "train_classifier",
]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------------
# Task and model
# --------------------------------------------------------------------------------------------------


class _DictDataset(torch.utils.data.Dataset):
    """Map-style dataset of ``{"input_ids": features, "labels": class}`` rows (``default_data_collator`` stacks them).

    The float features go under ``input_ids`` because ``BatchRampTrainer.training_step`` counts tokens from
    ``attention_mask`` or ``input_ids`` and fails on a batch that has neither.
    """

    def __init__(self, x: torch.Tensor, labels: torch.Tensor):
        self.x, self.labels = x, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.x[index], "labels": self.labels[index]}


@dataclass(frozen=True)
class TeacherTask:
    """Train and eval tensors of a teacher-student classification problem (see ``make_teacher_task``).

    Attributes:
        train_x, train_y, eval_x, eval_y (`torch.Tensor`): features (float32) and labels (int64).
        bayes_eval_loss (`float`): the teacher's own cross-entropy on the eval set (the floor a student can reach).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    bayes_eval_loss: float

    @property
    def train_dataset(self) -> _DictDataset:
        return _DictDataset(self.train_x, self.train_y)

    def batches(self, split: str = "train", batch_size: int = 1024) -> list[dict]:
        """The split as a list of ``{"input_ids", "labels"}`` batches (fixed order; the probes' ``batches``)."""
        check_choice("split", split, ("train", "eval"))
        x, y = (self.train_x, self.train_y) if split == "train" else (self.eval_x, self.eval_y)
        return [
            {"input_ids": x[i : i + batch_size], "labels": y[i : i + batch_size]} for i in range(0, len(y), batch_size)
        ]


def make_teacher_task(
    num_train: int,
    num_eval: int,
    *,
    dim: int = 32,
    num_classes: int = 10,
    teacher_hidden: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
) -> TeacherTask:
    """Gaussian inputs labelled by sampling the softmax of a random two-layer tanh teacher.

    The teacher's logits are scaled to unit standard deviation and divided by ``temperature``; higher
    temperature means noisier labels. All randomness comes from a local generator seeded by ``seed``.

    >>> task = make_teacher_task(64, 32, seed=0)
    >>> task.train_x.shape, task.eval_y.shape, bool(0 < task.bayes_eval_loss < math.log(10))
    (torch.Size([64, 32]), torch.Size([32]), True)
    >>> torch.equal(make_teacher_task(64, 32, seed=0).train_y, task.train_y)
    True
    """
    check_positive("num_train", num_train)
    check_positive("num_eval", num_eval)
    check_positive("temperature", temperature)
    generator = torch.Generator().manual_seed(int(seed))
    w1 = torch.randn(dim, teacher_hidden, generator=generator) / math.sqrt(dim)
    w2 = torch.randn(teacher_hidden, num_classes, generator=generator) / math.sqrt(teacher_hidden)
    x = torch.randn(num_train + num_eval, dim, generator=generator)
    logits = torch.tanh(x @ w1 * 2.0) @ w2
    logits = logits / logits.std() / temperature
    labels = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
    bayes = nn.functional.cross_entropy(logits[num_train:], labels[num_train:]).item()
    return TeacherTask(x[:num_train], labels[:num_train], x[num_train:], labels[num_train:], bayes)


class MLPClassifier(nn.Module):
    """A ReLU MLP with a Hugging Face style forward: ``model(input_ids=x, labels=y)`` returns ``.loss``, ``.logits``.

    Args:
        dim (`int`): input features.
        num_classes (`int`): classes.
        hidden (`int`, *optional*, defaults to `128`): width of each hidden layer.
        depth (`int`, *optional*, defaults to `2`): number of hidden layers.
        seed (`int`, *optional*, defaults to `0`): initialisation seed (the global RNG is left untouched).
    """

    def __init__(self, dim: int, num_classes: int, hidden: int = 128, depth: int = 2, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers: list[nn.Module] = []
            width = dim
            for _ in range(depth):
                layers += [nn.Linear(width, hidden), nn.ReLU()]
                width = hidden
            layers.append(nn.Linear(width, num_classes))
            self.net = nn.Sequential(*layers)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.net(input_ids)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Sequence[dict]) -> tuple[float, float]:
    """Sample-weighted mean cross-entropy and accuracy of ``model`` over ``batches`` (eval mode, mode restored).

    The sum runs in float64 over the batches in order, so the same weights and batches give the same bits.
    """
    was_training = model.training
    model.eval()
    total = correct = count = 0.0
    try:
        for batch in batches:
            out = model(**batch)
            n = len(batch["labels"])
            total += float(out.loss.double()) * n
            correct += float((out.logits.argmax(-1) == batch["labels"]).sum())
            count += n
    finally:
        model.train(was_training)
    return total / count, correct / count


# --------------------------------------------------------------------------------------------------
# Training through BatchRampTrainer
# --------------------------------------------------------------------------------------------------


def _eval_callback(
    trainer_ref: dict, task: TeacherTask, every: float, history: list, stop_at_train_loss: float | None = None
):
    from transformers import TrainerCallback

    eval_batches = task.batches("eval")
    train_batches = task.batches("train") if stop_at_train_loss is not None else None
    num_samples = len(task.train_y)

    class _EvalEvery(TrainerCallback):
        """Records the eval loss whenever another ``every`` passes over the data have been consumed.

        With ``stop_at_train_loss`` it also measures the full training loss there and stops the run once it is at
        or below that value (Keskar et al. train "until the loss function ceased to improve").
        """

        next_mark = every

        def on_step_end(self, args, state, control, **kwargs):
            trainer = trainer_ref["trainer"]
            epochs = trainer.clock.consumed_samples / num_samples
            if epochs + 1e-9 >= self.next_mark:
                loss, accuracy = mean_loss(kwargs["model"], eval_batches)
                lr = trainer.optimizer.param_groups[0]["lr"]
                record = {
                    "epoch": round(epochs, 4),
                    "optimizer_steps": trainer.clock.optimizer_steps,
                    "batch_size": trainer.last_batch_size,
                    "lr": lr,
                    "eval_loss": loss,
                    "eval_accuracy": accuracy,
                }
                if train_batches is not None:
                    record["train_loss"] = mean_loss(kwargs["model"], train_batches)[0]
                    if record["train_loss"] <= stop_at_train_loss:
                        control.should_training_stop = True
                history.append(record)
                while self.next_mark <= epochs + 1e-9:
                    self.next_mark += every

    return _EvalEvery()


def quiet_cpu_args(output_dir: str, *, own_lr: bool, **settings):
    """``TrainingArguments`` of a reproduction run: CPU, no saving, logging, evaluation or progress bar. Without an
    LR schedule of its own (``own_lr``: an LR policy or Seesaw replaces the Trainer's scheduler) the LR is constant."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        **({} if own_lr else {"lr_scheduler_type": "constant"}),
        **settings,
    )


def train_classifier(
    model: nn.Module,
    task: TeacherTask,
    *,
    batch_schedule,
    epochs: float,
    learning_rate: float,
    lr_policy=None,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    max_micro_batch_size: int = 64,
    batch_size_multiple: int | None = None,
    eval_every: float | None = 1.0,
    stop_at_train_loss: float | None = None,
    seed: int = 0,
) -> dict:
    """Train ``model`` on ``task`` with ``BatchRampTrainer`` and return the run's record.

    Args:
        model (`nn.Module`): trained in place.
        task (`TeacherTask`): the data.
        batch_schedule (`int`, `BatchSchedule` or callable): global batch size as a function of consumed samples.
        epochs (`float`): passes over the training set.
        learning_rate (`float`): the optimizer's base LR (an ``lr_policy`` of kind ``"lr"`` sets it absolutely).
        lr_policy (`Policy`, *optional*): LR policy on the trainer's clock; default: constant ``learning_rate``.
        optimizer (`str`, *optional*, defaults to `"sgd"`): ``"sgd"`` (with ``momentum``) or ``"adam"``.
        momentum (`float`, *optional*, defaults to `0.9`): SGD momentum.
        max_micro_batch_size (`int`, *optional*, defaults to `64`): chunk size of one forward/backward.
        batch_size_multiple (`int`, *optional*): passed to the trainer (batch sizes are rounded to it).
        eval_every (`float`, *optional*, defaults to `1.0`): record the eval loss every this many epochs.
        stop_at_train_loss (`float`, *optional*): stop at the first ``eval_every`` mark where the full training loss is
            at or below this value (``epochs`` is then the maximum); needs ``eval_every``.
        seed (`int`, *optional*, defaults to `0`): data-order seed.

    Returns:
        `dict`: ``optimizer_steps``, ``samples``, ``epochs`` (passes done), ``batch_sizes`` (first, max),
        ``history`` (eval loss over training), ``train_loss``/``eval_loss``/``eval_accuracy`` at the end,
        ``seconds``.
    """
    from transformers import PrinterCallback

    from ..trainer import BatchRampTrainer

    check_choice("optimizer", optimizer, ("sgd", "adam"))
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    history: list[dict] = []
    trainer_ref: dict = {}
    if stop_at_train_loss is not None and eval_every is None:
        raise ConfigError("stop_at_train_loss is checked at the eval_every marks; pass eval_every as well")
    callbacks = (
        [] if eval_every is None else [_eval_callback(trainer_ref, task, eval_every, history, stop_at_train_loss)]
    )
    with tempfile.TemporaryDirectory(prefix="hf-batchsched-reproduce-") as output_dir:
        args = quiet_cpu_args(
            output_dir,
            own_lr=lr_policy is not None,
            num_train_epochs=epochs,
            per_device_train_batch_size=max_micro_batch_size,
            learning_rate=learning_rate,
            seed=seed,
        )
        trainer = BatchRampTrainer(
            model=model,
            args=args,
            train_dataset=task.train_dataset,
            optimizers=(opt, None),
            callbacks=callbacks,
            batch_schedule=batch_schedule,
            max_micro_batch_size=max_micro_batch_size,
            batch_size_multiple=batch_size_multiple,
            lr_policy=lr_policy,
            seed=seed,
        )
        trainer.remove_callback(PrinterCallback)
        trainer_ref["trainer"] = trainer
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    train_loss, train_accuracy = mean_loss(model, task.batches("train"))
    eval_loss, eval_accuracy = mean_loss(model, task.batches("eval"))
    plan = list(trainer.ramp_plan)
    return {
        "optimizer_steps": trainer.clock.optimizer_steps,
        "samples": trainer.clock.consumed_samples,
        "epochs": trainer.clock.consumed_samples / len(task.train_y),
        "first_batch_size": plan[0],
        "max_batch_size": max(plan),
        "batch_sizes": sorted(set(plan[:-1] or plan)),
        "train_loss": train_loss,
        "train_accuracy": train_accuracy,
        "eval_loss": eval_loss,
        "eval_accuracy": eval_accuracy,
        "seconds": round(seconds, 2),
        "history": history,
    }


# --------------------------------------------------------------------------------------------------
# Smith et al. 2018
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmithConfig:
    """Settings of ``reproduce_smith``; milestones are fractions of the run (the paper: 60, 120, 160 of 200 epochs).

    The default is the CPU-sized set-up of the README's results: N = 32,768 teacher samples (``temperature`` 0.5),
    a 2x128 ReLU MLP, 10 epochs of SGD (momentum 0.9, weight decay 5e-4, as the paper), ``B0 = 32``, LR 0.05
    divided by 5 at 30%, 60% and 80% of the run, ``B_max = N / 10``, three seeds (data, initialisation and order).
    N is large against ``B_max`` and the epochs few enough that the run is not dominated by overfitting: the
    regime where the paper's noise-scale argument (``B << N``) applies.
    """

    num_train: int = 32768
    num_eval: int = 8192
    dim: int = 32
    hidden: int = 128
    epochs: float = 10
    milestones: tuple[float, ...] = (0.3, 0.6, 0.8)
    factor: float = 5.0
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    base_batch_size: int = 32
    max_micro_batch_size: int = 256
    temperature: float = 0.5
    eval_every: float = 0.5
    seeds: tuple[int, ...] = (0, 1, 2)

    @classmethod
    def quick(cls) -> SmithConfig:
        """Seconds-long settings for tests and CI (one seed, 480 samples)."""
        return cls(
            num_train=480,
            num_eval=480,
            hidden=32,
            epochs=5,
            base_batch_size=8,
            max_micro_batch_size=48,
            eval_every=1.0,
            seeds=(0,),
        )

    @property
    def total_samples(self) -> int:
        """Samples of the whole run, ``epochs * num_train``."""
        return round(self.epochs * self.num_train)


SMITH_RUNS = ("decaying_lr", "increasing_batch", "hybrid")


def smith_schedules(config: SmithConfig) -> dict:
    """The batch schedule and LR policy of each of Smith et al.'s three runs, on the consumed-samples clock.

    ``decaying_lr``: constant ``B0``, LR divided by ``factor`` at the milestones (``NSTEP``). ``increasing_batch``:
    ``equivalent_to_lr`` of that policy, capped at ``B_max = N / 10`` (rounded down to ``B0``). ``hybrid``: the same
    with ``B_max = factor * B0`` (the batch grows at the first milestone only, then the LR decays).

    Returns:
        `dict[str, tuple[BatchSchedule, Policy]]`: keyed by ``SMITH_RUNS``.

    >>> schedules = smith_schedules(SmithConfig())
    >>> [schedules["increasing_batch"][0](f * SmithConfig().total_samples) for f in (0.0, 0.3, 0.6, 0.8)]
    [32, 160, 800, 3264]
    """
    from ..schedules.batch import ConstantBatch
    from ..schedules.lr_config import make_lr_policy
    from ..schedules.smith import equivalent_to_lr

    n = config.num_train
    decay = make_lr_policy(
        "NSTEP",
        k0=config.learning_rate,
        gamma=1.0 / config.factor,
        l=[round(m * config.total_samples) for m in config.milestones],
        unit="samples",
    )
    common = {
        "base_batch_size": config.base_batch_size,
        "dataset_size": n,
        "multiple": config.base_batch_size,
        "momentum": config.momentum,
    }
    increasing = equivalent_to_lr(decay, max_batch_size=n // 10, **common)
    hybrid = equivalent_to_lr(decay, max_batch_size=int(config.base_batch_size * config.factor), **common)
    return {
        "decaying_lr": (ConstantBatch(config.base_batch_size), decay),
        "increasing_batch": increasing,
        "hybrid": hybrid,
    }


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def reproduce_smith(output_dir: str | os.PathLike, config: SmithConfig | None = None, plot: bool = True) -> dict:
    """Smith et al. 2018: the same model and epochs under (a) step LR decay, (b) increasing batch, (c) hybrid.

    (a) SGD with momentum, batch ``B0``, LR ``NSTEP`` divided by ``factor`` at the milestones; (b) the same LR
    policy turned by ``equivalent_to_lr`` into a batch that grows by ``factor`` at the milestones up to
    ``B_max = N / 10`` (rounded to ``B0``), constant LR until the cap, then the LR decays; (c) the paper's
    hybrid: the batch grows at the first milestone only (``B_max = factor * B0``), then the LR decays (see
    ``smith_schedules``). Every run is repeated for each of ``config.seeds`` (a new teacher sample, initialisation
    and data order per seed); the optimizer updates do not depend on the seed. Writes ``smith.json`` and
    ``smith.png`` (batch size, and the seed-mean eval loss against epochs and against optimizer updates).

    JSON keys: ``experiment``, ``paper``, ``config``, ``task``, ``target``, ``runs`` (per run: ``optimizer_steps``,
    ``expected_optimizer_steps`` from ``simulate``, ``eval_loss`` and ``train_loss`` (seed means),
    ``eval_loss_std``, ``eval_loss_per_seed``, ``lr_at_milestones``, ``batch_at_milestones``, ``history`` (seed
    mean), ``per_seed`` records of ``train_classifier``) and ``summary`` (relative eval-loss differences against
    (a), of the means and per seed, update ratios, ``target_met``).

    Target: (b)'s mean final eval loss within 2% of (a)'s with at least 2.5x fewer optimizer updates.
    """
    from ..schedules.simulate import simulate

    config = config or SmithConfig()
    if not config.seeds:
        raise ConfigError("SmithConfig.seeds is empty; give at least one seed, e.g. seeds=(0,)")
    total = config.total_samples
    schedules = smith_schedules(config)
    per_seed: dict[str, list[dict]] = {name: [] for name in SMITH_RUNS}
    bayes = []
    for seed in config.seeds:
        task = make_teacher_task(
            config.num_train, config.num_eval, dim=config.dim, temperature=config.temperature, seed=seed
        )
        bayes.append(task.bayes_eval_loss)
        for name, (batch_schedule, lr_policy) in schedules.items():
            model = MLPClassifier(config.dim, 10, hidden=config.hidden, seed=seed)
            per_seed[name].append(
                train_classifier(
                    model,
                    task,
                    batch_schedule=batch_schedule,
                    lr_policy=lr_policy,
                    epochs=config.epochs,
                    learning_rate=config.learning_rate,
                    momentum=config.momentum,
                    weight_decay=config.weight_decay,
                    max_micro_batch_size=config.max_micro_batch_size,
                    batch_size_multiple=config.base_batch_size,
                    eval_every=config.eval_every,
                    seed=seed,
                )
            )
    runs = {}
    for name, (batch_schedule, lr_policy) in schedules.items():
        records = per_seed[name]
        eval_losses = [r["eval_loss"] for r in records]
        mean, std = _mean_std(eval_losses)
        history = [
            {**points[0], "eval_loss": _mean_std([p["eval_loss"] for p in points])[0]}
            for points in zip(*(r["history"] for r in records))
        ]
        runs[name] = {
            "optimizer_steps": records[0]["optimizer_steps"],
            "optimizer_steps_per_seed": [r["optimizer_steps"] for r in records],
            "expected_optimizer_steps": simulate(batch_schedule, total, multiple=config.base_batch_size).num_steps,
            "samples": records[0]["samples"],
            "batch_sizes": records[0]["batch_sizes"],
            "eval_loss": mean,
            "eval_loss_std": std,
            "eval_loss_per_seed": eval_losses,
            "train_loss": _mean_std([r["train_loss"] for r in records])[0],
            "eval_accuracy": _mean_std([r["eval_accuracy"] for r in records])[0],
            "lr_at_milestones": [lr_policy(m * total) for m in (0.0, *config.milestones)],
            "batch_at_milestones": [batch_schedule(m * total) for m in (0.0, *config.milestones)],
            "seconds": round(sum(r["seconds"] for r in records), 2),
            "history": history,
            "per_seed": [{k: v for k, v in r.items() if k != "history"} for r in records],
        }
    a, b, c = (runs[name] for name in SMITH_RUNS)

    def rel(x: dict, per: int | None = None) -> float:
        if per is None:
            return (x["eval_loss"] - a["eval_loss"]) / a["eval_loss"]
        return (x["eval_loss_per_seed"][per] - a["eval_loss_per_seed"][per]) / a["eval_loss_per_seed"][per]

    seeds = range(len(config.seeds))
    summary = {
        "seeds": list(config.seeds),
        "eval_loss_rel_diff_increasing_vs_decay": rel(b),
        "eval_loss_rel_diff_hybrid_vs_decay": rel(c),
        "eval_loss_rel_diff_increasing_vs_decay_per_seed": [rel(b, i) for i in seeds],
        "eval_loss_rel_diff_hybrid_vs_decay_per_seed": [rel(c, i) for i in seeds],
        "update_ratio_decay_over_increasing": a["optimizer_steps"] / b["optimizer_steps"],
        "update_ratio_decay_over_hybrid": a["optimizer_steps"] / c["optimizer_steps"],
    }
    summary["target_met"] = bool(
        summary["eval_loss_rel_diff_increasing_vs_decay"] <= 0.02
        and summary["update_ratio_decay_over_increasing"] >= 2.5
    )
    summary["target_met_every_seed"] = bool(
        max(summary["eval_loss_rel_diff_increasing_vs_decay_per_seed"]) <= 0.02
        and summary["update_ratio_decay_over_increasing"] >= 2.5
    )
    result = {
        "experiment": "smith",
        "paper": "Smith, Kindermans, Ying & Le, Don't Decay the Learning Rate, Increase the Batch Size, ICLR 2018",
        "config": asdict(config),
        "task": {
            "bayes_eval_loss": _mean_std(bayes)[0],
            "bayes_eval_loss_per_seed": bayes,
            "dataset_size": config.num_train,
            "total_samples": total,
        },
        "runs": runs,
        "summary": summary,
        "target": "increasing_batch mean eval loss within 2% of decaying_lr with >= 2.5x fewer optimizer updates",
    }
    _write(output_dir, "smith", result)
    if plot:
        _plot_smith(result, pathlib.Path(output_dir) / "smith.png")
    return result


def _plot_smith(result: dict, path: pathlib.Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    config = result["config"]
    marks = [0.0, *(m * config["epochs"] for m in config["milestones"]), config["epochs"]]
    for name, run in result["runs"].items():
        hist = run["history"]
        epochs = [h["epoch"] for h in hist]
        sizes = [*run["batch_at_milestones"], run["batch_at_milestones"][-1]]
        axes[0].plot(marks, sizes, label=name, drawstyle="steps-post")
        axes[1].plot(epochs, [h["eval_loss"] for h in hist], label=name)
        axes[2].plot([h["optimizer_steps"] for h in hist], [h["eval_loss"] for h in hist], label=name)
    bayes = result["task"]["bayes_eval_loss"]
    for ax in axes[1:]:
        ax.axhline(bayes, color="grey", linestyle=":", label="teacher (Bayes) loss")
        ax.set_ylabel("eval cross-entropy")
    axes[0].set(xlabel="epochs", ylabel="global batch size", yscale="log", title="batch size (schedule)")
    axes[1].set(xlabel="epochs", title="eval loss vs epochs")
    axes[2].set(xlabel="optimizer updates", title="eval loss vs updates")
    axes[2].legend()
    fig.suptitle("Smith et al. 2018 on a teacher-student MLP: decay the LR or increase the batch")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Keskar et al. 2017
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeskarConfig:
    """Settings of ``reproduce_keskar`` (the paper: SB = 256, LB = 10% of N, Adam, until the loss stops improving).

    Both runs train until the full training loss is at or below ``target_train_loss`` (checked every epoch; at most
    ``max_epochs``), so the two solutions are compared at a comparable training loss. The default: N = 8,192
    teacher samples at ``temperature`` 0.1, a 2x256 ReLU MLP, Adam at 1e-3, SB = 32 against LB = 819 (10% of N),
    Keskar's metric at ``eps = 1e-3`` (10 L-BFGS-B iterations), five seeds as the paper's five runs.
    """

    num_train: int = 8192
    num_eval: int = 4096
    dim: int = 32
    hidden: int = 256
    max_epochs: float = 150
    target_train_loss: float = 0.05
    small_batch: int = 32
    large_fraction: float = 0.1
    learning_rate: float = 1e-3
    temperature: float = 0.1
    alphas: int = 31
    keskar_eps: float = 1e-3
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)

    @classmethod
    def quick(cls) -> KeskarConfig:
        """Seconds-long settings for tests and CI."""
        return cls(
            num_train=320,
            num_eval=320,
            hidden=32,
            max_epochs=4,
            target_train_loss=0.0,
            small_batch=16,
            alphas=7,
            seeds=(0,),
        )


def interpolate_state(state_sb: dict, state_lb: dict, alpha: float) -> dict:
    """The state dict of ``w(alpha) = alpha * w_LB + (1 - alpha) * w_SB`` (non-float entries come from ``w_SB``).

    Written as the paper's formula, not ``torch.lerp``, so that ``alpha = 0`` gives exactly ``w_SB`` and
    ``alpha = 1`` exactly ``w_LB``:

    >>> sb, lb = {"w": torch.tensor([0.1, -3.0])}, {"w": torch.tensor([0.7, 2.5])}
    >>> at_0, at_1 = interpolate_state(sb, lb, 0.0)["w"], interpolate_state(sb, lb, 1.0)["w"]
    >>> torch.equal(at_0, sb["w"]), torch.equal(at_1, lb["w"])
    (True, True)
    >>> interpolate_state(sb, lb, 0.5)["w"]
    tensor([ 0.4000, -0.2500])
    """
    if state_sb.keys() != state_lb.keys():
        raise ConfigError("the two models have different parameters; interpolate between copies of one architecture")
    return {
        key: alpha * state_lb[key] + (1.0 - alpha) * value if torch.is_floating_point(value) else value.clone()
        for key, value in state_sb.items()
    }


def line_losses(
    model: nn.Module,
    state_sb: dict,
    state_lb: dict,
    alphas: Sequence[float],
    splits: dict[str, Sequence[dict]],
) -> dict[str, list[float]]:
    """Keskar et al.'s parametric plot: loss and accuracy of ``w(a) = a w_LB + (1 - a) w_SB`` for each ``a``.

    Args:
        model (`nn.Module`): a model of the same architecture; its state is restored afterwards.
        state_sb, state_lb (`dict`): ``state_dict()`` of the small- and large-batch solutions.
        alphas (`Sequence[float]`): the points ``a`` (the paper: ``[-1, 2]``).
        splits (`dict[str, Sequence[dict]]`): name -> batches (e.g. ``{"train": ..., "eval": ...}``).

    Returns:
        `dict[str, list[float]]`: ``alpha`` and, per split, ``<split>_loss`` and ``<split>_accuracy`` (``mean_loss``),
        so ``a = 0`` gives exactly ``mean_loss`` of the SB model and ``a = 1`` of the LB model.
    """
    saved = {key: value.clone() for key, value in model.state_dict().items()}
    out: dict[str, list[float]] = {"alpha": [float(a) for a in alphas]}
    try:
        for alpha in alphas:
            model.load_state_dict(interpolate_state(state_sb, state_lb, float(alpha)))
            for split, batches in splits.items():
                loss, accuracy = mean_loss(model, batches)
                out.setdefault(f"{split}_loss", []).append(loss)
                out.setdefault(f"{split}_accuracy", []).append(accuracy)
    finally:
        model.load_state_dict(saved)
    return out


def _sharpness(model: nn.Module, batches: Sequence[dict], config: KeskarConfig, seed: int) -> dict:
    from ..probes.sharpness import estimate_sharpness

    start = time.perf_counter()
    out = estimate_sharpness(
        model, batches, ("avg", "lambda_max", "keskar"), eps=config.keskar_eps, subspace_dim=None, seed=seed
    )
    subspace = estimate_sharpness(model, batches, ("keskar",), eps=config.keskar_eps, subspace_dim=100, seed=seed)
    out["keskar_subspace100"] = subspace["keskar"]
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


KESKAR_METRICS = ("avg", "lambda_max", "keskar", "keskar_subspace100")


def reproduce_keskar(output_dir: str | os.PathLike, config: KeskarConfig | None = None, plot: bool = True) -> dict:
    """Keskar et al. 2017: small batch (SB) vs large batch (LB = 10% of N), same model and optimizer (Adam).

    For each of ``config.seeds`` (teacher sample, initialisation and data order) both runs train until the full
    training loss is at or below ``target_train_loss`` (or ``max_epochs``). At the end of each run it measures
    ``estimate_sharpness`` on the training loss (``avg``, ``lambda_max``, and Keskar's metric 2.1 with ``eps`` in the
    full space and in a random 100-dim subspace) and the train-eval gap (loss and accuracy), and for the first seed
    the parametric plot: train and eval loss along ``w(a) = a w_LB + (1 - a) w_SB``, ``a`` in ``[-1, 2]``.
    Writes ``keskar.json`` and ``keskar_parametric.png``.

    JSON keys: ``experiment``, ``paper``, ``config``, ``task``, ``runs`` (``small_batch``/``large_batch``:
    ``batch_size``, seed means of ``train_loss``, ``eval_loss``, ``train_accuracy``, ``eval_accuracy``,
    ``generalization_gap_loss``, ``generalization_gap_accuracy``, ``epochs``, ``optimizer_steps``, ``sharpness``
    (metric -> mean), ``per_seed``), ``parametric_plot`` (``alpha``, ``train_loss``, ``eval_loss``,
    ``train_accuracy``, ``eval_accuracy``) and ``summary`` (per metric: LB sharper in the mean and in how many
    seeds, LB/SB ratios, the gaps, ``verdict``).
    """
    config = config or KeskarConfig()
    if not config.seeds:
        raise ConfigError("KeskarConfig.seeds is empty; give at least one seed, e.g. seeds=(0,)")
    large = max(config.small_batch, round(config.large_fraction * config.num_train))
    per_seed: dict[str, list[dict]] = {"small_batch": [], "large_batch": []}
    line: dict = {}
    bayes = []
    for index, seed in enumerate(config.seeds):
        task = make_teacher_task(
            config.num_train, config.num_eval, dim=config.dim, temperature=config.temperature, seed=seed
        )
        bayes.append(task.bayes_eval_loss)
        train_batches = task.batches("train", 1024)
        eval_batches = task.batches("eval", 1024)
        states = {}
        for name, batch_size in (("small_batch", config.small_batch), ("large_batch", large)):
            model = MLPClassifier(config.dim, 10, hidden=config.hidden, seed=seed)
            run = train_classifier(
                model,
                task,
                batch_schedule=batch_size,
                epochs=config.max_epochs,
                learning_rate=config.learning_rate,
                optimizer="adam",
                max_micro_batch_size=batch_size,
                batch_size_multiple=1,
                eval_every=1.0,
                stop_at_train_loss=config.target_train_loss,
                seed=seed,
            )
            run["seed"] = seed
            run["batch_size"] = batch_size
            run["generalization_gap_loss"] = run["eval_loss"] - run["train_loss"]
            run["generalization_gap_accuracy"] = run["train_accuracy"] - run["eval_accuracy"]
            run["sharpness"] = _sharpness(model, train_batches, config, seed)
            if index > 0:
                run.pop("history")
            per_seed[name].append(run)
            states[name] = {key: value.clone() for key, value in model.state_dict().items()}
        if index == 0:
            line = line_losses(
                MLPClassifier(config.dim, 10, hidden=config.hidden, seed=seed),
                states["small_batch"],
                states["large_batch"],
                parametric_alphas(config.alphas),
                {"train": train_batches, "eval": eval_batches},
            )
    runs = {}
    scalars = (
        "train_loss",
        "eval_loss",
        "train_accuracy",
        "eval_accuracy",
        "generalization_gap_loss",
        "generalization_gap_accuracy",
        "epochs",
        "optimizer_steps",
    )
    for name, records in per_seed.items():
        runs[name] = {"batch_size": records[0]["batch_size"]}
        for key in scalars:
            runs[name][key], runs[name][f"{key}_std"] = _mean_std([r[key] for r in records])
        runs[name]["sharpness"] = {m: _mean_std([r["sharpness"][m] for r in records])[0] for m in KESKAR_METRICS}
        runs[name]["sharpness_std"] = {m: _mean_std([r["sharpness"][m] for r in records])[1] for m in KESKAR_METRICS}
        runs[name]["per_seed"] = records
    sb, lb = runs["small_batch"], runs["large_batch"]
    n_seeds = len(config.seeds)
    seed_pairs = list(zip(per_seed["small_batch"], per_seed["large_batch"]))
    sharper = {metric: bool(lb["sharpness"][metric] > sb["sharpness"][metric]) for metric in KESKAR_METRICS}
    summary = {
        "seeds": list(config.seeds),
        "lb_sharper": sharper,
        "lb_sharper_seeds": {
            metric: sum(b["sharpness"][metric] > a["sharpness"][metric] for a, b in seed_pairs)
            for metric in KESKAR_METRICS
        },
        "sharpness_ratio_lb_over_sb": {
            metric: _ratio(lb["sharpness"][metric], sb["sharpness"][metric]) for metric in KESKAR_METRICS
        },
        "lb_larger_gap_accuracy": bool(lb["generalization_gap_accuracy"] > sb["generalization_gap_accuracy"]),
        "lb_larger_gap_accuracy_seeds": sum(
            b["generalization_gap_accuracy"] > a["generalization_gap_accuracy"] for a, b in seed_pairs
        ),
        "lb_larger_gap_loss": bool(lb["generalization_gap_loss"] > sb["generalization_gap_loss"]),
        "lb_larger_gap_loss_seeds": sum(
            b["generalization_gap_loss"] > a["generalization_gap_loss"] for a, b in seed_pairs
        ),
        "lb_lower_eval_accuracy": bool(lb["eval_accuracy"] < sb["eval_accuracy"]),
        "num_seeds": n_seeds,
    }
    summary["paper_direction_holds"] = bool(
        sharper["lambda_max"] and sharper["keskar"] and summary["lb_larger_gap_accuracy"]
    )
    summary["verdict"] = _keskar_verdict(summary)
    result = {
        "experiment": "keskar",
        "paper": "Keskar et al., On Large-Batch Training for Deep Learning: Generalization Gap and Sharp Minima, "
        "ICLR 2017",
        "config": asdict(config),
        "task": {"bayes_eval_loss": _mean_std(bayes)[0], "dataset_size": config.num_train, "large_batch": large},
        "runs": runs,
        "parametric_plot": line,
        "parametric_plot_seed": config.seeds[0],
        "summary": summary,
    }
    _write(output_dir, "keskar", result)
    if plot:
        _plot_keskar(result, pathlib.Path(output_dir) / "keskar_parametric.png")
    return result


def parametric_alphas(num: int) -> list[float]:
    """``num`` evenly spaced points of ``[-1, 2]`` plus exactly ``0.0`` (SB) and ``1.0`` (LB), sorted.

    >>> parametric_alphas(7)
    [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0]
    >>> parametric_alphas(3)
    [-1.0, 0.0, 0.5, 1.0, 2.0]
    """
    if num < 2:
        raise ConfigError(f"alphas must be >= 2 (points of the parametric plot), got {num}")
    return sorted({-1.0 + 3.0 * i / (num - 1) for i in range(num)} | {0.0, 1.0})


def _keskar_verdict(summary: dict) -> str:
    """One sentence on the paper's direction (LB sharper, larger generalisation gap), metric by metric."""
    n = summary["num_seeds"]
    parts = [
        f"{metric}: LB {'sharper' if sharper else 'flatter'} (x{summary['sharpness_ratio_lb_over_sb'][metric]:.3g}, "
        f"{summary['lb_sharper_seeds'][metric]}/{n} seeds)"
        for metric, sharper in summary["lb_sharper"].items()
        if summary["sharpness_ratio_lb_over_sb"][metric] is not None
    ]
    gap = (
        f"accuracy gap LB {'larger' if summary['lb_larger_gap_accuracy'] else 'smaller'} "
        f"({summary['lb_larger_gap_accuracy_seeds']}/{n} seeds), loss gap LB "
        f"{'larger' if summary['lb_larger_gap_loss'] else 'smaller'} ({summary['lb_larger_gap_loss_seeds']}/{n} seeds)"
    )
    head = "holds" if summary["paper_direction_holds"] else "does not fully hold"
    return f"paper direction (lambda_max, keskar sharper and accuracy gap larger for LB) {head}: " + "; ".join(
        [*parts, gap]
    )


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator and math.isfinite(denominator) else None


def _plot_keskar(result: dict, path: pathlib.Path) -> None:
    plt = _pyplot()
    line = result["parametric_plot"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(line["alpha"], line["train_loss"], "b-", label="train loss")
    ax.plot(line["alpha"], line["eval_loss"], "b--", label="eval loss")
    ax.set(xlabel="alpha  (w = alpha * w_LB + (1 - alpha) * w_SB)", ylabel="cross-entropy", yscale="log")
    right = ax.twinx()
    right.plot(line["alpha"], line["train_accuracy"], "r-", label="train accuracy")
    right.plot(line["alpha"], line["eval_accuracy"], "r--", label="eval accuracy")
    right.set_ylabel("accuracy", color="r")
    for x, label in ((0.0, "SB"), (1.0, "LB")):
        ax.axvline(x, color="grey", linestyle=":")
        ax.text(x, ax.get_ylim()[1], label, ha="center", va="bottom")
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper center", fontsize=8)
    fig.suptitle(
        f"Keskar et al. 2017 parametric plot (teacher-student MLP, Adam, seed {result['parametric_plot_seed']})",
        y=0.99,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Bjorck et al. 2018 (the BN engineer's benchmark) and the overhead table
# --------------------------------------------------------------------------------------------------


def _run_script(script: pathlib.Path, extra: Sequence[str] = (), timeout: float = 1800) -> None:
    if not script.is_file():
        raise FileNotFoundError(f"{script} does not exist; this experiment needs the benchmark script")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    subprocess.run([sys.executable, str(script), *extra], check=True, cwd=REPO_ROOT, env=env, timeout=timeout)


BJORCK_QUICK_ARGS = ("--steps", "20", "--depth", "4")


def reproduce_bjorck(output_dir: str | os.PathLike, quick: bool = False, rerun: bool = True) -> dict:
    """Bjorck et al. 2018: run ``benchmarks/bench_bjorck.py`` and summarise its JSON (``summarise_bjorck``).

    The benchmark (a 16-block MLP on scikit-learn's digits, with and without BatchNorm, SGD + momentum over LRs
    1e-4 .. 3) writes ``<output_dir>/bjorck.json`` and ``bjorck.png``; ``quick`` passes ``--steps 20 --depth 4``.
    With ``rerun=False`` the committed ``benchmarks/results/bjorck.json`` is summarised instead (nothing runs).
    Writes ``bjorck_summary.json``: ``experiment``, ``paper``, ``source``, ``command``, ``summary``.
    """
    script = REPO_ROOT / "benchmarks" / "bench_bjorck.py"
    extra = list(BJORCK_QUICK_ARGS) if quick else []
    if rerun:
        source = pathlib.Path(output_dir) / "bjorck.json"
        source.parent.mkdir(parents=True, exist_ok=True)
        _run_script(script, [*extra, "--out", str(source)])
    else:
        source = REPO_ROOT / "benchmarks" / "results" / "bjorck.json"
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist; run `python benchmarks/bench_bjorck.py` first")
    benchmark = json.loads(source.read_text())
    result = {
        "experiment": "bjorck",
        "paper": "Bjorck, Gomes, Selman & Weinberger, Understanding Batch Normalization, NeurIPS 2018",
        "source": _display_path(source),
        "command": " ".join(["python benchmarks/bench_bjorck.py", *extra]),
        "summary": summarise_bjorck(benchmark),
    }
    _write(output_dir, "bjorck_summary", result)
    return result


def _display_path(path: pathlib.Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def summarise_bjorck(benchmark: dict) -> dict:
    """The trainable LR ranges and the depth-wise activation growth of the diverging runs in ``bench_bjorck``'s JSON.

    Returns, per ``"no_bn"``/``"bn"``: ``trained_lrs`` (loss below 0.9x the initial, no divergence), ``stalled_lrs``,
    ``diverged_lrs``, ``trainable_range`` (``[min, max]`` of the trained LRs, ``None`` if none) and ``best_lr`` (the
    lowest final train loss); plus ``max_lr_ratio_bn_over_no_bn`` and ``diverging_runs``: for each diverged run,
    the step, ``activation_growth`` and ``log_rms_slope`` (``activation_profile``: RMS growth over the blocks, the
    slope of log10 RMS per block) and ``depth_growth`` = RMS(last block) / RMS(first block) at divergence,
    against the same ratio at initialisation.

    >>> rows = [
    ...     {"batchnorm": False, "lr": 0.1, "status": "trained", "diverged": False, "final_train_loss": 0.5},
    ...     {"batchnorm": False, "lr": 1.0, "status": "diverged", "diverged": True, "diverged_at_step": 3,
    ...      "activation_growth": 50.0, "log_rms_slope": 0.4, "log10_rms_by_depth": [0.0, 1.0, 2.0],
    ...      "initial_log10_rms_by_depth": [0.0, 0.0, 0.1]},
    ...     {"batchnorm": True, "lr": 1.0, "status": "trained", "diverged": False, "final_train_loss": 0.3},
    ... ]
    >>> out = summarise_bjorck({"results": rows})
    >>> out["no_bn"]["trainable_range"], out["bn"]["trainable_range"], out["max_lr_ratio_bn_over_no_bn"]
    ([0.1, 0.1], [1.0, 1.0], 10.0)
    >>> out["diverging_runs"][0]["depth_growth"], round(out["diverging_runs"][0]["depth_growth_at_init"], 3)
    (100.0, 1.259)
    """
    rows = benchmark.get("results")
    if not isinstance(rows, list):
        raise ConfigError("the Bjorck benchmark JSON has no 'results' list; rerun benchmarks/bench_bjorck.py")
    summary: dict = {"setup": benchmark.get("setup", {})}
    for label, batchnorm in (("no_bn", False), ("bn", True)):
        mine = [r for r in rows if bool(r["batchnorm"]) == batchnorm]
        trained = [r for r in mine if r["status"] == "trained"]
        best = min(trained, key=lambda r: r["final_train_loss"], default=None)
        summary[label] = {
            "trained_lrs": [r["lr"] for r in trained],
            "stalled_lrs": [r["lr"] for r in mine if r["status"] == "stalled"],
            "diverged_lrs": [r["lr"] for r in mine if r["diverged"]],
            "trainable_range": [min(r["lr"] for r in trained), max(r["lr"] for r in trained)] if trained else None,
            "best_lr": None if best is None else best["lr"],
            "best_final_train_loss": None if best is None else best["final_train_loss"],
            "best_test_accuracy": None if best is None else best.get("test_accuracy"),
        }
    top = {label: (summary[label]["trainable_range"] or [None, None])[1] for label in ("no_bn", "bn")}
    summary["max_lr_ratio_bn_over_no_bn"] = top["bn"] / top["no_bn"] if top["bn"] and top["no_bn"] else None
    summary["diverging_runs"] = [
        {
            "batchnorm": bool(r["batchnorm"]),
            "lr": r["lr"],
            "diverged_at_step": r.get("diverged_at_step"),
            "activation_growth": r.get("activation_growth"),
            "log_rms_slope": r.get("log_rms_slope"),
            "depth_growth": _depth_growth(r.get("log10_rms_by_depth")),
            "depth_growth_at_init": _depth_growth(r.get("initial_log10_rms_by_depth")),
        }
        for r in rows
        if r["diverged"]
    ]
    return summary


def _depth_growth(log10_rms: Sequence[float | None] | None) -> float | None:
    """RMS of the last block over the first, from a log10-RMS profile (``None`` when either end is missing)."""
    if not log10_rms or log10_rms[0] is None or log10_rms[-1] is None:
        return None
    return 10.0 ** (log10_rms[-1] - log10_rms[0])


# name -> (results file, [(label, key path, unit)], command). Each benchmark script documents its set-up.
OVERHEAD_SOURCES: dict[str, tuple[str, list[tuple[str, str, str]], str]] = {
    "trainer": (
        "trainer.json",
        [
            (
                "BatchRampTrainer / Trainer throughput, constant batch 16 (CPU-time based, median of pairs)",
                "cpu_throughput_ratio_ramp_over_plain",
                "x",
            ),
            ("same, wall-clock based (shared CPU: noisy)", "throughput_ratio_ramp_over_plain", "x"),
            ("peak memory, ramp 8->256 (micro-batch 8) / constant 8", "memory_ratio_ramp8to256_over_const8", "x"),
            (
                "peak memory, constant 256 in one chunk / constant 8 (what the ramp avoids)",
                "memory_ratio_const256_one_chunk_over_const8",
                "x",
            ),
        ],
        "python benchmarks/bench_trainer.py",
    ),
    "sharpness": (
        "sharpness.json",
        [
            (
                "SharpnessProbeCallback overhead at its default cadence (probe time / train time)",
                "callback_overhead.overhead_pct_measured_probe_time",
                "%",
            ),
            ("same, wall-clock difference", "callback_overhead.overhead_pct_wall_difference", "%"),
            (
                "Lanczos / power-iteration HVPs to 1% of lambda_max",
                "lanczos_vs_power.total_ratio_lanczos_over_power",
                "x",
            ),
        ],
        "python benchmarks/bench_sharpness.py",
    ),
    "probe_costs": (
        "probe_costs.json",
        [
            (
                "exact HVP / PyHessian-style HVP (first-order graph kept), full tiny Llama",
                "summary.hvp_ours_over_pyhessian_style_full",
                "x",
            ),
            ("same, LoRA adapters", "summary.hvp_ours_over_pyhessian_style_lora", "x"),
            (
                "Keskar call after the first (subspace kept) / before the change, forward+backward equivalents",
                "summary.keskar_cost_later_calls_over_before",
                "x",
            ),
            (
                "Keskar first call, peak memory / before the change",
                "summary.keskar_peak_memory_first_call_over_before",
                "x",
            ),
        ],
        "python benchmarks/bench_probe_costs.py",
    ),
    "noise_scale": (
        "noise_scale.json",
        [
            (
                "NoiseScaleCallback hook time / step time (tiny Llama, 4 micro-batches)",
                "overhead.hook_time_pct_of_step",
                "%",
            ),
            ("same, side-by-side wall-clock difference (noise)", "overhead.side_by_side_overhead_pct", "%"),
        ],
        "python benchmarks/bench_noise_scale.py",
    ),
    "stability": (
        "stability.json",
        [
            (
                "StabilityMonitor time / train time, tiny Llama, every 25 steps",
                "llama.overhead_percent_accounted",
                "%",
            ),
            ("same, wall-clock difference", "llama.overhead_percent_wallclock", "%"),
            ("StabilityMonitor time / train time, small ResNet (BN)", "resnet.overhead_percent_accounted", "%"),
        ],
        "python benchmarks/bench_stability.py",
    ),
    "demo_task": (
        "demo_task.json",
        [
            (
                "SharpnessProbeCallback at its defaults on the demo's fine-tune (probe time / train time)",
                "sharpness.defaults.probe_pct_of_train_median",
                "%",
            ),
            (
                "same with budget=None (a probe after each of the 9 evaluations)",
                "sharpness.no_budget.probe_pct_of_train_median",
                "%",
            ),
            (
                "adaptive batch (8 -> 64, sqrt LR) / fixed 8: updates to the baseline's eval loss (median, 3 seeds)",
                "adaptive.summary.updates_ratio_median",
                "x",
            ),
        ],
        "python benchmarks/bench_demo_task.py",
    ),
}


def _lookup(data, path: str):
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def gather_overheads(
    output_dir: str | os.PathLike, rerun: bool = False, results_dir: str | os.PathLike | None = None
) -> dict:
    """One table of the overheads the benchmark scripts measured (``benchmarks/results/*.json``).

    With ``rerun=True`` each ``benchmarks/bench_<name>.py`` runs first. A missing file or key is reported as
    ``null`` with a note, never invented. Writes ``overheads.json`` and ``overheads.md``.
    """
    results_dir = pathlib.Path(results_dir) if results_dir is not None else REPO_ROOT / "benchmarks" / "results"
    rows, notes = [], []
    for name, (filename, metrics, command) in OVERHEAD_SOURCES.items():
        if rerun:
            try:
                _run_script(REPO_ROOT / command.split()[1])
            except (FileNotFoundError, subprocess.SubprocessError) as error:
                notes.append(f"{name}: rerun failed: {str(error).splitlines()[0]}")
        path = results_dir / filename
        data = json.loads(path.read_text()) if path.is_file() else None
        if data is None:
            notes.append(f"{name}: {filename} not found; run `{command}`")
        for label, key, unit in metrics:
            value = None if data is None else _lookup(data, key)
            if data is not None and value is None:
                notes.append(f"{name}: key {key!r} not in {filename}")
            rows.append(
                {
                    "benchmark": name,
                    "figure": label,
                    "value": value,
                    "unit": unit,
                    "source": f"{filename}:{key}",
                    "command": command,
                }
            )
    table = ["| benchmark | figure | value | source | rerun |", "|---|---|---|---|---|"]
    for row in rows:
        value = "n/a" if row["value"] is None else f"{_fmt(row['value'])}{row['unit']}"
        table.append(f"| {row['benchmark']} | {row['figure']} | {value} | `{row['source']}` | `{row['command']}` |")
    markdown = "\n".join(table) + "\n" + "".join(f"\n- {note}" for note in notes) + ("\n" if notes else "")
    result = {"experiment": "overheads", "rows": rows, "notes": notes, "markdown": markdown}
    _write(output_dir, "overheads", result)
    (pathlib.Path(output_dir) / "overheads.md").write_text(markdown)
    return result


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _write(output_dir: str | os.PathLike, name: str, result: dict) -> pathlib.Path:
    path = pathlib.Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    target = path / f"{name}.json"
    target.write_text(json.dumps(_jsonable(result), indent=2, allow_nan=False) + "\n")
    return target


EXPERIMENTS: dict[str, Callable[..., dict]] = {
    "smith": reproduce_smith,
    "keskar": reproduce_keskar,
    "bjorck": reproduce_bjorck,
    "overheads": gather_overheads,
}
