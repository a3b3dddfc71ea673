"""A loss/gradient spike guard: skip the update and/or cut the LR when a step looks like a divergence.

As OLMo-core's ``SkipStepOptimizer``: the training loss and the gradient norm of each optimizer step are compared
with a rolling window of the previous steps' values; a z-score ``(x - mean) / std`` above ``sigma`` (only upward
spikes count, and only once ``min_history`` values are in the window) is a spike. A non-finite loss or gradient is
always a spike, whatever the history: NaN/Inf never reaches the weights.

How the update is skipped (no patching): at ``on_pre_optimizer_step`` (after backward, clipping and the
gradient all-reduce, right before ``optimizer.step()``) the guard sets every parameter's ``.grad`` to ``None``.
PyTorch optimizers (and transformers' Adafactor, bitsandbytes' 8-bit optimizers) skip parameters without a
gradient entirely: no weight decay, no moment update, no step count, so weights **and** optimizer state after a
skipped step equal those before it. (Zeroing the gradients would not do: AdamW's decay and moment updates would
still move the weights.) The LR schedule and the data position still advance: a skipped batch is consumed.

Where the numbers come from: the step's loss is the increase of the Trainer's running training-loss accumulator
(the value it logs as ``loss``) between ``on_step_begin`` and ``on_pre_optimizer_step``, so it is the loss of
exactly the batch about to be applied, summed over accumulation chunks (the step mean); the gradient norm is
computed over the optimizer's parameters at ``on_pre_optimizer_step``. With ``max_grad_norm > 0`` this is the
*clipped* norm: clipping already bounds large spikes, the z-test then sees jumps below the clip, and the loss test
and the non-finite check are unaffected. Under DDP every rank takes the same decision (loss averaged, non-finite
flag and grad norm maxed over ranks). With fp16 mixed precision the GradScaler owns Inf/NaN gradients (it skips
those steps and lowers its scale), so the guard leaves non-finite gradients to it and only acts on z-scores.

The decision logic is ``SpikeDetector``, a pure rolling-window z-score usable without a Trainer.

Metrics (through ``trainer.log``; with every training log and at every step with an event):

| name | meaning |
|---|---|
| ``guard/skipped_steps`` | updates skipped so far |
| ``guard/lr_cuts`` | LR cuts so far |
| ``guard/nonfinite_steps`` | steps whose loss or gradient was NaN/Inf |
| ``guard/last_zscore`` | loss z-score of the last step (0 until ``min_history`` values; 1e30 for NaN/Inf) |
| ``guard/last_grad_zscore`` | gradient-norm z-score of the last step (with ``check_grad_norm``) |
"""

from __future__ import annotations

import math
from collections import deque

import torch
from transformers import TrainerCallback

from ..errors import ConfigError, check_choice, check_positive
from .plateau import _check_scheduler_honours_scale, load_callback_state, save_callback_state, scale_learning_rates

__all__ = ["ACTIONS", "LossSpikeGuard", "SpikeDetector", "SpikeGuardCallback", "gradient_norm", "skip_update"]

ACTIONS = ("skip", "cut_lr", "skip_and_cut")


class SpikeDetector:
    """Rolling-window z-score spike detector.

    ``observe(x)`` returns ``(is_spike, zscore)``: ``zscore = (x - mean) / std`` over the last ``window`` accepted
    values (population std); a spike is ``zscore > sigma`` once ``min_history`` values are held, or any non-finite
    ``x``. Spikes are not added to the window (so one outlier does not widen it and hide the next).

    Example:

    >>> detector = SpikeDetector(window=8, sigma=3.0, min_history=4)
    >>> [detector.observe(x)[0] for x in (1.0, 1.1, 0.9, 1.0, 1.05, 5.0, 1.0, float("nan"))]
    [False, False, False, False, False, True, False, True]
    >>> round(detector.observe(1.2)[1], 3)  # (1.2 - mean) / std of the 7 accepted values
    3.159
    """

    def __init__(self, window: int = 128, sigma: float = 6.0, min_history: int = 20):
        check_positive("window", window)
        check_positive("sigma", sigma)
        check_positive("min_history", min_history)
        if min_history > window:
            raise ConfigError(
                f"min_history ({min_history}) cannot exceed window ({window}); lower it or widen the window"
            )
        self.window, self.sigma, self.min_history = int(window), float(sigma), int(min_history)
        self.values: deque[float] = deque(maxlen=self.window)

    def zscore(self, x: float) -> float:
        if len(self.values) < self.min_history:
            return 0.0
        n = len(self.values)
        mean = sum(self.values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in self.values) / n)
        return (x - mean) / max(std, 1e-12 * max(abs(mean), 1.0))

    def observe(self, x: float) -> tuple[bool, float]:
        x = float(x)
        if not math.isfinite(x):
            return True, math.inf
        z = self.zscore(x)
        spike = len(self.values) >= self.min_history and z > self.sigma
        if not spike:
            self.values.append(x)
        return spike, z

    def state_dict(self) -> dict:
        return {"values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.values = deque((float(v) for v in state["values"]), maxlen=self.window)


def _optimizer_params(optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def gradient_norm(parameters) -> float:
    """Global L2 norm of the gradients of ``parameters`` (``nan``/``inf`` if any gradient is non-finite).

    >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
    >>> gradient_norm([p])
    5.0
    """
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in parameters if p.grad is not None]
    if not norms:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms])))


def skip_update(optimizer) -> None:
    """Make the next ``optimizer.step()`` a no-op for weights and optimizer state by dropping every gradient.

    >>> p = torch.nn.Parameter(torch.ones(2)); opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.1)
    >>> p.grad = torch.full((2,), float("nan")); skip_update(opt); opt.step()
    >>> p.tolist(), dict(opt.state)
    ([1.0, 1.0], {})
    """
    for p in _optimizer_params(optimizer):
        p.grad = None


def _running_train_loss(trainer) -> float:
    """The Trainer's running training-loss accumulator (reset at every logging step)."""
    return float(trainer._tr_loss)


class SpikeGuardCallback(TrainerCallback):
    """Skip the update and/or cut the LR on a loss or gradient-norm spike; never apply a NaN/Inf update.

    Args:
        trainer (`transformers.Trainer`): the trainer.
        window (`int`, *optional*, defaults to `128`): steps in the rolling window (OLMo-core's
            ``rolling_interval_length``).
        sigma (`float`, *optional*, defaults to `6.0`): z-score above which a step is a spike (OLMo-core's
            ``sigma_factor``).
        min_history (`int`, *optional*, defaults to `20`): values needed before z-scores are trusted.
        action (`str`, *optional*, defaults to `"skip"`): on a finite spike, ``"skip"`` the update, ``"cut_lr"``
            (apply it with the LR cut by ``lr_factor``, and keep the cut), or ``"skip_and_cut"``. Non-finite steps
            are always skipped.
        lr_factor (`float`, *optional*, defaults to `0.5`): LR multiplier per cut, in (0, 1).
        min_lr_ratio (`float`, *optional*, defaults to `0.01`): floor of the cumulative cut (relative).
        check_grad_norm (`bool`, *optional*, defaults to `True`): also z-test the gradient norm.

    Example:

    >>> trainer.add_callback(SpikeGuardCallback(trainer, action="skip_and_cut"))  # doctest: +SKIP
    """

    STATE_KEY = "hf_batchsched.SpikeGuardCallback"

    def __init__(
        self,
        trainer,
        window: int = 128,
        sigma: float = 6.0,
        min_history: int = 20,
        action: str = "skip",
        lr_factor: float = 0.5,
        min_lr_ratio: float = 0.01,
        check_grad_norm: bool = True,
    ):
        check_choice("action", action, ACTIONS)
        if not 0 < lr_factor < 1:
            raise ConfigError(f"lr_factor must be in (0, 1) (the LR multiplier per cut), got {lr_factor}")
        if not 0 < min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in (0, 1], got {min_lr_ratio}")
        if not hasattr(trainer, "_tr_loss") and not hasattr(type(trainer), "_inner_training_loop"):
            raise ConfigError(f"SpikeGuardCallback needs a transformers.Trainer, got {type(trainer).__name__}")
        self.trainer = trainer
        self.action = action
        self.lr_factor = float(lr_factor)
        self.min_lr_ratio = float(min_lr_ratio)
        self.check_grad_norm = bool(check_grad_norm)
        self.loss_detector = SpikeDetector(window, sigma, min_history)
        self.grad_detector = SpikeDetector(window, sigma, min_history)
        self.skipped_steps = 0
        self.lr_cuts = 0
        self.nonfinite_steps = 0
        self.scale = 1.0
        self.last_zscore = 0.0
        self.last_grad_zscore = 0.0
        self.events: list[dict] = []
        self._loss_at_step_begin = 0.0
        self._event_this_step = False

    # ---- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "loss_detector": self.loss_detector.state_dict(),
            "grad_detector": self.grad_detector.state_dict(),
            "skipped_steps": self.skipped_steps,
            "lr_cuts": self.lr_cuts,
            "nonfinite_steps": self.nonfinite_steps,
            "scale": self.scale,
            "events": list(self.events),
        }

    def load_state_dict(self, state: dict) -> None:
        self.loss_detector.load_state_dict(state["loss_detector"])
        self.grad_detector.load_state_dict(state["grad_detector"])
        self.skipped_steps = int(state["skipped_steps"])
        self.lr_cuts = int(state["lr_cuts"])
        self.nonfinite_steps = int(state["nonfinite_steps"])
        self.scale = float(state["scale"])
        self.events = list(state["events"])

    # ---- events ---------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        saved = load_callback_state(state, self.STATE_KEY)
        if saved is not None:
            self.load_state_dict(saved)
        if self.action != "skip":
            _check_scheduler_honours_scale(self.trainer.lr_scheduler)
        save_callback_state(state, self.STATE_KEY, self.state_dict())

    def on_step_begin(self, args, state, control, **kwargs):
        self._loss_at_step_begin = _running_train_loss(self.trainer)
        self._event_this_step = False

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        # With logging_nan_inf_filter=False one NaN leaves the accumulator NaN until it is reset: the loss of later
        # steps is then unknown (not tested, not added to the window); their gradients are still checked.
        before = self._loss_at_step_begin
        loss_unknown = not math.isfinite(before)
        loss = 0.0 if loss_unknown else float(trainer._tr_loss) - before
        grad_norm = gradient_norm(_optimizer_params(trainer.optimizer))
        grad_nonfinite = not math.isfinite(grad_norm)
        values = torch.tensor([loss, 0.0 if grad_nonfinite else grad_norm, float(grad_nonfinite), float(loss_unknown)])
        if trainer.accelerator.num_processes > 1:  # every rank takes the same decision
            values = values.to(trainer.args.device)
            loss_sum = trainer.accelerator.reduce(values[:1].clone(), reduction="sum")
            maxed = trainer.accelerator.reduce(values[1:].clone(), reduction="max")
            values = torch.cat([loss_sum / trainer.accelerator.num_processes, maxed]).cpu()
        loss, grad_norm = float(values[0]), float(values[1])
        grad_nonfinite, loss_unknown = bool(values[2]), bool(values[3])
        if grad_nonfinite and getattr(trainer.accelerator, "scaler", None) is not None:
            return  # fp16: the GradScaler skips this step and lowers its scale

        loss_spike = grad_spike = False
        if not loss_unknown:
            loss_spike, self.last_zscore = self.loss_detector.observe(loss)
        if self.check_grad_norm and not grad_nonfinite:
            grad_spike, self.last_grad_zscore = self.grad_detector.observe(grad_norm)
        if grad_nonfinite:
            grad_norm, self.last_grad_zscore = math.inf, math.inf
        nonfinite = (not loss_unknown and not math.isfinite(loss)) or grad_nonfinite
        if not (loss_spike or grad_spike or nonfinite):
            return
        skip = nonfinite or self.action in ("skip", "skip_and_cut")
        cut = not nonfinite and self.action in ("cut_lr", "skip_and_cut")
        if skip:
            skip_update(trainer.optimizer)
            self.skipped_steps += 1
        if nonfinite:
            self.nonfinite_steps += 1
        if cut:
            new_scale = max(self.scale * self.lr_factor, self.min_lr_ratio)
            if new_scale < self.scale:
                scale_learning_rates(trainer.optimizer, trainer.lr_scheduler, new_scale / self.scale)
                self.scale = new_scale
                self.lr_cuts += 1
        self.events.append(
            {
                "step": state.global_step + 1,
                "loss": loss if math.isfinite(loss) else str(loss),
                "grad_norm": grad_norm if math.isfinite(grad_norm) else str(grad_norm),
                "zscore": self.last_zscore if math.isfinite(self.last_zscore) else str(self.last_zscore),
                "skipped": skip,
                "lr_cut": cut,
            }
        )
        del self.events[:-100]  # keep the last 100 events in checkpoints
        self._event_this_step = True

    def _logs(self) -> dict:
        logs = {
            "guard/skipped_steps": self.skipped_steps,
            "guard/lr_cuts": self.lr_cuts,
            "guard/nonfinite_steps": self.nonfinite_steps,
            "guard/last_zscore": self.last_zscore if math.isfinite(self.last_zscore) else 1e30,
        }
        if self.check_grad_norm:
            z = self.last_grad_zscore
            logs["guard/last_grad_zscore"] = z if math.isfinite(z) else 1e30
        return logs

    def on_step_end(self, args, state, control, **kwargs):
        save_callback_state(state, self.STATE_KEY, self.state_dict())
        # An event on a step that is not a logging step is logged now. (Calling trainer.log resets
        # control.should_log, so on logging steps the metrics go out with the Trainer's own log, in on_log.)
        if self._event_this_step and not control.should_log:
            self.trainer.log(self._logs())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:  # the Trainer's training log (not ours, not evaluation)
            self.trainer.log(self._logs())


#: OLMo-core's name for the same idea.
LossSpikeGuard = SpikeGuardCallback
