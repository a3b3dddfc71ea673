"""The one plotting helper: every figure of the package (benchmarks, reproductions, ``hf-batchsched plot``).

Nothing else imports matplotlib. ``new_figure`` selects the non-interactive Agg backend and makes the figure and its
axes; ``style_axes`` sets titles, labels, log scales, the grid and the legend; ``save_figure`` writes one PNG
(creating its folder) and closes the figure. ``plot_curves`` draws named ``(x, y)`` curves in one figure;
``plot_lr_and_batch`` the two panels of ``hf-batchsched plot`` (LR and batch size against samples).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

__all__ = ["new_figure", "panel_row", "plot_curves", "plot_lr_and_batch", "save_figure", "style_axes"]


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kwargs):
    """``(figure, axes)`` of a new figure on the Agg backend (``kwargs`` go to ``matplotlib.pyplot.subplots``).

    >>> import tempfile
    >>> figure, axes = new_figure(1, 2, figsize=(4, 2))
    >>> len(axes), type(figure).__name__
    (2, 'Figure')
    >>> save_figure(figure, os.path.join(tempfile.mkdtemp(), "empty.png")).endswith("empty.png")
    True
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=figsize, **kwargs)


def panel_row(count: int, *, width: float = 5, height: float = 4):
    """``(figure, axes)``: ``count`` panels side by side, ``width`` x ``height`` inches each (``axes`` a list)."""
    figure, axes = new_figure(1, count, figsize=(width * count, height), squeeze=False)
    return figure, list(axes[0])


def style_axes(
    axes,
    *,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    logx: bool = False,
    logy: bool = False,
    grid: bool = True,
    legend: bool = True,
    legend_fontsize: str | int | None = "small",
    **legend_kwargs,
) -> None:
    """Title, axis labels, log scales, a light grid and the legend of one ``axes`` (``None``/``False``: left as is)."""
    if title is not None:
        axes.set_title(title)
    if xlabel is not None:
        axes.set_xlabel(xlabel)
    if ylabel is not None:
        axes.set_ylabel(ylabel)
    if logx:
        axes.set_xscale("log")
    if logy:
        axes.set_yscale("log")
    if grid:
        axes.grid(alpha=0.3)
    if legend:
        axes.legend(fontsize=legend_fontsize, **legend_kwargs)


def save_figure(figure, path: str | os.PathLike, *, dpi: int = 120, tight: bool = True) -> str:
    """Save ``figure`` to ``path`` (creating its folder) and close it; returns ``path`` as a string.

    ``tight`` applies ``tight_layout`` first (leave it off for a figure made with ``constrained_layout``).
    """
    import matplotlib.pyplot as plt

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if tight:
        figure.tight_layout()
    figure.savefig(path, dpi=dpi)
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

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "curves.png")
    >>> plot_curves({"a": ([0, 1], [1.0, 0.5])}, path, title="t", xlabel="step", ylabel="lr") == path
    True
    """
    figure, axes = new_figure(figsize=(7, 4.5))
    for name, (xs, ys) in curves.items():
        (line,) = axes.plot(list(xs), list(ys), label=name)
        if extra and name in extra and len(extra[name][0]):
            axes.plot(list(extra[name][0]), list(extra[name][1]), linestyle="--", marker="o", color=line.get_color())
    style_axes(axes, title=title, xlabel=xlabel, ylabel=ylabel, logy=logy)
    return save_figure(figure, path)


def plot_lr_and_batch(
    path: str,
    samples: Sequence[float],
    batch_sizes: Sequence[int],
    *,
    lr: Sequence[float] | None = None,
    lr_label: str = "LR",
    original_lr: Sequence[float] | None = None,
    baseline_batch_size: int | None = None,
    title: str = "",
    xlabel: str = "samples seen",
) -> str:
    """``hf-batchsched plot``'s figure: the LR (top; log scale when it spans more than 50x) and the global batch
    size (bottom) against ``samples``, step-wise; ``original_lr`` and ``baseline_batch_size`` dashed for comparison.

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "schedule.png")
    >>> plot_lr_and_batch(path, [0, 1, 2], [8, 8, 16], lr=[1.0, 0.5, 0.5], title="3 steps") == path
    True
    """
    fig, (ax_lr, ax_batch) = new_figure(2, 1, sharex=True, figsize=(7, 5.5), constrained_layout=True)
    if lr is not None:
        ax_lr.plot(samples, lr, drawstyle="steps-post", label=lr_label)
        if original_lr is not None:
            ax_lr.plot(samples, original_lr, "--", drawstyle="steps-post", label="original LR (constant batch)")
        positive = [v for v in list(lr) + list(original_lr or []) if v > 0]
        if positive and max(positive) / min(positive) > 50:
            ax_lr.set_yscale("log")
        ax_lr.legend(loc="best", fontsize="small")
    else:
        ax_lr.text(0.5, 0.5, "no LR policy given", ha="center", va="center", transform=ax_lr.transAxes)
    ax_lr.set_ylabel("learning rate")
    ax_batch.plot(samples, batch_sizes, drawstyle="steps-post", color="tab:orange")
    if baseline_batch_size is not None:
        label = f"original constant batch ({baseline_batch_size})"
        ax_batch.axhline(baseline_batch_size, linestyle="--", color="tab:gray", label=label)
        ax_batch.legend(loc="best", fontsize="small")
    style_axes(ax_batch, ylabel="global batch size", xlabel=xlabel, legend=False)
    style_axes(ax_lr, title=title, legend=False)
    return save_figure(fig, path, dpi=110, tight=False)
