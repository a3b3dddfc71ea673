"""Smith et al., ICLR 2018 ("Don't Decay the Learning Rate, Increase the Batch Size") on the teacher-student task.

``reproduce_smith`` trains the same MLP and epochs under step LR decay, an increasing batch and the hybrid
(``smith_schedules``) through ``BatchRampTrainer`` and writes ``smith.json`` and ``smith.png``;
``hf-batchsched reproduce smith`` runs it.
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import asdict, dataclass

from ..errors import ConfigError
from .common import mean_std, write_result
from .plots import new_figure, save_figure
from .task import MLPClassifier, make_teacher_task, train_classifier

__all__ = ["SMITH_RUNS", "SmithConfig", "reproduce_smith", "smith_schedules"]


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
        mean, std = mean_std(eval_losses)
        history = [
            {**points[0], "eval_loss": mean_std([p["eval_loss"] for p in points])[0]}
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
            "train_loss": mean_std([r["train_loss"] for r in records])[0],
            "eval_accuracy": mean_std([r["eval_accuracy"] for r in records])[0],
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
            "bayes_eval_loss": mean_std(bayes)[0],
            "bayes_eval_loss_per_seed": bayes,
            "dataset_size": config.num_train,
            "total_samples": total,
        },
        "runs": runs,
        "summary": summary,
        "target": "increasing_batch mean eval loss within 2% of decaying_lr with >= 2.5x fewer optimizer updates",
    }
    write_result(output_dir, "smith", result)
    if plot:
        _plot_smith(result, pathlib.Path(output_dir) / "smith.png")
    return result


def _plot_smith(result: dict, path: pathlib.Path) -> None:
    fig, axes = new_figure(1, 3, figsize=(14, 4))
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
    save_figure(fig, path, dpi=90)
