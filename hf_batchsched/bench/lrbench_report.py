"""The lrbench reports: ``results.md``, ``results.csv``, ``results.json`` and the LR and loss curves."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from dataclasses import asdict

from .lrbench_config import METRIC_NAMES
from .plots import plot_curves

__all__ = ["TABLE_COLUMNS", "write_reports"]

TABLE_COLUMNS = ("rank", "name", "utility", "round", *METRIC_NAMES)


def _format(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_reports(ranking: list, all_runs: list, config: Mapping, output_dir: str) -> dict:
    """Write ``results.md``, ``results.csv``, ``results.json``, ``lr_curves.png`` and ``loss_curves.png``."""

    rows = [
        {"rank": i + 1, "name": r.name, "utility": r.utility, "round": r.round, **r.metrics()}
        for i, r in enumerate(ranking)
    ]
    paths = {
        name: os.path.join(output_dir, name)
        for name in ("results.md", "results.csv", "results.json", "lr_curves.png", "loss_curves.png")
    }
    with open(paths["results.csv"], "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with open(paths["results.json"], "w") as file:
        json.dump(
            {
                "rank_by": config["rank_by"],
                "rank_mode": config["rank_mode"],
                "ranking": rows,
                "runs": [asdict(run) for run in all_runs],
                "config": config,
            },
            file,
            indent=2,
            default=str,
        )
    lines = [
        "# LRBench results",
        "",
        f"Ranked by `{config['rank_by']}` ({'lower' if config['rank_mode'] == 'min' else 'higher'} is better)"
        + (", successive halving" if config["halving"] else "")
        + f"; {config['training']['max_steps']} optimizer updates in the first round, seed {config['seed']}.",
        "",
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|" + "---|" * len(TABLE_COLUMNS),
    ]
    lines += ["| " + " | ".join(_format(row[column]) for column in TABLE_COLUMNS) + " |" for row in rows]
    lines += ["", "Policies:", ""]
    lines += [f"- `{r.name}`: `{json.dumps(r.policy)}`" for r in ranking]
    with open(paths["results.md"], "w") as file:
        file.write("\n".join(lines) + "\n")
    final_runs = {r.name: r for r in ranking}
    plot_curves(
        {name: (range(1, len(r.curves["lr"]) + 1), r.curves["lr"]) for name, r in final_runs.items()},
        paths["lr_curves.png"],
        title="Learning rate (group 0) per optimizer update",
        xlabel="optimizer update",
        ylabel="learning rate",
    )
    plot_curves(
        {name: tuple(zip(*r.curves["train_loss"])) for name, r in final_runs.items()},
        paths["loss_curves.png"],
        title="Training loss (solid) and eval loss (dashed, markers)",
        xlabel="optimizer update",
        ylabel="loss",
        extra={name: tuple(zip(*r.curves["eval_loss"])) for name, r in final_runs.items()},
    )
    return paths
