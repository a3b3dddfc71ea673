"""Plotting helpers shared by the LR benchmark and the range test (matplotlib, Agg backend, one figure per file)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

__all__ = ["plot_curves", "save_figure"]


def save_figure(figure, path: str) -> str:
    """Save ``figure`` to ``path`` (creating its folder) and close it; returns ``path``."""
    import matplotlib.pyplot as plt

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logy: bool = False,
    extra: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> str:
    """One line per named ``(x, y)`` curve in a single figure saved to ``path``.

    ``extra`` curves (e.g. evaluation losses next to training losses) are drawn dashed in the same colour as the
    curve of the same name.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "curves.png")
    >>> plot_curves({"a": ([0, 1], [1.0, 0.5])}, path, title="t", xlabel="step", ylabel="lr") == path
    True
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, (xs, ys) in curves.items():
        (line,) = axes.plot(list(xs), list(ys), label=name)
        if extra and name in extra and len(extra[name][0]):
            axes.plot(list(extra[name][0]), list(extra[name][1]), linestyle="--", marker="o", color=line.get_color())
    if logy:
        axes.set_yscale("log")
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    return save_figure(figure, path)
