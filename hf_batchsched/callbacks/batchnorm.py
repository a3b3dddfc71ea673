"""Trainer callbacks for BatchNorm: recalibrate running statistics before evaluation, freeze BN layers.

Thin shells over ``hf_batchsched.transforms`` (``recalibrate_bn``, ``freeze_bn``); see there for the maths.

| Metric | Meaning |
|---|---|
| ``bn/recalibration_samples`` | samples (this rank) whose pooled statistics now sit in the BN running buffers |
| ``bn/recalibration_batches`` | batches used for that recalibration |
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from transformers import TrainerCallback

from hf_batchsched.callback_binding import TrainerBoundCallback
from hf_batchsched.errors import ConfigError, check_positive
from hf_batchsched.model_utils import batchnorm_modules
from hf_batchsched.trainer import log_metrics
from hf_batchsched.transforms import freeze_bn, is_bn_frozen, recalibrate_bn, unfreeze_bn

__all__ = ["BNRecalibrationCallback", "FreezeBNCallback"]


def _require_batchnorm(trainer: Any, who: str) -> None:
    if getattr(trainer, "model", None) is None:
        raise ConfigError(f"{who} needs a Trainer with a model")
    if not batchnorm_modules(trainer.model, tracked_only=False):
        raise ConfigError(
            f"{who}: {type(trainer.model).__name__} has no BatchNorm layer, so there is nothing to do; "
            "remove the callback (LayerNorm/RMSNorm models keep no running statistics)"
        )


class BNRecalibrationCallback(TrainerBoundCallback, TrainerCallback):
    """Recompute BN running statistics with the current weights before each evaluation and at the end of training.

    Running statistics are an EMA over past batches computed with past weights; while the batch size ramps the
    EMA memory changes too (at momentum 0.1 it covers 0.03 epochs of CIFAR-10 at B=128 but 1.6 epochs at B=8192).
    Goyal et al. 2017 (Sec. 5.2) note validation curves "match earlier if BN statistics are recomputed prior to
    evaluating". This callback calls ``recalibrate_bn`` (pooled, sample-weighted, all-reduced across ranks) on
    ``num_batches`` training batches:

    - before every evaluation the Trainer runs during ``train()``. Hugging Face's ``on_evaluate`` fires *after*
      the evaluation, so the callback acts in ``on_step_end``/``on_epoch_end`` when ``control.should_evaluate`` is
      set; the Trainer's own ``DefaultFlowCallback`` sets it in those same events and always runs first, and the
      evaluation follows right after. Checkpoints saved at that step hold the recalibrated statistics. A callback
      added after this one that sets ``should_evaluate`` itself is not seen.
    - in ``on_train_end``: the model left in memory after ``train()`` has fresh statistics (save it with
      ``trainer.save_model()``); checkpoints written during training are not rewritten.

    Batches come from ``trainer.get_train_dataloader()`` (sharded per rank, on the right device), created under
    a forked RNG so the training run's randomness is untouched; pass ``dataloader`` to use other data.

    Args:
        trainer (`transformers.Trainer`, *optional*):
            The trainer whose ``model`` to recalibrate; without it the callback is bound by ``BatchRampTrainer`` or
            ``hf_batchsched.bind_callbacks(trainer)``.
        num_batches (`int`, *optional*, defaults to `50`):
            Training batches per recalibration (schedule-free users report about 50 suffices).
        on_evaluate (`bool`, *optional*, defaults to `True`):
            Recalibrate before each evaluation during training.
        on_train_end (`bool`, *optional*, defaults to `True`):
            Recalibrate once more when training ends.
        dataloader (`Iterable`, *optional*):
            Batches to use instead of a fresh training dataloader.
        forward_fn (`Callable[[model, batch], Any]`, *optional*):
            How to run a batch; ``model(**batch)`` by default.
        micro_batch_size (`int`, *optional*):
            Forward each batch in chunks of at most this many samples; defaults to the trainer's
            ``max_micro_batch_size`` under ``BatchRampTrainer`` (whose batches hold a whole ramp step), else no split.

    Example:

    ```python
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val)
    trainer.add_callback(BNRecalibrationCallback(trainer, num_batches=50))
    trainer.train()
    ```
    """

    def __init__(
        self,
        trainer: Any = None,
        num_batches: int = 50,
        on_evaluate: bool = True,
        on_train_end: bool = True,
        dataloader: Iterable[Any] | None = None,
        forward_fn: Callable[[torch.nn.Module, Any], Any] | None = None,
        micro_batch_size: int | None = None,
    ):
        if micro_batch_size is not None and (
            isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1
        ):
            raise ConfigError(f"micro_batch_size must be a positive int or None, got {micro_batch_size!r}")
        if isinstance(num_batches, bool) or not isinstance(num_batches, int):
            raise ConfigError(f"num_batches must be an int, got {num_batches!r}")
        check_positive("num_batches", num_batches)
        if not (on_evaluate or on_train_end):
            raise ConfigError("BNRecalibrationCallback with on_evaluate=False and on_train_end=False does nothing")
        self.num_batches = num_batches
        self.recalibrate_on_evaluate = on_evaluate
        self.recalibrate_on_train_end = on_train_end
        self.dataloader = dataloader
        self.forward_fn = forward_fn
        self.micro_batch_size = micro_batch_size
        self.last_step: int | None = None
        self.last_result: dict[str, int] | None = None
        if trainer is not None:
            self.bind(trainer)

    def _bind(self, trainer: Any) -> None:
        _require_batchnorm(trainer, "BNRecalibrationCallback")
        if self.micro_batch_size is None:
            self.micro_batch_size = getattr(trainer, "max_micro_batch_size", None)
        if self.dataloader is None and getattr(trainer, "train_dataset", None) is None:
            raise ConfigError("BNRecalibrationCallback needs trainer.train_dataset or an explicit dataloader=")

    def recalibrate(self) -> dict[str, int]:
        """Run one recalibration now (every rank must call it) and log it."""
        if self.dataloader is not None:
            batches = self.dataloader
        else:
            with torch.random.fork_rng():
                batches = self.trainer.get_train_dataloader()
        with torch.random.fork_rng():
            result = recalibrate_bn(
                self.trainer.model, batches, self.num_batches, self.forward_fn, micro_batch_size=self.micro_batch_size
            )
        self.last_step = self.trainer.state.global_step
        self.last_result = result
        log_metrics(
            self.trainer,
            {
                "bn/recalibration_samples": float(result["num_samples"]),
                "bn/recalibration_batches": float(result["num_batches"]),
            },
        )
        return result

    def _before_evaluation(self, state: Any, control: Any) -> None:
        if self.recalibrate_on_evaluate and control.should_evaluate and self.last_step != state.global_step:
            self.recalibrate()

    def on_step_end(self, args, state, control, **kwargs):
        self._before_evaluation(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._before_evaluation(state, control)

    def on_train_end(self, args, state, control, **kwargs):
        if self.recalibrate_on_train_end:
            self.recalibrate()


class FreezeBNCallback(TrainerBoundCallback, TrainerCallback):
    """Freeze every BN layer (running statistics fixed, inference-mode normalisation) from ``after_step`` on.

    ``Trainer`` calls ``model.train()`` every step, which undoes a plain ``bn.eval()``; ``freeze_bn`` puts a
    forward pre-hook on each BN layer that forces inference mode at every call, so the freeze holds. Typical use:
    fine-tuning a BN model on small per-device batches, or freezing statistics for the last part of a batch ramp.
    The freeze is applied in ``on_step_begin`` once ``state.global_step >= after_step`` (so it is re-applied after
    a resume) and undone in ``on_train_end`` unless ``unfreeze_at_end=False``. Stateless.

    Args:
        trainer (`transformers.Trainer`, *optional*):
            The trainer whose ``model`` to freeze; without it the callback is bound by ``BatchRampTrainer`` or
            ``hf_batchsched.bind_callbacks(trainer)``.
        after_step (`int`, *optional*, defaults to `0`):
            First optimizer step (``global_step``) that runs with frozen BN; 0 freezes from the start.
        freeze_affine (`bool`, *optional*, defaults to `False`):
            Also stop training BN's scale and shift (``requires_grad=False``).
        unfreeze_at_end (`bool`, *optional*, defaults to `True`):
            Undo the freeze (hooks and ``requires_grad``) when training ends.

    Example:

    ```python
    trainer.add_callback(FreezeBNCallback(trainer, after_step=1000, freeze_affine=True))
    ```
    """

    def __init__(
        self, trainer: Any = None, after_step: int = 0, freeze_affine: bool = False, unfreeze_at_end: bool = True
    ):
        if isinstance(after_step, bool) or not isinstance(after_step, int):
            raise ConfigError(f"after_step must be an int, got {after_step!r}")
        check_positive("after_step", after_step, allow_zero=True)
        self.after_step = after_step
        self.freeze_affine = freeze_affine
        self.unfreeze_at_end = unfreeze_at_end
        if trainer is not None:
            self.bind(trainer)

    def _bind(self, trainer: Any) -> None:
        _require_batchnorm(trainer, "FreezeBNCallback")

    @property
    def frozen(self) -> bool:
        """Whether the model's BN layers are currently frozen."""
        layers = batchnorm_modules(self.trainer.model, tracked_only=False)
        return bool(layers) and all(is_bn_frozen(bn) for _, bn in layers)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= self.after_step and not self.frozen:
            freeze_bn(self.trainer.model, freeze_affine=self.freeze_affine)

    def on_train_end(self, args, state, control, **kwargs):
        if self.unfreeze_at_end:
            unfreeze_bn(self.trainer.model)
