"""``StabilityMonitorCallback``: depth profile of activations, per-block gradient norms, divergence alarms.

A thin shell over ``hf_batchsched.probes.stability`` (functional twins: ``activation_profile``, ``bn_profile``,
``block_grad_norms``) and ``hf_batchsched.probes.spikes.LossSpikeDetector``. Metrics (``<block>`` is a module
name such as ``model.layers.3``, ``<bn>`` a BN layer name; per-layer keys only with ``per_layer=True``):

| Metric | Meaning |
|---|---|
| ``stability/act_rms/<block>``, ``stability/act_mean/<block>`` | RMS, mean of the block output (sampled step) |
| ``stability/act_log_rms_slope`` | slope of ln(RMS) against block index: growth per block is ``exp(slope)`` |
| ``stability/act_growth`` | RMS of the last block / RMS of the first |
| ``stability/act_rms_max`` | largest block RMS |
| ``stability/act_growth_alarm`` | 1 when ``act_growth > max_activation_growth`` or an RMS is not finite, else 0 |
| (any key) | left out of a log when its value is undefined or not finite (e.g. ``loss_ratio`` in the first steps) |
| ``stability/grad_norm/<block>`` | L2 norm of the block's gradients (after clipping, before the optimizer step) |
| ``stability/grad_norm_total`` | L2 norm of all gradients, same point |
| ``stability/loss_ratio`` | largest step loss / 90th percentile of the window, in the interval (spike: > 3) |
| ``stability/loss_spikes`` | cumulative number of loss spikes (non-finite losses included) |
| ``bn/rms/<bn>``, ``bn/mean/<bn>`` | RMS and mean of the BN layer's input from its running statistics (no hooks) |
| ``bn/log_rms_slope``, ``bn/growth``, ``bn/rms_max`` | the same summaries over the BN layers |
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback

from hf_batchsched.callback_binding import TrainerBoundCallback, load_callback_state, save_callback_state
from hf_batchsched.errors import ConfigError, check_positive
from hf_batchsched.model_utils import batchnorm_modules, is_distributed, model_device
from hf_batchsched.probes.spikes import LossSpikeDetector
from hf_batchsched.probes.stability import ActivationRecorder, block_grad_norms, bn_profile, find_blocks
from hf_batchsched.trainer import log_metrics

__all__ = ["StabilityMonitorCallback"]

logger = logging.getLogger(__name__)


def _loss_of(output: Any) -> torch.Tensor | None:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        loss = output[0] if output[0].dim() == 0 else None
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


def _items_in(kwargs: Mapping[str, Any], args: tuple) -> torch.Tensor | int:
    """Items a micro-batch's mean loss averages over: label tokens (a device tensor: no host sync), or samples."""
    labels = kwargs.get("labels")
    if isinstance(labels, torch.Tensor):
        return (labels != -100).sum() if labels.dim() > 1 else labels.shape[0]
    for value in list(kwargs.values()) + list(args):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return 1


class StabilityMonitorCallback(TrainerBoundCallback, TrainerCallback):
    """Log a depth profile of activations and gradients every ``every_n_steps``, and flag divergence every step.

    On a sampled step (``global_step % every_n_steps == 0``) forward hooks are attached to the model's blocks
    for that step only (Composer ``ActivationMonitor`` style: no cost on other steps) and accumulate the RMS and
    mean of each block's output over all its micro-batches; per-block gradient norms are read in
    ``on_pre_optimizer_step`` (after the Trainer's clipping, before ``optimizer.step`` and ``zero_grad``); BN
    layers, if any, add a hook-free profile from their running statistics. Every step's training loss is taken
    from the model's output by one cheap forward hook (sample-weighted over micro-batches, or summed when the
    Trainer normalises by ``num_items_in_batch``) and checked by a ``LossSpikeDetector`` on the sampled steps (one
    host transfer per interval, losses averaged across ranks). Divergence per Bjorck et al. 2018: a loss spike,
    or activations growing more than ``max_activation_growth`` from the first block to the last. With
    ``stop_on_divergence`` training stops at the first alarm (on every rank). Works on BN CNNs and on
    LayerNorm/RMSNorm LLMs (blocks = decoder layers). Activation statistics are averaged across ranks.

    The loss window, spike and alarm counts are saved with checkpoints (``trainer_state.json``, key
    ``"hf_batchsched.StabilityMonitorCallback"``) and restored on ``train(resume_from_checkpoint=...)``.

    Args:
        trainer (`transformers.Trainer`, *optional*):
            The trainer to monitor; metrics go through ``trainer.log`` to every ``report_to`` integration. Without
            it the callback is bound by ``BatchRampTrainer`` or ``hf_batchsched.bind_callbacks(trainer)``.
        every_n_steps (`int`, *optional*, defaults to `25`):
            Sampling interval in optimizer steps (1-3% of a 5 ms/step toy ResNet run, less on real models).
        block_class (`str`, *optional*):
            Class name of the blocks to profile (e.g. ``"LlamaDecoderLayer"``); detected by ``find_blocks`` if
            `None`.
        per_layer (`bool`, *optional*, defaults to `True`):
            Log per-block/per-BN-layer keys, not only the summaries.
        spike_window (`int`, *optional*, defaults to `50`):
            Steps in the loss window.
        spike_threshold (`float`, *optional*, defaults to `3.0`):
            Ratio of a step loss to the window's 90th percentile that counts as a spike.
        spike_min_delta (`float`, *optional*, defaults to `0.1`):
            Smallest absolute rise above that percentile that counts as a spike (ignores noise near zero loss).
        max_activation_growth (`float`, *optional*, defaults to `1000.0`):
            Last-block / first-block RMS ratio that counts as divergence (Bjorck et al. see about 1e5 over a
            110-layer net without BN; a healthy pre-norm LLM stays within 10-100).
        stop_on_divergence (`bool`, *optional*, defaults to `False`):
            Set ``control.should_training_stop`` at the first alarm.

    Example:

    ```python
    trainer.add_callback(StabilityMonitorCallback(trainer, every_n_steps=25))
    ```
    """

    STATE_KEY = "hf_batchsched.StabilityMonitorCallback"

    def __init__(
        self,
        trainer: Any = None,
        every_n_steps: int = 25,
        block_class: str | None = None,
        per_layer: bool = True,
        spike_window: int = 50,
        spike_threshold: float = 3.0,
        spike_min_delta: float = 0.1,
        max_activation_growth: float = 1000.0,
        stop_on_divergence: bool = False,
    ):
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int):
            raise ConfigError(f"every_n_steps must be an int, got {every_n_steps!r}")
        check_positive("every_n_steps", every_n_steps)
        if not max_activation_growth > 1:
            raise ConfigError(f"max_activation_growth must be > 1 (an RMS ratio), got {max_activation_growth}")
        self.every_n_steps = every_n_steps
        self.block_class = block_class
        self.per_layer = per_layer
        self.max_activation_growth = float(max_activation_growth)
        self.stop_on_divergence = stop_on_divergence
        self.detector = LossSpikeDetector(
            window=spike_window,
            threshold=spike_threshold,
            min_history=min(5, spike_window),
            min_delta=spike_min_delta,
        )
        self.blocks: list = []
        self.recorder: ActivationRecorder | None = None
        self.has_batchnorm = False
        self.alarms = 0
        self._loss_handle: Any = None
        self._micro_losses: list[tuple[torch.Tensor, torch.Tensor | int | None]] = []
        self._pending_steps: list[list[tuple[torch.Tensor, torch.Tensor | int | None]]] = []
        self._grad_norms: torch.Tensor | None = None
        if trainer is not None:
            self.bind(trainer)

    def _bind(self, trainer: Any) -> None:
        if getattr(trainer, "model", None) is None:
            raise ConfigError("StabilityMonitorCallback needs a Trainer with a model")
        self.blocks = find_blocks(trainer.model, self.block_class)
        self.recorder = ActivationRecorder(self.blocks, training_only=True)
        self.has_batchnorm = bool(batchnorm_modules(trainer.model))

    # -- checkpoint state ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"detector": self.detector.state_dict(), "alarms": self.alarms}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.detector.load_state_dict(state.get("detector", {}))
        self.alarms = int(state.get("alarms", 0))

    # -- helpers ------------------------------------------------------------------------------------------------

    def _sampled(self, step: int) -> bool:
        return step > 0 and step % self.every_n_steps == 0

    def record_loss(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """The model's forward hook (installed in ``on_train_begin``): records each training forward's loss."""
        if not (module.training and torch.is_grad_enabled()):  # skip evaluation and no-grad probes
            return
        loss = _loss_of(output)
        if loss is None:
            return
        scaled = kwargs.get("num_items_in_batch") is not None
        self._micro_losses.append((loss.detach(), None if scaled else _items_in(kwargs, args)))

    def _close_step_loss(self) -> None:
        # No tensor work here: the step's micro-batch losses wait, on the device, for the next sampled step.
        if self._micro_losses:
            self._pending_steps.append(self._micro_losses)
        self._micro_losses = []

    def _drain_losses(self) -> list[float]:
        """Per-step losses since the last sampled step (one host transfer), averaged across ranks."""
        records = [record for step in self._pending_steps for record in step]
        values: list[float] = []
        if records:
            device = records[0][0].device
            losses = torch.stack([loss.float().reshape(()).to(device) for loss, _ in records]).tolist()
            weights = torch.stack(
                [torch.as_tensor(1.0 if w is None else w, dtype=torch.float32, device=device) for _, w in records]
            ).tolist()
            position = 0
            for step in self._pending_steps:
                step_losses = losses[position : position + len(step)]
                step_weights = weights[position : position + len(step)]
                position += len(step)
                if any(w is None for _, w in step):  # each micro loss is already its share of the step's mean
                    values.append(sum(step_losses))
                else:  # each micro loss is a mean over its own items: weight by item count
                    total = sum(step_weights)
                    values.append(sum(v * w for v, w in zip(step_losses, step_weights)) / max(total, 1.0))
        self._pending_steps = []
        if is_distributed():
            # Every rank has run the same number of steps, so the vectors line up.
            tensor = torch.tensor(values, dtype=torch.float64, device=self._device())
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
            values = (tensor / torch.distributed.get_world_size()).tolist()
        return values

    def _device(self) -> torch.device:
        if is_distributed() and torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return model_device(self.trainer.model)

    # -- events -------------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        saved = load_callback_state(state, self.STATE_KEY)
        if saved is not None:
            self.load_state_dict(saved)
        if self._loss_handle is None:
            self._loss_handle = self.trainer.model.register_forward_hook(self.record_loss, with_kwargs=True)
        self._micro_losses, self._pending_steps = [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self._micro_losses = []
        if self._sampled(state.global_step + 1):
            self.recorder.attach()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._sampled(state.global_step + 1) and self.blocks:
            _, self._grad_norms = block_grad_norms(self.trainer.model, self.blocks)

    def on_step_end(self, args, state, control, **kwargs):
        self._close_step_loss()
        if not self._sampled(state.global_step):
            self.recorder.detach()
            return
        logs, diverged = self._collect()
        if diverged and self.stop_on_divergence:
            control.should_training_stop = True
        save_callback_state(state, self.STATE_KEY, self.state_dict())
        log_metrics(self.trainer, logs)

    def on_train_end(self, args, state, control, **kwargs):
        self.recorder.detach()
        if self._loss_handle is not None:
            self._loss_handle.remove()
            self._loss_handle = None
        self._micro_losses, self._pending_steps = [], []

    # -- the sampled-step work ----------------------------------------------------------------------------------

    def _collect(self) -> tuple[dict[str, float], bool]:
        logs: dict[str, float] = {}
        diverged = False
        sums = self.recorder.dense_sums(self._device())
        self.recorder.detach()
        if is_distributed():  # same shape on every rank (zeros where a rank saw nothing): the collective always runs
            torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
        profile = self.recorder.profile(sums)
        if profile.names:
            logs.update(profile.to_metrics("stability/act_", self.per_layer))
            growth = profile.growth
            alarm = (not all(math.isfinite(v) for v in profile.rms)) or (
                math.isfinite(growth) and growth > self.max_activation_growth
            )
            logs["stability/act_growth_alarm"] = float(alarm)
            if alarm:
                diverged = True
                logger.warning(
                    "StabilityMonitorCallback: activations grow %.3g x from the first block to the last (limit %.3g)",
                    growth,
                    self.max_activation_growth,
                )
        if self._grad_norms is not None:
            norms = self._grad_norms.tolist()
            self._grad_norms = None
            if self.per_layer:
                for (name, _), value in zip(self.blocks, norms):
                    logs[f"stability/grad_norm/{name}"] = value
            logs["stability/grad_norm_total"] = norms[-1]
        if self.has_batchnorm:
            logs.update(bn_profile(self.trainer.model).to_metrics("bn/", self.per_layer))
        spikes_before = self.detector.spikes
        ratios = []
        for loss in self._drain_losses():
            self.detector.update(loss)
            ratios.append(self.detector.last_ratio)
        if self.detector.spikes > spikes_before:
            diverged = True
            logger.warning(
                "StabilityMonitorCallback: %d loss spike(s) above %.3g x the recent 90th percentile in %d steps",
                self.detector.spikes - spikes_before,
                self.detector.threshold,
                self.every_n_steps,
            )
        finite_ratios = [ratio for ratio in ratios if math.isfinite(ratio)]
        if finite_ratios:
            logs["stability/loss_ratio"] = max(finite_ratios)
        logs["stability/loss_spikes"] = float(self.detector.spikes)
        if diverged:
            self.alarms += 1
        # Undefined values (too little history, a single block, a non-finite activation) are left out rather than
        # sent as NaN, which some report_to integrations reject; the alarms above still record non-finite values.
        return {key: value for key, value in logs.items() if math.isfinite(value)}, diverged
