"""The shared task and model of the classifier reproductions (Smith, Keskar), and their training run.

The task is a **teacher-student classification** problem (``make_teacher_task``): Gaussian inputs, a random
two-layer teacher whose softmax *samples* the labels, so the Bayes loss is above zero and SGD noise matters at
the end of training, as it does on CIFAR-10. The student is a ReLU MLP (``MLPClassifier``) whose forward takes
``input_ids`` (the float features) and ``labels`` and returns a ``SequenceClassifierOutput`` like a Hugging Face
model. ``train_classifier`` trains it through ``BatchRampTrainer``.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, check_choice, check_positive
from .common import quiet_cpu_args

__all__ = ["MLPClassifier", "TeacherTask", "make_teacher_task", "mean_loss", "train_classifier"]


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
