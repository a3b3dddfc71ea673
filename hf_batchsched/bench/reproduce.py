"""Reproductions of the seed papers on a CPU in minutes: ``smith``, ``keskar``, ``bjorck`` and ``overheads``.

Each experiment is a function that trains small models (through ``BatchRampTrainer`` where a training run is
involved), writes ``<output_dir>/<name>.json`` and its figures, and returns the result dict. The command
``hf-batchsched reproduce {smith,keskar,bjorck,overheads,all} --output-dir DIR [--quick]`` runs them.

The task is a **teacher-student classification** problem (``make_teacher_task``): Gaussian inputs, a random
two-layer teacher whose softmax *samples* the labels, so the Bayes loss is above zero and SGD noise matters at
the end of training, as it does on CIFAR-10. The student is a ReLU MLP (``MLPClassifier``) whose forward takes
``input_ids`` (the float features) and ``labels`` and returns a ``SequenceClassifierOutput`` like a Hugging Face model.

| experiment | paper | what is compared |
|---|---|---|
| ``reproduce_smith`` | Smith, Kindermans, Ying & Le, ICLR 2018 | step LR decay vs increasing batch vs hybrid, same epochs |
| ``reproduce_keskar`` | Keskar et al., ICLR 2017 | small vs large batch (10% of N): sharpness, gap, parametric plot |
| ``reproduce_bjorck`` | Bjorck, Gomes, Selman & Weinberger, NeurIPS 2018 | runs ``benchmarks/bench_bjorck.py`` and summarises |
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
    "KeskarConfig",
    "MLPClassifier",
    "SmithConfig",
    "TeacherTask",
    "gather_overheads",
    "interpolate_state",
    "line_losses",
    "make_teacher_task",
    "mean_loss",
    "reproduce_bjorck",
    "reproduce_keskar",
    "reproduce_smith",
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
    """A ReLU MLP with a Hugging Face style forward: ``model(input_ids=features, labels=...)`` returns ``.loss`` and ``.logits``.

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


def _eval_callback(trainer_ref: dict, task: TeacherTask, every: float, history: list):
    from transformers import TrainerCallback

    eval_batches = task.batches("eval")
    num_samples = len(task.train_y)

    class _EvalEvery(TrainerCallback):
        """Records the eval loss whenever another ``every`` passes over the data have been consumed."""

        next_mark = every

        def on_step_end(self, args, state, control, **kwargs):
            trainer = trainer_ref["trainer"]
            epochs = trainer.clock.consumed_samples / num_samples
            if epochs + 1e-9 >= self.next_mark:
                loss, accuracy = mean_loss(kwargs["model"], eval_batches)
                lr = trainer.optimizer.param_groups[0]["lr"]
                history.append(
                    {
                        "epoch": round(epochs, 4),
                        "optimizer_steps": trainer.clock.optimizer_steps,
                        "batch_size": trainer.last_batch_size,
                        "lr": lr,
                        "eval_loss": loss,
                        "eval_accuracy": accuracy,
                    }
                )
                while self.next_mark <= epochs + 1e-9:
                    self.next_mark += every

    return _EvalEvery()


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
        seed (`int`, *optional*, defaults to `0`): data-order seed.

    Returns:
        `dict`: ``optimizer_steps``, ``samples``, ``batch_sizes`` (first, max), ``history`` (eval loss over
        training), ``train_loss``/``eval_loss``/``eval_accuracy`` at the end, ``seconds``.
    """
    from transformers import PrinterCallback, TrainingArguments

    from ..trainer import BatchRampTrainer

    check_choice("optimizer", optimizer, ("sgd", "adam"))
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    history: list[dict] = []
    trainer_ref: dict = {}
    callbacks = [] if eval_every is None else [_eval_callback(trainer_ref, task, eval_every, history)]
    with tempfile.TemporaryDirectory(prefix="hf-batchsched-reproduce-") as output_dir:
        args = TrainingArguments(
            output_dir,
            num_train_epochs=epochs,
            per_device_train_batch_size=max_micro_batch_size,
            learning_rate=learning_rate,
            lr_scheduler_type="constant",
            report_to="none",
            use_cpu=True,
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_pin_memory=False,
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
    """Settings of ``reproduce_smith``; milestones are fractions of the run (the paper: 60, 120, 160 of 200)."""

    num_train: int = 4096
    num_eval: int = 4096
    dim: int = 32
    hidden: int = 128
    epochs: float = 20
    milestones: tuple[float, ...] = (0.3, 0.6, 0.8)
    factor: float = 5.0
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    base_batch_size: int = 16
    max_micro_batch_size: int = 80
    temperature: float = 1.0
    eval_every: float = 0.5
    seed: int = 0

    @classmethod
    def quick(cls) -> SmithConfig:
        return cls(
            num_train=480,
            num_eval=480,
            hidden=32,
            epochs=5,
            base_batch_size=8,
            max_micro_batch_size=48,
            eval_every=1.0,
        )


def reproduce_smith(output_dir: str | os.PathLike, config: SmithConfig | None = None, plot: bool = True) -> dict:
    """Smith et al. 2018: the same model and epochs under (a) step LR decay, (b) increasing batch, (c) hybrid.

    (a) SGD with momentum, batch ``B0``, LR ``NSTEP`` divided by ``factor`` at the milestones; (b) the same LR
    policy turned by ``equivalent_to_lr`` into a batch that grows by ``factor`` at the milestones up to
    ``B_max = N / 10`` (rounded to the micro-batch), constant LR until the cap, then the LR decays; (c) the paper's
    hybrid: the batch grows at the first milestone only (``B_max = factor * B0``), then the LR decays. Writes
    ``smith.json`` and ``smith.png`` (eval loss against epochs and against optimizer updates, batch size).

    Targets: (b)'s final eval loss within 2% of (a)'s with at least 2.5x fewer optimizer updates.
    """
    from ..schedules.batch import ConstantBatch, equivalent_to_lr
    from ..schedules.lr import make_lr_policy

    config = config or SmithConfig()
    task = make_teacher_task(
        config.num_train, config.num_eval, dim=config.dim, temperature=config.temperature, seed=config.seed
    )
    n = config.num_train
    total = config.epochs * n
    decay = make_lr_policy(
        "NSTEP",
        k0=config.learning_rate,
        gamma=1.0 / config.factor,
        l=[round(m * total) for m in config.milestones],
        unit="samples",
    )
    multiple = config.base_batch_size
    increasing, increasing_lr = equivalent_to_lr(
        decay,
        base_batch_size=config.base_batch_size,
        dataset_size=n,
        max_batch_size=n // 10,
        multiple=multiple,
        momentum=config.momentum,
    )
    hybrid_cap = int(config.base_batch_size * config.factor)
    hybrid, hybrid_lr = equivalent_to_lr(
        decay,
        base_batch_size=config.base_batch_size,
        dataset_size=n,
        max_batch_size=hybrid_cap,
        multiple=multiple,
        momentum=config.momentum,
    )
    schedules = {
        "decaying_lr": (ConstantBatch(config.base_batch_size), decay),
        "increasing_batch": (increasing, increasing_lr),
        "hybrid": (hybrid, hybrid_lr),
    }
    runs = {}
    for name, (batch_schedule, lr_policy) in schedules.items():
        model = MLPClassifier(config.dim, 10, hidden=config.hidden, seed=config.seed)
        runs[name] = train_classifier(
            model,
            task,
            batch_schedule=batch_schedule,
            lr_policy=lr_policy,
            epochs=config.epochs,
            learning_rate=config.learning_rate,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            max_micro_batch_size=config.max_micro_batch_size,
            batch_size_multiple=multiple,
            eval_every=config.eval_every,
            seed=config.seed,
        )
        runs[name]["lr_at_milestones"] = [lr_policy(m * total) for m in (0.0, *config.milestones)]
        runs[name]["batch_at_milestones"] = [batch_schedule(m * total) for m in (0.0, *config.milestones)]
    a, b, c = runs["decaying_lr"], runs["increasing_batch"], runs["hybrid"]
    summary = {
        "eval_loss_rel_diff_increasing_vs_decay": (b["eval_loss"] - a["eval_loss"]) / a["eval_loss"],
        "eval_loss_rel_diff_hybrid_vs_decay": (c["eval_loss"] - a["eval_loss"]) / a["eval_loss"],
        "update_ratio_decay_over_increasing": a["optimizer_steps"] / b["optimizer_steps"],
        "update_ratio_decay_over_hybrid": a["optimizer_steps"] / c["optimizer_steps"],
    }
    summary["target_met"] = bool(
        summary["eval_loss_rel_diff_increasing_vs_decay"] <= 0.02
        and summary["update_ratio_decay_over_increasing"] >= 2.5
    )
    result = {
        "experiment": "smith",
        "paper": "Smith, Kindermans, Ying & Le, Don't Decay the Learning Rate, Increase the Batch Size, ICLR 2018",
        "config": asdict(config),
        "task": {"bayes_eval_loss": task.bayes_eval_loss, "dataset_size": n},
        "runs": runs,
        "summary": summary,
        "target": "increasing_batch eval loss within 2% of decaying_lr with >= 2.5x fewer optimizer updates",
    }
    _write(output_dir, "smith", result)
    if plot:
        _plot_smith(result, pathlib.Path(output_dir) / "smith.png")
    return result


def _plot_smith(result: dict, path: pathlib.Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, run in result["runs"].items():
        hist = run["history"]
        epochs = [h["epoch"] for h in hist]
        axes[0].plot(epochs, [h["batch_size"] for h in hist], label=name, drawstyle="steps-post")
        axes[1].plot(epochs, [h["eval_loss"] for h in hist], label=name)
        axes[2].plot([h["optimizer_steps"] for h in hist], [h["eval_loss"] for h in hist], label=name)
    bayes = result["task"]["bayes_eval_loss"]
    for ax in axes[1:]:
        ax.axhline(bayes, color="grey", linestyle=":", label="teacher (Bayes) loss")
        ax.set_ylabel("eval cross-entropy")
    axes[0].set(xlabel="epochs", ylabel="global batch size", yscale="log", title="batch size")
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
    """Settings of ``reproduce_keskar`` (the paper: SB = 256, LB = 10% of N, Adam, until the loss stops improving)."""

    num_train: int = 2048
    num_eval: int = 4096
    dim: int = 32
    hidden: int = 256
    epochs: float = 60
    small_batch: int = 32
    large_fraction: float = 0.1
    learning_rate: float = 1e-3
    temperature: float = 0.5
    alphas: int = 31
    keskar_eps: float = 1e-3
    seed: int = 0

    @classmethod
    def quick(cls) -> KeskarConfig:
        return cls(num_train=320, num_eval=320, hidden=32, epochs=4, small_batch=16, alphas=7)


def interpolate_state(state_sb: dict, state_lb: dict, alpha: float) -> dict:
    """The state dict of ``w(alpha) = alpha * w_LB + (1 - alpha) * w_SB`` (non-float entries come from ``w_SB``).

    Written as the paper's formula, not ``torch.lerp``, so that ``alpha = 0`` gives exactly ``w_SB`` and
    ``alpha = 1`` exactly ``w_LB``:

    >>> sb, lb = {"w": torch.tensor([0.1, -3.0])}, {"w": torch.tensor([0.7, 2.5])}
    >>> torch.equal(interpolate_state(sb, lb, 0.0)["w"], sb["w"]), torch.equal(interpolate_state(sb, lb, 1.0)["w"], lb["w"])
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


def _sharpness(model: nn.Module, batches: Sequence[dict], config: KeskarConfig) -> dict:
    from ..probes.sharpness import estimate_sharpness

    start = time.perf_counter()
    out = estimate_sharpness(
        model, batches, ("avg", "lambda_max", "keskar"), eps=config.keskar_eps, subspace_dim=None, seed=config.seed
    )
    subspace = estimate_sharpness(
        model, batches, ("keskar",), eps=config.keskar_eps, subspace_dim=100, seed=config.seed
    )
    out["keskar_subspace100"] = subspace["keskar"]
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def reproduce_keskar(output_dir: str | os.PathLike, config: KeskarConfig | None = None, plot: bool = True) -> dict:
    """Keskar et al. 2017: small batch (SB) vs large batch (LB = 10% of N), same model, epochs and optimizer (Adam).

    Measures, at the end of each run, ``estimate_sharpness`` on the training loss (``avg``, ``lambda_max`` and
    Keskar's metric 2.1 with ``eps`` in the full space and in a random 100-dim subspace), the train-eval loss and
    accuracy gap, and the parametric plot (train and eval loss along ``w(a) = a w_LB + (1 - a) w_SB``,
    ``a`` in ``[-1, 2]``). Writes ``keskar.json`` and ``keskar_parametric.png``; ``summary`` says whether the paper's
    direction (LB sharper, with a larger generalisation gap) holds here.
    """
    config = config or KeskarConfig()
    task = make_teacher_task(
        config.num_train, config.num_eval, dim=config.dim, temperature=config.temperature, seed=config.seed
    )
    large = max(config.small_batch, round(config.large_fraction * config.num_train))
    runs, states = {}, {}
    train_batches = task.batches("train", 512)
    eval_batches = task.batches("eval", 1024)
    for name, batch_size in (("small_batch", config.small_batch), ("large_batch", large)):
        model = MLPClassifier(config.dim, 10, hidden=config.hidden, seed=config.seed)
        run = train_classifier(
            model,
            task,
            batch_schedule=batch_size,
            epochs=config.epochs,
            learning_rate=config.learning_rate,
            optimizer="adam",
            max_micro_batch_size=batch_size,
            batch_size_multiple=1,
            eval_every=max(1.0, config.epochs / 20),
            seed=config.seed,
        )
        run["batch_size"] = batch_size
        run["generalization_gap_loss"] = run["eval_loss"] - run["train_loss"]
        run["generalization_gap_accuracy"] = run["train_accuracy"] - run["eval_accuracy"]
        run["sharpness"] = _sharpness(model, train_batches, config)
        runs[name] = run
        states[name] = {key: value.clone() for key, value in model.state_dict().items()}
    alphas = torch.linspace(-1.0, 2.0, config.alphas).tolist()
    line = line_losses(
        MLPClassifier(config.dim, 10, hidden=config.hidden, seed=config.seed),
        states["small_batch"],
        states["large_batch"],
        alphas,
        {"train": train_batches, "eval": eval_batches},
    )
    sb, lb = runs["small_batch"], runs["large_batch"]
    sharper = {
        metric: bool(lb["sharpness"][metric] > sb["sharpness"][metric])
        for metric in ("avg", "lambda_max", "keskar", "keskar_subspace100")
    }
    summary = {
        "lb_sharper": sharper,
        "lb_larger_gap": bool(lb["generalization_gap_loss"] > sb["generalization_gap_loss"]),
        "lb_higher_eval_loss": bool(lb["eval_loss"] > sb["eval_loss"]),
        "sharpness_ratio_lb_over_sb": {
            metric: _ratio(lb["sharpness"][metric], sb["sharpness"][metric]) for metric in sharper
        },
    }
    summary["paper_direction_holds"] = bool(all(sharper.values()) and summary["lb_larger_gap"])
    result = {
        "experiment": "keskar",
        "paper": "Keskar et al., On Large-Batch Training for Deep Learning: Generalization Gap and Sharp Minima, "
        "ICLR 2017",
        "config": asdict(config),
        "task": {"bayes_eval_loss": task.bayes_eval_loss, "dataset_size": config.num_train},
        "runs": runs,
        "parametric_plot": line,
        "summary": summary,
    }
    _write(output_dir, "keskar", result)
    if plot:
        _plot_keskar(result, pathlib.Path(output_dir) / "keskar_parametric.png")
    return result


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
    fig.suptitle("Keskar et al. 2017 parametric plot (teacher-student MLP, Adam)", y=0.99)
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


def reproduce_bjorck(output_dir: str | os.PathLike, quick: bool = False, rerun: bool = True) -> dict:
    """Bjorck et al. 2018: run ``benchmarks/bench_bjorck.py`` (``--quick`` passed on) and summarise its JSON.

    The summary lists, with and without BN, the learning rates that trained and those that diverged, and the
    activation growth with depth of the diverging runs, as far as the benchmark's JSON reports them (the raw JSON
    is kept under ``benchmark``). Writes ``bjorck_summary.json`` (not ``bjorck.json``, the benchmark's own file).
    """
    script = REPO_ROOT / "benchmarks" / "bench_bjorck.py"
    source = REPO_ROOT / "benchmarks" / "results" / "bjorck.json"
    if rerun or not source.is_file():
        _run_script(script, ["--quick"] if quick else [])
    if not source.is_file():
        raise FileNotFoundError(f"{script.name} ran but wrote no {source}")
    benchmark = json.loads(source.read_text())
    result = {
        "experiment": "bjorck",
        "paper": "Bjorck, Gomes, Selman & Weinberger, Understanding Batch Normalization, NeurIPS 2018",
        "source": str(source.relative_to(REPO_ROOT)),
        "command": f"python benchmarks/bench_bjorck.py{' --quick' if quick else ''}",
        "summary": summarise_bjorck(benchmark),
        "benchmark": benchmark,
    }
    _write(output_dir, "bjorck_summary", result)
    return result


def summarise_bjorck(benchmark: dict) -> dict:
    """Pick the LR ranges and the depth-wise activation growth out of ``bench_bjorck.py``'s JSON.

    Tolerant of the layout: it keeps any top-level entry whose key mentions ``lr``, ``range``, ``diverg``,
    ``activation``, ``depth``, ``summary`` or ``target``.
    """
    keep = ("lr", "range", "diverg", "activation", "depth", "summary", "target", "train")
    return {key: value for key, value in benchmark.items() if any(word in key.lower() for word in keep)}


# name -> (results file, [(label, key path, unit)], command)
OVERHEAD_SOURCES: dict[str, tuple[str, list[tuple[str, str, str]], str]] = {
    "trainer": (
        "trainer.json",
        [
            ("BatchRampTrainer / Trainer throughput at a constant batch", "throughput_ratio_ramp_over_plain", "x"),
            ("peak memory, ramp 8->256 (micro 8) / constant 8", "memory_ratio_ramp8to256_over_const8", "x"),
            (
                "peak memory, constant 256 in one chunk / constant 8",
                "memory_ratio_const256_one_chunk_over_const8",
                "x",
            ),
        ],
        "python benchmarks/bench_trainer.py",
    ),
    "sharpness": (
        "sharpness.json",
        [
            ("SharpnessProbeCallback overhead at default cadence", "callback_overhead.overhead_percent", "%"),
            ("Lanczos vs power iteration HVPs to 1% of lambda_max", "lanczos_vs_power.hvp_ratio", "x"),
        ],
        "python benchmarks/bench_sharpness.py",
    ),
    "noise_scale": (
        "noise_scale.json",
        [("NoiseScaleCallback overhead", "overhead_percent", "%")],
        "python benchmarks/bench_noise_scale.py",
    ),
    "stability": (
        "stability.json",
        [("stability monitor overhead", "overhead_percent", "%")],
        "python benchmarks/bench_stability.py",
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
    return f"{value:.3g}" if isinstance(value, float) else str(value)


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
