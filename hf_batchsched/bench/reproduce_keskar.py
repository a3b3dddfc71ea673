"""Keskar et al., ICLR 2017 (large-batch training finds sharp minima) on the teacher-student task.

``reproduce_keskar`` trains a small- and a large-batch solution per seed, measures their sharpness and
generalisation gap, and draws the parametric plot between them (``line_losses``); it writes ``keskar.json`` and
``keskar_parametric.png``. ``hf-batchsched reproduce keskar`` runs it.
"""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .common import mean_std, ratio, write_result
from .plots import new_figure, save_figure
from .task import MLPClassifier, make_teacher_task, mean_loss, train_classifier

__all__ = [
    "KESKAR_METRICS",
    "KeskarConfig",
    "interpolate_state",
    "line_losses",
    "parametric_alphas",
    "reproduce_keskar",
]


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
            runs[name][key], runs[name][f"{key}_std"] = mean_std([r[key] for r in records])
        runs[name]["sharpness"] = {m: mean_std([r["sharpness"][m] for r in records])[0] for m in KESKAR_METRICS}
        runs[name]["sharpness_std"] = {m: mean_std([r["sharpness"][m] for r in records])[1] for m in KESKAR_METRICS}
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
            metric: ratio(lb["sharpness"][metric], sb["sharpness"][metric]) for metric in KESKAR_METRICS
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
        "task": {"bayes_eval_loss": mean_std(bayes)[0], "dataset_size": config.num_train, "large_batch": large},
        "runs": runs,
        "parametric_plot": line,
        "parametric_plot_seed": config.seeds[0],
        "summary": summary,
    }
    write_result(output_dir, "keskar", result)
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


def _plot_keskar(result: dict, path: pathlib.Path) -> None:
    line = result["parametric_plot"]
    fig, ax = new_figure(figsize=(6.5, 4.5))
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
    save_figure(fig, path, dpi=90)
