"""Run and report helpers shared by the reproductions: quiet CPU ``TrainingArguments``, seed statistics, JSON."""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Callable, Sequence

__all__ = ["jsonable", "mean_std", "quiet_cpu_args", "ratio", "write_result"]


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


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of ``values``.

    >>> mean_std([1.0, 2.0, 3.0]), mean_std([4.0])
    ((2.0, 1.0), (4.0, 0.0))
    """
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def ratio(numerator: float, denominator: float) -> float | None:
    """``numerator / denominator``, or ``None`` when the denominator is zero or not finite.

    >>> ratio(3.0, 2.0), ratio(1.0, 0.0), ratio(1.0, float("inf"))
    (1.5, None, None)
    """
    return numerator / denominator if denominator and math.isfinite(denominator) else None


def jsonable(value, non_finite: Callable[[float], object] = lambda number: None):
    """``value`` with every key a string and each non-finite float replaced by ``non_finite(number)`` (default
    ``None``: strict JSON; ``str`` keeps ``"inf"`` readable).

    >>> jsonable({1: [float("nan"), 2.0]}), jsonable([float("inf")], non_finite=str)
    ({'1': [None, 2.0]}, ['inf'])
    """
    if isinstance(value, float) and not math.isfinite(value):
        return non_finite(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v, non_finite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, non_finite) for v in value]
    return value


def write_result(output_dir: str | os.PathLike, name: str, result: dict) -> pathlib.Path:
    """Write ``result`` (``jsonable``) to ``<output_dir>/<name>.json``, creating the folder; returns the path."""
    path = pathlib.Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    target = path / f"{name}.json"
    target.write_text(json.dumps(jsonable(result), indent=2, allow_nan=False) + "\n")
    return target
