"""Bjorck et al., NeurIPS 2018 ("Understanding Batch Normalization"): a deep MLP on digits, with and without BN.

BN's benefit is the larger learning rate it allows: without BN, activations grow geometrically with depth at large
step sizes and the loss diverges. ``bjorck_sweep`` reproduces the shape of that result on a CPU in well under 3
minutes:

- model: ``depth`` blocks of Linear(width) [-> BatchNorm1d] -> ReLU, then a linear head; SGD + momentum 0.9;
- data: scikit-learn's 8x8 digits (1437 train / 360 test), standardised (scikit-learn is needed for this one);
- grid: learning rates 1e-4 .. 3, ``steps`` steps each, batch 64, seed 0;
- per run: whether it diverged (a non-finite loss, or a loss above 10x the initial one), final train loss
  (mean of the last 20 steps), test accuracy, Bjorck's one-step "relative loss" at initialisation (loss after
  one step / loss before, same minibatch; Fig. 3), and the depth profile (``activation_profile``: RMS of each
  block's output, its log-RMS slope) on the first diverging step, or at the end.

``write_bjorck_sweep`` writes the sweep's JSON and figure (``benchmarks/bench_bjorck.py`` is its command line);
``reproduce_bjorck`` runs it (or reads a committed JSON) and writes ``summarise_bjorck``'s summary, the
``hf-batchsched reproduce bjorck`` experiment.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..probes.stability import activation_profile
from .common import write_result
from .plots import new_figure, save_figure

__all__ = [
    "BJORCK_QUICK_ARGS",
    "DeepMLP",
    "LEARNING_RATES",
    "bjorck_sweep",
    "format_bjorck_table",
    "reproduce_bjorck",
    "summarise_bjorck",
    "write_bjorck_sweep",
]

LEARNING_RATES = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0]


class Block(nn.Module):
    def __init__(self, width: int, batchnorm: bool):
        super().__init__()
        self.linear = nn.Linear(width, width, bias=not batchnorm)
        self.norm = nn.BatchNorm1d(width) if batchnorm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.linear(x)))


class DeepMLP(nn.Module):
    def __init__(self, depth: int, width: int, batchnorm: bool):
        super().__init__()
        self.stem = nn.Linear(64, width)
        self.blocks = nn.ModuleList(Block(width, batchnorm) for _ in range(depth))
        self.head = nn.Linear(width, 10)
        for module in self.modules():  # He initialisation (as in Bjorck et al.'s ResNets): variance-preserving
            if isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def load_digits_tensors():
    """scikit-learn's 8x8 digits, shuffled (seed 0), standardised on the 1437 training rows: ``(x, y, x, y)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # scikit-learn is not a dependency of the package, only of this experiment
        raise ImportError(
            "the Bjorck experiment needs scikit-learn for its digits data: pip install scikit-learn"
        ) from error

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    permutation = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[permutation], y[permutation]
    split = 1437
    mean, std = x[:split].mean(0), x[:split].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    return x[:split], y[:split], x[split:], y[split:]


def relative_loss_at_init(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
    """Bjorck Fig. 3: loss after one plain SGD step of size ``lr`` / loss before, same minibatch (model copied)."""

    probe = copy.deepcopy(model).train()
    loss_fn = nn.CrossEntropyLoss()
    before = loss_fn(probe(x), y)
    probe.zero_grad()
    before.backward()
    with torch.no_grad():
        for p in probe.parameters():
            p -= lr * p.grad
        after = loss_fn(probe(x), y)
    return float((after / before).detach())


def train_one(batchnorm: bool, lr: float, depth: int, width: int, steps: int, data) -> dict:
    """One run of the sweep (seed 0): status, losses, accuracy and depth profiles (see the module doc)."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(0)
    model = DeepMLP(depth, width, batchnorm)
    generator = torch.Generator().manual_seed(1)
    probe_batch = x_train[:256]
    relative = relative_loss_at_init(model, x_train[:128], y_train[:128], lr)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    blocks = [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]
    init_profile = activation_profile(model.eval(), probe_batch, blocks=blocks)
    losses: list[float] = []
    initial_loss = None
    diverged_at = None
    profile = None
    for step in range(steps):
        index = torch.randint(0, len(y_train), (64,), generator=generator)
        model.train()
        loss = loss_fn(model(x_train[index]), y_train[index])
        value = loss.item()
        initial_loss = value if initial_loss is None else initial_loss
        losses.append(value)
        if not math.isfinite(value) or value > 10 * initial_loss:
            diverged_at = step
            # Depth profile on the diverging step, in training mode (as the step itself ran).
            profile = activation_profile(model, x_train[index], blocks=blocks)
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if profile is None:
        profile = activation_profile(model.eval(), probe_batch, blocks=blocks)
    with torch.no_grad():
        accuracy = float((model.eval()(x_test).argmax(-1) == y_test).float().mean())
    final = sum(losses[-20:]) / len(losses[-20:])
    if diverged_at is not None:
        status = "diverged"
    elif final > 0.9 * initial_loss:
        status = "stalled"
    else:
        status = "trained"
    return {
        "batchnorm": batchnorm,
        "lr": lr,
        "status": status,
        "diverged": diverged_at is not None,
        "diverged_at_step": diverged_at,
        "final_train_loss": final if diverged_at is None else None,
        "test_accuracy": accuracy if diverged_at is None else None,
        "relative_loss_one_step_at_init": relative,
        "initial_log10_rms_by_depth": [math.log10(v) if v > 0 else None for v in init_profile.rms],
        "log10_rms_by_depth": [math.log10(v) if v > 0 and math.isfinite(v) else None for v in profile.rms],
        "log_rms_slope": profile.log_rms_slope,
        "activation_growth": profile.growth,
    }


def plot_bjorck(results: list[dict], path: str | os.PathLike, depth: int) -> None:
    """Final train loss against LR (x: diverged) and the depth profile of a few runs, side by side."""
    fig, (left, right) = new_figure(1, 2, figsize=(11, 4))
    for batchnorm, color in ((True, "tab:blue"), (False, "tab:red")):
        rows = [r for r in results if r["batchnorm"] == batchnorm]
        label = "with BN" if batchnorm else "no BN"
        ok = [r for r in rows if not r["diverged"]]
        left.plot([r["lr"] for r in ok], [r["final_train_loss"] for r in ok], "o-", color=color, label=label)
        bad = [r for r in rows if r["diverged"]]
        left.plot(
            [r["lr"] for r in bad], [3.0] * len(bad), "x", color=color, markersize=10, label=f"{label}: diverged"
        )
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("learning rate")
    left.set_ylabel("final train loss (x = diverged)")
    left.set_title(f"{depth}-block MLP on digits, SGD+momentum")
    left.legend()
    shown = [r for r in results if r["batchnorm"] and r["status"] == "trained"][-1:]
    shown += [r for r in results if not r["batchnorm"] and r["diverged"]][:2]
    shown += [r for r in results if not r["batchnorm"] and not r["diverged"]][-1:]
    for r in shown:
        values = [v if v is not None else float("nan") for v in r["log10_rms_by_depth"]]
        state = f"diverged at step {r['diverged_at_step']}" if r["diverged"] else "end of training"
        left_label = f"{'BN' if r['batchnorm'] else 'no BN'}, lr={r['lr']:g} ({state})"
        right.plot(range(1, len(values) + 1), values, "o-", label=left_label)
    right.set_xlabel("block (depth)")
    right.set_ylabel("log10 RMS of block output")
    right.set_title("activation growth with depth (Bjorck Fig. 4-5)")
    right.legend(fontsize=8)
    save_figure(fig, path, dpi=100)


def bjorck_sweep(depth: int = 16, width: int = 64, steps: int = 300) -> dict:
    """Every LR of ``LEARNING_RATES`` with and without BN (``train_one``): ``setup``, ``max_lr_trained``,
    ``diverged_lrs`` and the per-run ``results``."""
    data = load_digits_tensors()
    start = time.perf_counter()
    results = [
        train_one(batchnorm, lr, depth, width, steps, data) for batchnorm in (False, True) for lr in LEARNING_RATES
    ]
    elapsed = time.perf_counter() - start
    trainable = {
        label: [r["lr"] for r in results if r["batchnorm"] == bn and r["status"] == "trained"]
        for label, bn in (("no_bn", False), ("bn", True))
    }
    return {
        "setup": {
            "depth": depth,
            "width": width,
            "steps": steps,
            "batch_size": 64,
            "optimizer": "SGD momentum 0.9",
            "divergence": "non-finite loss or loss > 10x initial; stalled: final loss >= 0.9x initial",
            "seconds": round(elapsed, 1),
        },
        "max_lr_trained": {k: max(v) if v else None for k, v in trainable.items()},
        "diverged_lrs": {
            label: [r["lr"] for r in results if r["batchnorm"] == bn and r["diverged"]]
            for label, bn in (("no_bn", False), ("bn", True))
        },
        "results": results,
    }


def format_bjorck_table(sweep: dict) -> str:
    """One row per LR: final loss / test accuracy / one-step relative loss / log-RMS slope, without and with BN."""
    results = sweep["results"]
    lines = [f"{'lr':>7} | {'no BN: loss / acc / rel.loss / slope':<44} | {'BN: loss / acc / rel.loss / slope':<44}"]
    for lr in LEARNING_RATES:
        cells = []
        for batchnorm in (False, True):
            r = next(x for x in results if x["lr"] == lr and x["batchnorm"] == batchnorm)
            if r["diverged"]:
                head = f"DIVERGED@{r['diverged_at_step']}"
            else:
                stalled = " S" if r["status"] == "stalled" else ""
                head = f"{r['final_train_loss']:.3f} / {r['test_accuracy']:.3f}{stalled}"
            cells.append(f"{head:<20} {r['relative_loss_one_step_at_init']:>9.3g} {r['log_rms_slope']:>8.3f}")
        lines.append(f"{lr:>7g} | {cells[0]:<44} | {cells[1]:<44}")
    return "\n".join(lines)


def write_bjorck_sweep(
    out: str | os.PathLike, depth: int = 16, width: int = 64, steps: int = 300, log: Callable[[str], None] = print
) -> dict:
    """Run ``bjorck_sweep``, write it to ``out`` (JSON) and its figure beside it (``.png``), ``log`` the table."""
    out = pathlib.Path(out)
    sweep = bjorck_sweep(depth, width, steps)
    log(format_bjorck_table(sweep))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(sweep, indent=1))
    plot_bjorck(sweep["results"], out.with_suffix(".png"), depth)
    log(f"largest LR that trained (loss < 0.9x initial, no divergence): {sweep['max_lr_trained']}")
    log(
        f"diverged at LRs: {sweep['diverged_lrs']}  ({sweep['setup']['seconds']:.1f} s; S = stalled, loss >= 0.9x "
        "initial)"
    )
    log(f"wrote {out} and {out.with_suffix('.png')}")
    return sweep


# the arguments of ``--quick`` (``benchmarks/bench_bjorck.py`` flags) and the sizes they set
BJORCK_QUICK_ARGS = ("--steps", "20", "--depth", "4")
_QUICK = {"steps": 20, "depth": 4}


def reproduce_bjorck(
    output_dir: str | os.PathLike,
    quick: bool = False,
    rerun: bool = True,
    results_dir: str | os.PathLike = pathlib.Path("benchmarks", "results"),
) -> dict:
    """Bjorck et al. 2018: run ``write_bjorck_sweep`` and summarise its JSON (``summarise_bjorck``).

    The sweep (a 16-block MLP on scikit-learn's digits, with and without BatchNorm, SGD + momentum over LRs
    1e-4 .. 3) writes ``<output_dir>/bjorck.json`` and ``bjorck.png``; ``quick``: 20 steps, 4 blocks (the
    ``--steps 20 --depth 4`` of ``benchmarks/bench_bjorck.py``). With ``rerun=False`` the committed
    ``<results_dir>/bjorck.json`` (default ``benchmarks/results`` of the checkout the command runs in) is
    summarised instead (nothing runs). Writes ``bjorck_summary.json``: ``experiment``, ``paper``, ``source``,
    ``command`` (the equivalent benchmark command line), ``summary``.
    """
    extra = list(BJORCK_QUICK_ARGS) if quick else []
    if rerun:
        source = pathlib.Path(output_dir) / "bjorck.json"
        write_bjorck_sweep(source, **(_QUICK if quick else {}))
    else:
        source = pathlib.Path(results_dir) / "bjorck.json"
    if not source.is_file():
        raise FileNotFoundError(
            f"{source} does not exist; run `python benchmarks/bench_bjorck.py` first (or rerun the experiment)"
        )
    benchmark = json.loads(source.read_text())
    result = {
        "experiment": "bjorck",
        "paper": "Bjorck, Gomes, Selman & Weinberger, Understanding Batch Normalization, NeurIPS 2018",
        "source": _display_path(source),
        "command": " ".join(["python benchmarks/bench_bjorck.py", *extra]),
        "summary": summarise_bjorck(benchmark),
    }
    write_result(output_dir, "bjorck_summary", result)
    return result


def _display_path(path: pathlib.Path) -> str:
    """``path`` relative to the working directory when it is inside it (as committed results are named)."""
    try:
        return str(path.resolve().relative_to(pathlib.Path.cwd().resolve()))
    except ValueError:
        return str(path)


def summarise_bjorck(benchmark: dict) -> dict:
    """The trainable LR ranges and the depth-wise activation growth of the diverging runs in ``bench_bjorck``'s JSON.

    Returns, per ``"no_bn"``/``"bn"``: ``trained_lrs`` (loss below 0.9x the initial, no divergence), ``stalled_lrs``,
    ``diverged_lrs``, ``trainable_range`` (``[min, max]`` of the trained LRs, ``None`` if none) and ``best_lr`` (the
    lowest final train loss); plus ``max_lr_ratio_bn_over_no_bn`` and ``diverging_runs``: for each diverged run,
    the step, ``activation_growth`` and ``log_rms_slope`` (``activation_profile``: RMS growth over the blocks, the
    slope of log10 RMS per block) and ``depth_growth`` = RMS(last block) / RMS(first block) at divergence,
    against the same ratio at initialisation.

    >>> rows = [
    ...     {"batchnorm": False, "lr": 0.1, "status": "trained", "diverged": False, "final_train_loss": 0.5},
    ...     {"batchnorm": False, "lr": 1.0, "status": "diverged", "diverged": True, "diverged_at_step": 3,
    ...      "activation_growth": 50.0, "log_rms_slope": 0.4, "log10_rms_by_depth": [0.0, 1.0, 2.0],
    ...      "initial_log10_rms_by_depth": [0.0, 0.0, 0.1]},
    ...     {"batchnorm": True, "lr": 1.0, "status": "trained", "diverged": False, "final_train_loss": 0.3},
    ... ]
    >>> out = summarise_bjorck({"results": rows})
    >>> out["no_bn"]["trainable_range"], out["bn"]["trainable_range"], out["max_lr_ratio_bn_over_no_bn"]
    ([0.1, 0.1], [1.0, 1.0], 10.0)
    >>> out["diverging_runs"][0]["depth_growth"], round(out["diverging_runs"][0]["depth_growth_at_init"], 3)
    (100.0, 1.259)
    """
    rows = benchmark.get("results")
    if not isinstance(rows, list):
        raise ConfigError("the Bjorck benchmark JSON has no 'results' list; rerun benchmarks/bench_bjorck.py")
    summary: dict = {"setup": benchmark.get("setup", {})}
    for label, batchnorm in (("no_bn", False), ("bn", True)):
        mine = [r for r in rows if bool(r["batchnorm"]) == batchnorm]
        trained = [r for r in mine if r["status"] == "trained"]
        best = min(trained, key=lambda r: r["final_train_loss"], default=None)
        summary[label] = {
            "trained_lrs": [r["lr"] for r in trained],
            "stalled_lrs": [r["lr"] for r in mine if r["status"] == "stalled"],
            "diverged_lrs": [r["lr"] for r in mine if r["diverged"]],
            "trainable_range": [min(r["lr"] for r in trained), max(r["lr"] for r in trained)] if trained else None,
            "best_lr": None if best is None else best["lr"],
            "best_final_train_loss": None if best is None else best["final_train_loss"],
            "best_test_accuracy": None if best is None else best.get("test_accuracy"),
        }
    top = {label: (summary[label]["trainable_range"] or [None, None])[1] for label in ("no_bn", "bn")}
    summary["max_lr_ratio_bn_over_no_bn"] = top["bn"] / top["no_bn"] if top["bn"] and top["no_bn"] else None
    summary["diverging_runs"] = [
        {
            "batchnorm": bool(r["batchnorm"]),
            "lr": r["lr"],
            "diverged_at_step": r.get("diverged_at_step"),
            "activation_growth": r.get("activation_growth"),
            "log_rms_slope": r.get("log_rms_slope"),
            "depth_growth": _depth_growth(r.get("log10_rms_by_depth")),
            "depth_growth_at_init": _depth_growth(r.get("initial_log10_rms_by_depth")),
        }
        for r in rows
        if r["diverged"]
    ]
    return summary


def _depth_growth(log10_rms: Sequence[float | None] | None) -> float | None:
    """RMS of the last block over the first, from a log10-RMS profile (``None`` when either end is missing)."""
    if not log10_rms or log10_rms[0] is None or log10_rms[-1] is None:
        return None
    return 10.0 ** (log10_rms[-1] - log10_rms[0])
