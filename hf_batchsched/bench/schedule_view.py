"""A simulated run's schedules as ``hf-batchsched plot`` shows them: a table of progress, LR, batch size and steps
(``describe_run``, ``format_run_table``) and the two-panel figure (``draw_run``).

``built`` is the command's view of a run: ``run`` (``SimulatedRun``), ``lr_policy`` and ``original_lr`` (the policy
before a batch-growth conversion, or ``None``), ``baseline_run`` (the constant-batch run, or ``None``),
``dataset_size``, ``base_lr`` and ``tokens_per_sample``.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..schedules.base import Policy
from ..schedules.lr import lr_at
from ..schedules.simulate import SimulatedRun
from .plots import plot_lr_and_batch

__all__ = ["describe_run", "draw_run", "format_run_table", "lr_at_step", "scheduled_size"]


def lr_at_step(policy: Policy, run: SimulatedRun, index: int, base_lr: float, tokens_per_sample) -> float:
    """The LR of step ``index``: the policy read on its own clock at the step's start."""
    start = run.step_start(index)
    if policy.unit == "samples":
        t = start
    elif policy.unit == "steps":
        t = index
    elif policy.unit == "tokens":
        if not tokens_per_sample:
            raise ConfigError("a tokens-unit LR policy needs --tokens-per-sample")
        t = start * tokens_per_sample
    else:
        t = start / run.total_samples if run.total_samples else 0.0
    return lr_at(policy, t, base_lr)


def scheduled_size(run: SimulatedRun, index: int) -> int:
    """The scheduled size of step ``index`` (a partial last step shows the size it was cut from)."""
    if index == run.num_steps - 1 and run.last_step_scheduled is not None:
        return run.last_step_scheduled
    return run.step_sizes[index]


def describe_run(
    lr_policy: Policy | None,
    run: SimulatedRun,
    *,
    rows: int = 11,
    dataset_size: int | None = None,
    base_lr: float = 1.0,
    tokens_per_sample: float | None = None,
) -> list[dict]:
    """Rows of the table: progress, samples, epochs, LR, batch size and optimizer steps so far.

    Row ``i`` looks at sample ``s = total * i / (rows - 1)``; ``lr`` and ``batch_size`` are those of the optimizer
    step that consumes it (the last step at 100%; a partial last step shows its scheduled size); ``steps`` counts the
    steps completed before ``s`` (all of them at 100%).

    Args:
        lr_policy (`Policy`, *optional*): the LR policy (``None`` leaves the LR column empty).
        run (`SimulatedRun`): ``simulate(batch_schedule, total_samples, ...)``.
        rows (`int`, *optional*, defaults to `11`): rows evenly spaced in progress, 0% and 100% included.
        dataset_size (`int`, *optional*): samples per epoch, for the epochs column.
        base_lr (`float`, *optional*, defaults to `1.0`): the optimizer LR that multiplier policies scale.
        tokens_per_sample (`float`, *optional*): for tokens-unit LR policies.

    >>> from hf_batchsched.schedules import PiecewiseBatch, simulate
    >>> run = simulate(PiecewiseBatch.parse("0:10 50:20"), 100)
    >>> [(r["samples"], r["batch_size"], r["steps"]) for r in describe_run(None, run, rows=3)]
    [(0, 10, 0), (50, 20, 5), (100, 20, 8)]
    """
    if rows < 2:
        raise ConfigError(f"--rows must be >= 2, got {rows}")
    if not run.num_steps:
        raise ConfigError("the run has no optimizer steps; give a positive --samples")
    table = []
    for i in range(rows):
        samples = round(run.total_samples * i / (rows - 1))
        index = run.step_index_at(samples)
        table.append(
            {
                "progress": i / (rows - 1),
                "samples": samples,
                "epochs": samples / dataset_size if dataset_size else None,
                "lr": lr_at_step(lr_policy, run, index, base_lr, tokens_per_sample) if lr_policy else None,
                "batch_size": scheduled_size(run, index),
                "steps": run.steps_done_at(samples) if samples < run.total_samples else run.num_steps,
            }
        )
    return table


def format_run_table(table: list[dict], built: dict) -> str:
    """``describe_run``'s rows as aligned text, then a line on the steps (and the constant-batch run's steps)."""
    run = built["run"]
    header = ["progress", "samples"] + (["epochs"] if built["dataset_size"] else []) + ["lr", "batch", "steps"]
    lines = []
    for row in table:
        cells = [f"{row['progress']:.0%}", f"{row['samples']:,}"]
        if built["dataset_size"]:
            cells.append(f"{row['epochs']:.4g}")
        cells += ["-" if row["lr"] is None else f"{row['lr']:.4g}", str(row["batch_size"]), f"{row['steps']:,}"]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(header)]
    out = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    out += ["  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in lines]
    summary = f"optimizer steps: {run.num_steps:,} for {run.samples_consumed:,} samples"
    if run.dropped_samples:
        summary += f" ({run.dropped_samples:,} dropped)"
    if run.last_step_scheduled is not None:
        summary += f"; last step partial ({run.step_sizes[-1]:,} of {run.last_step_scheduled:,})"
    if built["baseline_run"] is not None:
        base = built["baseline_run"].num_steps
        summary += f"; the constant-batch LR-decay run takes {base:,} ({base / max(run.num_steps, 1):.2f}x as many)"
    out.append(summary)
    return "\n".join(out)


def draw_run(built: dict, path: str) -> None:
    """The run's LR and batch size at 601 points of its samples, drawn by ``plots.plot_lr_and_batch`` to ``path``."""
    run, base = built["run"], built["baseline_run"]
    points = [run.total_samples * i / 600 for i in range(601)]
    indices = [run.step_index_at(x) for x in points]
    lr = original = None
    if built["lr_policy"] is not None:
        extra = (built["base_lr"], built["tokens_per_sample"])
        lr = [lr_at_step(built["lr_policy"], run, i, *extra) for i in indices]
        if built["original_lr"] is not None:
            original = [lr_at_step(built["original_lr"], base, base.step_index_at(x), *extra) for x in points]
    title = f"{run.num_steps:,} optimizer steps"
    if base is not None:
        title += f" (constant batch: {base.num_steps:,})"
    plot_lr_and_batch(
        path,
        points,
        [scheduled_size(run, i) for i in indices],
        lr=lr,
        lr_label="LR with batch growth" if built["original_lr"] is not None else "LR",
        original_lr=original,
        baseline_batch_size=base.step_sizes[0] if base is not None else None,
        title=title,
        xlabel="samples seen" + (f" (1 epoch = {built['dataset_size']:,})" if built["dataset_size"] else ""),
    )
