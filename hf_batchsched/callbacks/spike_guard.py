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

Where the numbers come from: the step's loss is the sum of what ``training_step`` returned during the step (the
value the Trainer accumulates and logs as ``loss``: the step mean, over accumulation chunks), taken before the
Trainer's ``logging_nan_inf_filter`` replaces a NaN/Inf one by the mean of earlier steps, so a non-finite loss is
seen as such with the filter on (the default) and under DDP (losses averaged over ranks: one NaN rank makes the mean
NaN). The gradient norm is the one the Trainer computes *before* clipping to ``max_grad_norm`` (the value it logs
as ``grad_norm``): clipped norms of healthy steps are all equal to ``max_grad_norm`` and would hide every spike. Both
come from :class:`hf_batchsched.step_watch.StepWatch`, which wraps ``trainer.training_step`` and
``trainer.accelerator.clip_grad_norm_`` on this trainer instance from ``on_train_begin`` to ``on_train_end``
(callback events carry neither value). A Trainer that clips by another path (mixed device meshes) leaves no
pre-clipping norm; the guard then tests the norm of the (clipped) gradients and says so once in the log. Under DDP
every rank takes the same decision (loss averaged, non-finite flag and grad norm maxed over ranks). With fp16 mixed
precision the GradScaler owns Inf/NaN gradients (it skips those steps and lowers its scale), so the guard leaves
non-finite gradients to it and only acts on z-scores.

Only healthy steps enter the windows: the values of a step with an event (a spike of either value, or a non-finite
one) are left out, so neither a skipped step nor a substituted loss shifts what "normal" means. The z-score's spread
is floored at 1% of the window's mean (see ``SpikeDetector``), so a window of equal values (e.g. every step at the
clip) cannot turn rounding into a spike.

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

import logging
import math

import torch
from transformers import TrainerCallback

from ..callback_binding import TrainerBoundCallback, load_callback_state, save_callback_state
from ..errors import ConfigError, check_choice
from ..lr_cuts import check_scheduler_honours_scale, cut_learning_rates
from ..probes.noise_scale import grad_sq_norm
from ..probes.spikes import SpikeDetector
from ..step_watch import StepWatch
from ..trainer import log_metrics

__all__ = ["ACTIONS", "SpikeDetector", "SpikeGuardCallback", "gradient_norm", "skip_update"]

ACTIONS = ("skip", "cut_lr", "skip_and_cut")

logger = logging.getLogger(__name__)


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
        self._watch = None
        self._warned_clipped_norm = False
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
        if getattr(self.trainer, "is_deepspeed_enabled", False):
            raise ConfigError(
                "SpikeGuardCallback cannot act under DeepSpeed: the engine steps the optimizer inside the last "
                "backward, before a callback can drop the update or cut its LR. Use DDP or FSDP2 "
                "(recipes/accelerate/fsdp.yaml), or remove the callback"
            )
        saved = load_callback_state(state, self.STATE_KEY)
        if saved is not None:
            self.load_state_dict(saved)
        if self.action != "skip":
            check_scheduler_honours_scale(self.trainer.lr_scheduler)
        self._remove_watch()  # a train() that raised did not reach on_train_end
        self._watch = StepWatch(self.trainer)
        save_callback_state(state, self.STATE_KEY, self.state_dict())

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_watch()

    def _remove_watch(self) -> None:
        if self._watch is not None:
            self._watch.remove()
            self._watch = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._watch.reset()
        self._event_this_step = False

    def _step_values(self) -> tuple[float, float, bool, bool]:
        """``(loss, grad_norm, grad_nonfinite, loss_unknown)`` of this step, the same on every rank."""
        trainer, watch = self.trainer, self._watch
        loss_unknown = watch.loss is None
        loss = 0.0 if loss_unknown else watch.loss
        grad_norm = watch.grad_norm
        if grad_norm is None:  # no clip ran: max_grad_norm <= 0 (the gradients are as computed) or another path
            if trainer.args.max_grad_norm > 0 and not self._warned_clipped_norm:
                self._warned_clipped_norm = True
                logger.warning(
                    "SpikeGuardCallback: the Trainer clipped the gradients without accelerator.clip_grad_norm_, so "
                    "the guard tests the clipped gradient norm (spikes above max_grad_norm are not seen)"
                )
            grad_norm = gradient_norm(_optimizer_params(trainer.optimizer))
        grad_nonfinite = not math.isfinite(grad_norm)
        values = torch.stack(
            [
                torch.as_tensor(loss, dtype=torch.float32).reshape(()).cpu(),
                torch.tensor(0.0 if grad_nonfinite else grad_norm),
                torch.tensor(float(grad_nonfinite)),
                torch.tensor(float(loss_unknown)),
            ]
        )
        if trainer.accelerator.num_processes > 1:  # every rank takes the same decision
            values = values.to(trainer.args.device)
            loss_sum = trainer.accelerator.reduce(values[:1].clone(), reduction="sum")
            maxed = trainer.accelerator.reduce(values[1:].clone(), reduction="max")
            values = torch.cat([loss_sum / trainer.accelerator.num_processes, maxed]).cpu()
        return float(values[0]), float(values[1]), bool(values[2]), bool(values[3])

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        loss, grad_norm, grad_nonfinite, loss_unknown = self._step_values()
        if grad_nonfinite and getattr(trainer.accelerator, "scaler", None) is not None:
            return  # fp16: the GradScaler skips this step and lowers its scale

        loss_spike, loss_z = (False, self.last_zscore) if loss_unknown else self.loss_detector.check(loss)
        grad_spike, grad_z = (False, 0.0)
        if self.check_grad_norm and not grad_nonfinite:
            grad_spike, grad_z = self.grad_detector.check(grad_norm)
        if grad_nonfinite:
            grad_norm, grad_z = math.inf, math.inf
        nonfinite = (not loss_unknown and not math.isfinite(loss)) or grad_nonfinite
        event = loss_spike or grad_spike or nonfinite
        # Only a healthy step's values enter the windows; a spike is counted by the detector that saw it.
        if not loss_unknown:
            self.loss_detector.record(loss, loss_spike, loss_z, keep=not event)
            self.last_zscore = loss_z
        if self.check_grad_norm:
            self.grad_detector.record(grad_norm, grad_spike, grad_z, keep=not event)
            self.last_grad_zscore = grad_z
        if not event:
            return
        skip = nonfinite or self.action in ("skip", "skip_and_cut")
        cut = not nonfinite and self.action in ("cut_lr", "skip_and_cut")
        if skip:
            skip_update(trainer.optimizer)
            self.skipped_steps += 1
        if nonfinite:
            self.nonfinite_steps += 1
        if cut:
            new_scale = cut_learning_rates(
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
