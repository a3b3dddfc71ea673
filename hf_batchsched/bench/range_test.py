"""LR range test (Smith 2017; torch-lr-finder, fastai) on the user's own Trainer, model and data.

``lr_range_test(trainer)`` runs ``num_steps`` real optimizer updates with the trainer's own ``training_step`` (so
dict batches, PEFT models, custom ``compute_loss``, the batch ramp's micro-chunks all work) while the LR grows from
``start_lr`` to ``end_lr``, records the loss, and then puts everything back bit-for-bit: model parameters and
buffers, gradients, train/eval mode, optimizer state and group LRs, the trainer's clock, and the Python, NumPy and
torch (CPU and CUDA) RNG states. The trainer can then ``train()`` as if nothing happened.

LR at step ``i`` of ``n`` (``r = i / (n - 1)``): ``mode="exp"``: ``start * (end / start) ** r``; ``"linear"``:
``start + r * (end - start)``. Group LR ratios (LoRA+) are kept: group ``g`` gets ``lr * lr_g / lr_0``.
Loss smoothing as torch-lr-finder: ``s_i = smooth * loss_i + (1 - smooth) * s_{i-1}``; the test stops when
``s_i > diverge_threshold * min(s)`` or the loss is not finite.

The suggestion rule (``suggestion_rule``), and why it is divided by ``safety_factor``:

- ``"steepest"`` (default): the LR where the smoothed loss falls fastest per unit of ``log(lr)`` (``argmin`` of
  ``np.gradient(s, log(lr))``), after dropping the first ``skip_start`` and last ``skip_end`` points.
- ``"minimum"``: the LR of the lowest smoothed loss (Smith's rule of thumb uses a tenth of it).

The HF maintainers declined an LR finder for the Trainer because finders "usually indicate one in the 1e-3 when the
actual best value is in the 1e-5 range" for fine-tuning (transformers #16013): a few hundred noisy steps on a
pretrained model reward aggressive LRs that hurt later. The mitigation here: the raw rule is divided by
``safety_factor`` (10 by default), the range starts at ``1e-7``, and the result is a *starting point* for
``hf-batchsched lrbench``, which compares candidate schedules on held-out loss (LRBench++'s evidence is short
fine-tunes, not finders).
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..errors import ConfigError, check_choice, check_positive
from .plots import new_figure, save_figure, style_axes

__all__ = ["RangeTestResult", "lr_range_test", "range_test_lrs", "suggest_lr"]

RULES = ("steepest", "minimum")


def range_test_lrs(start_lr: float, end_lr: float, num_steps: int, mode: str = "exp") -> list[float]:
    """The LR of every step of a range test.

    >>> [f"{lr:.0e}" for lr in range_test_lrs(1e-6, 1e-2, 5)]
    ['1e-06', '1e-05', '1e-04', '1e-03', '1e-02']
    >>> range_test_lrs(0.0, 1.0, 3, mode="linear")
    [0.0, 0.5, 1.0]
    """
    check_choice("mode", mode, ("exp", "linear"))
    if num_steps < 2:
        raise ConfigError(f"num_steps must be >= 2, got {num_steps}")
    if not 0 <= start_lr < end_lr or (mode == "exp" and start_lr <= 0):
        raise ConfigError(
            f"the LR range must satisfy 0 < start_lr < end_lr (start_lr may be 0 only with mode='linear'), got "
            f"start_lr={start_lr}, end_lr={end_lr}"
        )
    ratios = [i / (num_steps - 1) for i in range(num_steps)]
    if mode == "exp":
        return [start_lr * (end_lr / start_lr) ** r for r in ratios]
    return [start_lr + r * (end_lr - start_lr) for r in ratios]


def suggest_lr(
    lrs: Sequence[float],
    smoothed_losses: Sequence[float],
    rule: str = "steepest",
    skip_start: int = 10,
    skip_end: int = 5,
    safety_factor: float = 10.0,
) -> float | None:
    """The suggested LR from a range test's curve (see the module docstring for the rules).

    Returns ``None`` when fewer than 3 points remain after trimming.

    >>> lrs = [10 ** (-6 + i / 4) for i in range(21)]  # 1e-6 ... 1e-1
    >>> losses = [2.0 - 1.5 / (1 + math.exp(-4 * (math.log10(lr) + 3))) for lr in lrs]  # steepest at 1e-3
    >>> f"{suggest_lr(lrs, losses, skip_start=0, skip_end=0, safety_factor=1):.0e}"
    '1e-03'
    >>> f"{suggest_lr(lrs, losses, rule='minimum', skip_start=0, skip_end=0):.0e}"
    '1e-02'
    """
    check_choice("suggestion rule", rule, RULES)
    check_positive("safety_factor", safety_factor)
    end = len(lrs) - skip_end
    xs, ys = np.log(np.asarray(lrs[skip_start:end], dtype=float)), np.asarray(smoothed_losses[skip_start:end])
    if len(xs) < 3:
        return None
    if rule == "steepest":
        index = int(np.argmin(np.gradient(ys, xs)))
    else:
        index = int(np.argmin(ys))
    return float(math.exp(xs[index]) / safety_factor)


@dataclass
class RangeTestResult:
    """What ``lr_range_test`` measured.

    Attributes:
        lrs (`list[float]`): the LR (of group 0) at each completed step.
        losses (`list[float]`): the raw training loss of each step.
        smoothed_losses (`list[float]`): the exponentially smoothed losses.
        suggestion (`float` or `None`): the suggested LR (``rule`` applied, divided by ``safety_factor``).
        rule (`str`): the suggestion rule used.
        safety_factor (`float`): the divisor applied to the rule's LR.
        diverged_at (`int` or `None`): the step at which the test stopped on divergence.
    """

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed_losses: list[float] = field(default_factory=list)
    suggestion: float | None = None
    rule: str = "steepest"
    safety_factor: float = 10.0
    diverged_at: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def plot(self, path: str) -> str:
        """Save the loss-vs-LR curve (log x axis) with the suggestion marked; returns ``path``."""
        figure, axes = new_figure(figsize=(6, 4))
        axes.plot(self.lrs, self.losses, alpha=0.3, label="loss")
        axes.plot(self.lrs, self.smoothed_losses, label="smoothed loss")
        if self.suggestion is not None:
            axes.axvline(self.suggestion, color="red", linestyle="--", label=f"suggestion {self.suggestion:.2e}")
        style_axes(
            axes,
            title=f"LR range test (rule: {self.rule} / {self.safety_factor:g})",
            xlabel="learning rate",
            ylabel="training loss",
            logx=True,
            grid=False,
            legend_fontsize=None,
        )
        return save_figure(figure, path)


# --------------------------------------------------------------------------------------------------
# Snapshot and restore (bit-for-bit)
# --------------------------------------------------------------------------------------------------


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _snapshot_model(model: torch.nn.Module) -> dict:
    return {
        "params": {name: p.detach().clone() for name, p in model.named_parameters()},
        "grads": {name: None if p.grad is None else p.grad.detach().clone() for name, p in model.named_parameters()},
        "buffers": {name: b.detach().clone() for name, b in model.named_buffers()},
        "modes": {name: module.training for name, module in model.named_modules()},
    }


@torch.no_grad()
def _restore_model(model: torch.nn.Module, snapshot: dict) -> None:
    for name, p in model.named_parameters():
        p.copy_(snapshot["params"][name])
        grad = snapshot["grads"][name]
        p.grad = None if grad is None else grad.clone()
    for name, b in model.named_buffers():
        b.copy_(snapshot["buffers"][name])
    for name, module in model.named_modules():
        module.training = snapshot["modes"][name]


# --------------------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------------------


def lr_range_test(
    trainer,
    start_lr: float = 1e-7,
    end_lr: float = 1e-1,
    num_steps: int = 100,
    mode: str = "exp",
    smooth: float = 0.05,
    diverge_threshold: float = 5.0,
    suggestion_rule: str = "steepest",
    skip_start: int = 10,
    skip_end: int = 5,
    safety_factor: float = 10.0,
) -> RangeTestResult:
    """Run an LR range test on ``trainer``'s model, optimizer and training data, then restore everything.

    Args:
        trainer (`transformers.Trainer`): any Trainer (``BatchRampTrainer``, ``trl.SFTTrainer``...) with a
            ``train_dataset``; its optimizer is created (and dropped again afterwards) if it does not exist yet.
        start_lr (`float`, *optional*, defaults to `1e-7`): LR of the first step (group 0).
        end_lr (`float`, *optional*, defaults to `1e-1`): LR of the last step.
        num_steps (`int`, *optional*, defaults to `100`): optimizer updates (the data loader is cycled if shorter).
        mode (`str`, *optional*, defaults to `"exp"`): ``"exp"`` (geometric) or ``"linear"`` LR growth.
        smooth (`float`, *optional*, defaults to `0.05`): weight of the newest loss in the smoothed curve, in (0, 1].
        diverge_threshold (`float`, *optional*, defaults to `5.0`): stop when the smoothed loss exceeds this
            multiple of its minimum.
        suggestion_rule (`str`, *optional*, defaults to `"steepest"`): ``"steepest"`` or ``"minimum"``.
        skip_start (`int`, *optional*, defaults to `10`): points ignored at the start by the suggestion.
        skip_end (`int`, *optional*, defaults to `5`): points ignored at the end by the suggestion.
        safety_factor (`float`, *optional*, defaults to `10.0`): the rule's LR is divided by it (see the module
            docstring: finders overshoot for fine-tuning).

    Returns:
        `RangeTestResult`: the curve and the suggestion; ``result.plot(path)`` draws it.

    Example::

        result = lr_range_test(trainer, num_steps=50)
        print(result.suggestion)
        result.plot("lr_range.png")
    """
    lrs = range_test_lrs(start_lr, end_lr, num_steps, mode)
    if not 0 < smooth <= 1:
        raise ConfigError(f"smooth must be in (0, 1] (the weight of the newest loss), got {smooth}")
    if not diverge_threshold > 1:
        raise ConfigError(
            f"diverge_threshold must be > 1 (a multiple of the best smoothed loss), got {diverge_threshold}"
        )
    check_choice("suggestion rule", suggestion_rule, RULES)
    if trainer.train_dataset is None:
        raise ConfigError("lr_range_test needs a trainer with a train_dataset")
    if trainer.accelerator.num_processes > 1:
        raise ConfigError(
            "lr_range_test runs in one process (ranks would take different updates and suggest different LRs); "
            "run it in a single-process session before launching distributed training"
        )

    model = trainer.model
    created_optimizer = trainer.optimizer is None
    if created_optimizer:
        trainer.create_optimizer()
    optimizer = trainer.optimizer
    rng = _rng_state()
    model_snapshot = _snapshot_model(model)
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    clock = getattr(trainer, "clock", None)
    clock_state = copy.deepcopy(clock.state_dict()) if clock is not None else None
    saved_attributes = {
        name: getattr(trainer, name)
        for name in (
            "current_gradient_accumulation_steps",
            "last_batch_size",
            "last_micro_chunks",
            "_ramp_sampler",
            "ramp_position",
            "last_step_rows",
        )
        if hasattr(trainer, name)
    }
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    ratios = [lr / base_lrs[0] if base_lrs[0] > 0 else 1.0 for lr in base_lrs]

    result = RangeTestResult(rule=suggestion_rule, safety_factor=safety_factor)
    try:
        dataloader = trainer.get_train_dataloader()
        iterator = iter(dataloader)
        trainer.current_gradient_accumulation_steps = 1
        best = math.inf
        for step, lr in enumerate(lrs):
            try:
                batches, num_items = trainer.get_batch_samples(iterator, 1, trainer.args.device)
                if not batches:
                    raise StopIteration
            except StopIteration:
                iterator = iter(dataloader)
                batches, num_items = trainer.get_batch_samples(iterator, 1, trainer.args.device)
            for group, ratio in zip(optimizer.param_groups, ratios):
                group["lr"] = lr * ratio
            model.zero_grad(set_to_none=True)
            loss = float(trainer.training_step(model, batches[0], num_items))
            if trainer.args.max_grad_norm and trainer.args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
            optimizer.step()
            model.zero_grad(set_to_none=True)
            smoothed = (
                loss if not result.smoothed_losses else smooth * loss + (1 - smooth) * result.smoothed_losses[-1]
            )
            result.lrs.append(lr)
            result.losses.append(loss)
            result.smoothed_losses.append(smoothed)
            if not math.isfinite(smoothed) or smoothed > diverge_threshold * best:
                result.diverged_at = step
                break
            best = min(best, smoothed)
    finally:
        _restore_model(model, model_snapshot)
        optimizer.load_state_dict(optimizer_state)
        if clock is not None:
            clock.load_state_dict(clock_state)
        for name, value in saved_attributes.items():
            setattr(trainer, name, value)
        if created_optimizer:
            trainer.optimizer = None
        _set_rng_state(rng)

    finite = [i for i, value in enumerate(result.smoothed_losses) if math.isfinite(value)]
    last = finite[-1] + 1 if finite else 0
    result.suggestion = suggest_lr(
        result.lrs[:last], result.smoothed_losses[:last], suggestion_rule, skip_start, skip_end, safety_factor
    )
    return result
