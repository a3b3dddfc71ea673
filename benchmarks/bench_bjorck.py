"""A small Bjorck et al. (2018) experiment: a deep plain MLP on digits, with and without BatchNorm, across LRs.

"Understanding Batch Normalization" (https://arxiv.org/abs/1806.02375) finds that BN's benefit is the larger
learning rate it allows: without BN, activations grow geometrically with depth at large step sizes and the
loss diverges. This script reproduces the shape of that result on a CPU in well under 3 minutes:

- model: ``depth`` blocks of Linear(width) [-> BatchNorm1d] -> ReLU, then a linear head; SGD + momentum 0.9;
- data: scikit-learn's 8x8 digits (1437 train / 360 test), standardised;
- grid: learning rates 1e-4 .. 3, ``steps`` steps each, batch 64, seed 0;
- per run: whether it diverged (a non-finite loss, or a loss above 10x the initial one), final train loss
  (mean of the last 20 steps), test accuracy, Bjorck's one-step "relative loss" at initialisation (loss after
  one step / loss before, same minibatch; Fig. 3), and the depth profile (``activation_profile``: RMS of each
  block's output, its log-RMS slope) on the first diverging step, or at the end.

Run: ``.venv/bin/python benchmarks/bench_bjorck.py`` (writes benchmarks/results/bjorck.json and bjorck.png).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from hf_batchsched.probes.stability import activation_profile

RESULTS = Path(__file__).resolve().parent / "results"
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
    from sklearn.datasets import load_digits

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
    import copy

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


def run(batchnorm: bool, lr: float, depth: int, width: int, steps: int, data) -> dict:
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


def plot(results: list[dict], path: Path, depth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=RESULTS / "bjorck.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_digits_tensors()
    start = time.perf_counter()
    results = [
        run(batchnorm, lr, args.depth, args.width, args.steps, data)
        for batchnorm in (False, True)
        for lr in LEARNING_RATES
    ]
    elapsed = time.perf_counter() - start
    print(f"{'lr':>7} | {'no BN: loss / acc / rel.loss / slope':<44} | {'BN: loss / acc / rel.loss / slope':<44}")
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
        print(f"{lr:>7g} | {cells[0]:<44} | {cells[1]:<44}")
    trainable = {
        label: [r["lr"] for r in results if r["batchnorm"] == bn and r["status"] == "trained"]
        for label, bn in (("no_bn", False), ("bn", True))
    }
    summary = {
        "setup": {
            "depth": args.depth,
            "width": args.width,
            "steps": args.steps,
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    plot(results, args.out.with_suffix(".png"), args.depth)
    print(f"largest LR that trained (loss < 0.9x initial, no divergence): {summary['max_lr_trained']}")
    print(f"diverged at LRs: {summary['diverged_lrs']}  ({elapsed:.1f} s; S = stalled, loss >= 0.9x initial)")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
