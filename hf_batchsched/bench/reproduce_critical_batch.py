"""The critical batch size along a language-model run (Merrill et al. 2025): ``reproduce critical-batch``.

``measure`` is the measurement both LM experiments share: an LR sweep at constant ``B0`` (seed 0), ``B_crit``
(branch runs) and the noise scale ``B_simple`` at the best run's checkpoints (``critical_batch_size`` at
``cbs_fractions`` of the data), and the LR range test (``bench.range_test``) on the same task at ``B0``, its
suggestion set against the sweep's best LR. The branches of ``B0`` run at the reference run's LR at the checkpoint
(its peak LR for the initial model), larger batches at ``sqrt(B / B0)`` times that.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pathlib

from ..critical_batch import critical_batch_size
from .common import write_result
from .lm_task import (
    LMConfig,
    Snapshots,
    check_config,
    constant_schedules,
    cosine_policy,
    make_trainer,
    output_name,
    task_data,
    train_run,
)
from .plots import panel_row, save_figure, style_axes
from .range_test import lr_range_test

__all__ = ["measure", "plot_critical_batch", "reproduce_critical_batch"]


def _sweep_and_critical_batch(data: dict, config: LMConfig) -> dict:
    """LR sweep at constant ``B0`` (seed 0) and the critical batch size at the best run's checkpoints."""
    sweep, best = {}, None
    snapshots_by_lr = {}
    for lr in config.lrs:
        snapshots = Snapshots(config.cbs_fractions, config.total_samples)
        run = train_run(
            data,
            config,
            learning_rate=lr,
            seed=config.seeds[0],
            schedules=constant_schedules(config),
            snapshots=snapshots,
        )
        run.pop("model")
        sweep[lr] = run
        snapshots_by_lr[lr] = snapshots
        if best is None or run["eval_loss"] < sweep[best]["eval_loss"]:
            best = lr
    cbs = []
    cosine = cosine_policy(config)
    init = data["make_model"](config.seeds[0])
    for fraction in sorted(config.cbs_fractions):
        mark = round(fraction * config.total_samples)
        model, state, consumed = copy.deepcopy(init), None, 0
        if fraction > 0:
            model_state, state, consumed = snapshots_by_lr[best].store[mark]
            model.load_state_dict(model_state)
        result = critical_batch_size(
            model,
            data["train_rows"],
            data["eval_rows"],
            batch_sizes=config.cbs_batch_sizes,
            budget_samples=config.cbs_budget_samples,
            # the reference run's LR at the checkpoint (the peak for the initial model, before its warmup)
            learning_rate=best * cosine(max(consumed, config.warmup_samples)),
            lr_rule="sqrt",
            tolerance=config.cbs_tolerance,
            optimizer_state=state,
            weight_decay=config.weight_decay,
            seed=config.seeds[0],
        )
        row = result.to_dict()
        row.update(fraction=fraction, samples=consumed, tokens=consumed * config.seq_length)
        row["extra"]["reference_lr"] = best
        cbs.append(row)
    return {"sweep": {str(lr): run for lr, run in sweep.items()}, "best_lr": best, "critical_batch": cbs}


def _lm_range_test(data, config: LMConfig, seed: int) -> dict:
    """``lr_range_test`` at constant ``B0`` from a fresh model: its suggestion, rule, divergence and curve."""
    import shutil

    model = data["make_model"](seed)
    trainer, output_dir = make_trainer(
        model, data, config, learning_rate=1e-3, seed=seed, batch_schedule=config.base_batch_size, lr_policy=None
    )
    try:
        result = lr_range_test(
            trainer, start_lr=1e-5, end_lr=1.0, num_steps=config.range_test_steps, skip_start=2, skip_end=1
        )
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    return {
        "suggestion": result.suggestion,
        "rule": result.rule,
        "safety_factor": result.safety_factor,
        "diverged_at": result.diverged_at,
        "lrs": result.lrs,
        "smoothed_losses": result.smoothed_losses,
    }


def measure(task: str, config: LMConfig) -> tuple[dict, dict]:
    """``(data, measured)`` of one task: the LR sweep, ``B_crit`` along the best run, and the LR range test."""
    data = task_data(task, config)
    measured = _sweep_and_critical_batch(data, config)
    measured["range_test"] = _lm_range_test(data, config, config.seeds[0])
    return data, measured


def reproduce_critical_batch(output_dir: str | os.PathLike, config: LMConfig | None = None, plot: bool = True) -> dict:
    """``B_crit`` (branch runs) and ``B_simple`` (noise scale) along the reference run of each task; also the LR
    sweep and range test on the same task. Writes ``critical_batch.json`` (and ``critical_batch.png``)."""
    config = config or LMConfig()
    check_config(config)
    result = {"config": dataclasses.asdict(config), "tasks": {}}
    for task in config.tasks:
        _, measured = measure(task, config)
        measured["range_test"]["best_sweep_lr"] = measured["best_lr"]
        result["tasks"][task] = measured
    name = output_name("critical_batch", config)
    write_result(output_dir, name, result)
    if plot:
        plot_critical_batch(result, pathlib.Path(output_dir) / f"{name}.png")
    return result


def plot_critical_batch(result: dict, path: pathlib.Path) -> None:
    """``B_crit`` and ``B_simple`` against tokens trained, one panel per task."""
    tasks = result["tasks"]
    figure, axes = panel_row(len(tasks))
    for ax, (task, measured) in zip(axes, tasks.items()):
        rows = measured["critical_batch"]
        tokens = [r["tokens"] / 1e6 for r in rows]
        ax.plot(tokens, [r["b_crit"] for r in rows], marker="o", label="B_crit (branch runs)")
        ax.plot(tokens, [r["noise_scale"] or float("nan") for r in rows], marker="s", label="B_simple (noise scale)")
        style_axes(
            ax,
            title=f"{task}: critical batch size",
            xlabel="tokens trained (M)",
            ylabel="batch size (sequences)",
            logy=True,
        )
    save_figure(figure, str(path))
