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
exactly the batch about to be applied, summed over accumulation chunks (the step mean). transformers 5.x has no
public way to get it before the update: callback events receive no loss, ``on_log`` only sees the average over a
logging interval, after the update, and a forward hook on the model misses losses the Trainer computes itself
(``label_smoothing_factor``, a custom ``compute_loss``, ``trl`` trainers). So the guard reads the private
``Trainer._tr_loss`` (a device tensor, one host sync per step) and fails with a ``ConfigError`` naming the
transformers version at ``on_train_begin`` if a future version drops it; the gradient norm is
computed over the optimizer's parameters at ``on_pre_optimizer_step``. With ``max_grad_norm > 0`` this is the
*clipped* norm: clipping already bounds large spikes, the z-test then sees jumps below the clip, and the loss test
and the non-finite check are unaffected. Under DDP every rank takes the same decision (loss averaged, non-finite
flag and grad norm maxed over ranks). With fp16 mixed precision the GradScaler owns Inf/NaN gradients (it skips
those steps and lowers its scale), so the guard leaves non-finite gradients to it and only acts on z-scores.

The decision logic is ``SpikeDetector`` (defined in ``hf_batchsched.probes.stability``, re-exported here), a pure
rolling-window z-score usable without a Trainer.

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

import torch
from transformers import TrainerCallback

from ..errors import ConfigError, check_choice
from ..probes.noise_scale import grad_sq_norm
from ..probes.stability import SpikeDetector
from ._binding import TrainerBoundCallback
from ._logging import log_metrics
from ._state import load_callback_state, save_callback_state
from .plateau import _check_scheduler_honours_scale, _cut_learning_rates

__all__ = ["ACTIONS", "LossSpikeGuard", "SpikeDetector", "SpikeGuardCallback", "gradient_norm", "skip_update"]

ACTIONS = ("skip", "cut_lr", "skip_and_cut")


def _optimizer_params(optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def gradient_norm(parameters) -> float:
    """Global L2 norm of the gradients of ``parameters`` (``nan``/``inf`` if any gradient is non-finite).

    >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
    >>> gradient_norm([p])
    5.0
    """
    return float(grad_sq_norm(parameters).sqrt())


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
    """The Trainer's running training-loss accumulator (private ``Trainer._tr_loss``, reset at every logging step).

    Private, but the only per-step loss a callback can read before the update (see the module docstring); its
    presence is checked once per ``train()`` by :func:`_check_running_train_loss`.
    """
    return float(trainer._tr_loss)


def _check_running_train_loss(trainer) -> None:
    if not isinstance(getattr(trainer, "_tr_loss", None), torch.Tensor):
        import transformers

        raise ConfigError(
            f"SpikeGuardCallback reads the step loss from Trainer._tr_loss, which {type(trainer).__name__} under "
            f"transformers {transformers.__version__} does not have (tested with 5.x). Use a transformers version "
            "that has it, or report the missing attribute to hf-batchsched"
        )


class SpikeGuardCallback(TrainerBoundCallback, TrainerCallback):
    """Skip the update and/or cut the LR on a loss or gradient-norm spike; never apply a NaN/Inf update.

    Args:
        trainer (`transformers.Trainer`, *optional*): the trainer; without it the callback is bound by
            ``BatchRampTrainer`` or ``hf_batchsched.bind_callbacks(trainer)``.
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

    Example::

        trainer.add_callback(SpikeGuardCallback(trainer, action="skip_and_cut"))
    """

    STATE_KEY = "hf_batchsched.SpikeGuardCallback"

    def __init__(
        self,
        trainer=None,
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
        if trainer is not None:
            self.bind(trainer)

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
        super().on_train_begin(args, state, control, **kwargs)
        _check_running_train_loss(self.trainer)
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
        loss = 0.0 if loss_unknown else _running_train_loss(trainer) - before
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
            new_scale = _cut_learning_rates(
                trainer.optimizer, trainer.lr_scheduler, self.scale, self.lr_factor, self.min_lr_ratio
            )
            if new_scale < self.scale:
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
        # An event on a step that is not a logging step is logged now; on logging steps the metrics go out with
        # the Trainer's own log, in on_log (once per step).
        if self._event_this_step and not control.should_log:
            log_metrics(self.trainer, self._logs())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:  # the Trainer's training log (not ours, not evaluation)
            log_metrics(self.trainer, self._logs())


#: OLMo-core's name for the same idea.
LossSpikeGuard = SpikeGuardCallback
