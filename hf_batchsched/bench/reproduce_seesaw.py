"""Seesaw (Meterez et al. 2025) and a batch warmup to the measured critical batch size, against a tuned constant
batch with cosine decay, on the language-model tasks of ``bench.lm_task``: ``hf-batchsched reproduce seesaw``.

The arms (``arm_schedules``), each at the best LR of ``measure``'s sweep:

- ``constant``: batch ``B0`` throughout (the sweep's best run is its first seed);
- ``seesaw``: ``hf_batchsched.seesaw`` of that cosine policy, batch doubled each time the cosine halves, capped at
  ``max_batch_size``;
- ``cbs_warmup``: batch ``B0 * 2**k`` up to the critical batch size measured at the reference run's checkpoints
  (``cbs_warmup_schedule``), LR coupled ``sqrt``, the same cosine;
- ``seesaw_coupled``: ``seesaw`` plus the weight-decay (constant time scale) and beta (constant half-life) couplings.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

from .common import mean_std, write_result
from .lm_task import LMConfig, check_config, constant_schedules, cosine_policy, output_name, train_run
from .plots import panel_row, save_figure, style_axes
from .reproduce_critical_batch import measure, plot_critical_batch

__all__ = ["ARMS", "arm_schedules", "cbs_warmup_schedule", "reproduce_seesaw"]

ARMS = ("constant", "seesaw", "cbs_warmup", "seesaw_coupled")


def arm_schedules(arm: str, config: LMConfig, cbs_schedule=None) -> dict:
    """``batch_schedule``, ``lr_policy`` and ``couple`` of one of ``ARMS`` (``cbs_schedule``: the warmup's batch)."""
    from ..coupling import Coupling
    from ..schedules.seesaw_pair import seesaw

    if arm == "constant":
        return constant_schedules(config)
    cosine = cosine_policy(config)
    if arm in ("seesaw", "seesaw_coupled"):
        batch, _ = seesaw(
            cosine, config.base_batch_size, config.max_batch_size, warmup=config.warmup_samples, unit="samples"
        )
        couple = Coupling(weight_decay=True, betas=True) if arm == "seesaw_coupled" else None
        return {"batch_schedule": batch, "lr_policy": None, "couple": couple}
    return {"batch_schedule": cbs_schedule, "lr_policy": cosine, "couple": Coupling(lr="sqrt")}


def cbs_warmup_schedule(cbs_rows, config: LMConfig):
    """``PiecewiseBatch``: from each measured point on, ``B0 * 2**k`` up to its ``B_crit`` (never decreasing,
    capped at ``max_batch_size``)."""
    from ..schedules.batch import PiecewiseBatch

    thresholds, sizes, current = [], [], config.base_batch_size
    for row in sorted(cbs_rows, key=lambda r: r["samples"]):
        target = config.base_batch_size
        while target * 2 <= min(row["b_crit"], config.max_batch_size):
            target *= 2
        current = max(current, target)
        if not sizes or current != sizes[-1]:
            thresholds.append(0 if not thresholds else row["samples"])
            sizes.append(current)
    return PiecewiseBatch(tuple(thresholds), tuple(sizes), unit="samples")


def _rel(x: float, ref: float) -> float:
    """Relative difference of ``x`` against ``ref``."""
    return (x - ref) / ref


def reproduce_seesaw(output_dir: str | os.PathLike, config: LMConfig | None = None, plot: bool = True) -> dict:
    """The four arms x seeds on each task (see the module doc). Writes ``seesaw.json`` (and ``seesaw.png``)."""
    config = config or LMConfig()
    check_config(config)
    result = {"config": dataclasses.asdict(config), "tasks": {}}
    for task in config.tasks:
        data, measured = measure(task, config)
        best = measured["best_lr"]
        cbs_schedule = cbs_warmup_schedule(measured["critical_batch"], config)
        arms = {}
        for arm in ARMS:
            runs = []
            for seed in config.seeds:
                if arm == "constant" and seed == config.seeds[0]:
                    runs.append(measured["sweep"][str(best)])  # the sweep's best run is this arm's first seed
                    continue
                run = train_run(
                    data, config, learning_rate=best, seed=seed, schedules=arm_schedules(arm, config, cbs_schedule)
                )
                run.pop("model")
                runs.append(run)
            mean, std = mean_std([r["eval_loss"] for r in runs])
            arms[arm] = {
                "eval_loss": mean,
                "eval_loss_std": std,
                "eval_losses": [r["eval_loss"] for r in runs],
                "optimizer_steps": runs[0]["optimizer_steps"],
                "tokens": runs[0]["tokens"],
                "batch_sizes": runs[0]["batch_sizes"],
                "seconds": sum(r["seconds"] for r in runs),
            }
        arms["cbs_warmup"]["schedule"] = {
            "thresholds": list(cbs_schedule.thresholds),
            "sizes": list(cbs_schedule.sizes),
        }
        a = arms["constant"]
        summary = {}
        for arm in ARMS[1:]:
            summary[arm] = {
                "eval_loss_rel_diff_vs_constant": _rel(arms[arm]["eval_loss"], a["eval_loss"]),
                "step_reduction_vs_constant": 1 - arms[arm]["optimizer_steps"] / a["optimizer_steps"],
            }
        s = summary["seesaw"]
        summary["target_met"] = s["eval_loss_rel_diff_vs_constant"] <= 0.005 and s["step_reduction_vs_constant"] >= 0.3
        measured.update(arms=arms, summary=summary)
        result["tasks"][task] = measured
    name = output_name("seesaw", config)
    write_result(output_dir, name, result)
    if plot:
        _plot_seesaw(result, pathlib.Path(output_dir) / f"{name}.png")
        plot_critical_batch(result, pathlib.Path(output_dir) / f"{name}_critical_batch.png")
    return result


def _plot_seesaw(result: dict, path: pathlib.Path) -> None:
    tasks = result["tasks"]
    figure, axes = panel_row(len(tasks))
    for ax, (task, measured) in zip(axes, tasks.items()):
        for arm, cell in measured["arms"].items():
            ax.errorbar(
                [cell["optimizer_steps"]],
                [cell["eval_loss"]],
                yerr=[cell["eval_loss_std"]],
                fmt="o",
                capsize=4,
                label=arm,
            )
        style_axes(ax, title=task, xlabel="optimizer steps (equal tokens)", ylabel="final eval loss (mean +- std)")
    save_figure(figure, str(path))
