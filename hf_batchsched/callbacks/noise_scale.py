"""``NoiseScaleCallback``: McCandlish et al.'s gradient noise scale, measured for free inside chunked steps.

``BatchRampTrainer`` runs every optimizer step as micro-chunks of at most ``max_micro_batch_size`` samples per rank.
The trainer calls the callback's micro-chunk events (``on_micro_chunk_end``/``on_step_batch_end``, see
``hf_batchsched.trainer``) and, on measured steps:

- after the **first** chunk's backward, reads ``|g|²`` of the gradients (still this rank's chunk-1 gradient: only
  the last chunk synchronises under DDP), in place, no copy; divided by the square of that chunk's loss weight
  (``trainer.current_chunk_loss_weight``, see below) it is ``|G_Bs|²`` with ``Bs`` = the first chunk's samples on
  one rank;
- after the **last** chunk, reads ``|G_Bb|²`` of the step's (all-reduced) gradient, ``Bb`` = the global step batch;
- divides both by the fp16 loss scale squared when a ``GradScaler`` is active (overflowed steps are skipped);
- averages the per-rank ``|G_Bs|²`` over ranks (one 2-float all-reduce, on every rank), feeds
  ``GradientNoiseScale`` (bias-corrected EMAs of ``|G|²`` and ``tr(Σ)``), and, with an ``AdaptiveBatchSchedule`` as
  the trainer's ``batch_schedule``, lets the schedule decide whether to grow the batch.

Loss weighting: the trainer reports the factor by which each chunk's mean loss entered the gradient
(``trainer.current_chunk_loss_weight``, computed as transformers' Trainer applies ``num_items_in_batch``; DDP then
averages ranks): ``world · n_chunk / n_step`` (samples) for a per-example loss, ``world · items_chunk / items_step``
(label tokens, after the causal shift, ``-100`` excluded) for a token-normalised loss (causal LM with
``num_items_in_batch``). The chunk-1 gradient divided by it is exactly the gradient of chunk 1's own mean loss (over
its samples, or over its label tokens), whatever the sequence lengths. A chunk with no label token has weight 0; its
step gives a non-finite reading on every rank and is skipped.

Sizes are samples, also for a token-normalised loss: ``Bs`` and ``Bb`` count sequences, not tokens. The sampler
draws sequences, which are the independent units (tokens of one sequence are correlated). A token mean over ``B``
sequences is the ratio ``G_B = Σ s_i / Σ L_i`` (``s_i``: summed token gradient of sequence ``i``, ``L_i``: its
label tokens); expanding it around ``G = E s / E L`` gives ``E|G_B|² = |G|² + tr(Σ)/B + O(1/B²)`` with ``tr(Σ)``
the trace of ``Cov(s_i − L_i G) / mean(L)²`` plus a length-gradient correlation term from the ratio's bias: the
two-batch form holds with ``B`` in sequences, and ``B_simple`` is a global batch in samples (the batch schedule's
unit). Counting tokens instead would treat correlated tokens as independent draws and give a noise scale in tokens.

Sharded engines: under DeepSpeed ZeRO-3 and FSDP2 (``fsdp_gradient_sync="every_chunk"``) every chunk's gradient
is reduced over ranks in its own backward, so there is no per-rank chunk-1 gradient. The callback reads the reduced
one instead (``trainer.accumulated_grad_sq_norm``: ZeRO-3's local fp32 gradient partitions, FSDP2's local ``.grad``
shards, each summed over ranks with one scalar all-reduce): the gradient of the mean loss over all ranks' first
chunks, weighted by the mean over ranks of their loss weights, so ``Bs = world_size · chunk samples``. ``|G_Bb|²``
is the engine's pre-clipping global norm under ZeRO-3 (``engine.get_global_grad_norm()``; the engine has stepped
by the end of the last chunk) and the reduced sharded gradient under FSDP2. ZeRO-0/1/2 keep a chunk's gradient in
internal buffers until the accumulation boundary, FSDP2 with ``"last_chunk"`` keeps it unsharded inside FSDP, and
DeepSpeed fp16 scales it: these are refused at construction.

Steps with a single micro-chunk per rank have no second batch size and are skipped (counted in
``skipped_steps``); a configuration where no step can have two chunks is refused at construction.

Metrics (through ``trainer.log`` at the Trainer's logging cadence, so they reach every ``report_to`` integration):

| name | meaning |
|---|---|
| ``batchsched/noise_scale`` | ``B_simple = tr(Σ)/|G|²``, a global batch in samples (``inf`` while ``|G|² <= 0``) |
| ``batchsched/grad_sq_norm`` | EMA of ``|G|²``, the squared norm of the true (full-data) gradient |
| ``batchsched/trace_sigma`` | EMA of ``tr(Σ)``, the per-sample gradient variance |
| ``batchsched/adaptive_batch_size`` | the adaptive schedule's current target size (adaptive only) |
| ``batchsched/adaptive_events`` | number of batch-size changes so far (adaptive only; also logged at each change) |
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from transformers import TrainerCallback

from ..callback_binding import TrainerBoundCallback, load_callback_state, save_callback_state
from ..errors import ConfigError, check_positive
from ..probes.noise_scale import GradientNoiseScale, grad_sq_norm
from ..schedules.adaptive import AdaptiveBatchSchedule
from ..trainer import log_metrics

__all__ = ["NoiseScaleCallback"]

logger = logging.getLogger(__name__)


def _max_global_batch(schedule) -> int | None:
    """The largest global batch a schedule can ask for, when it says (``max_size`` or a constant's size)."""
    for attribute in ("max_size", "batch_size"):
        value = getattr(schedule, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_engine(trainer) -> None:
    """Refuse the engines whose first-chunk gradient the callback cannot read (see "Sharded engines")."""
    engine = getattr(trainer, "sharding_engine", None)
    if engine in ("zero0", "zero1", "zero2", "fsdp1"):
        raise ConfigError(
            f"NoiseScaleCallback does not support {engine}: the engine keeps a micro-chunk's gradient in internal "
            "buffers until the accumulation boundary. Use DDP, DeepSpeed ZeRO-3 or FSDP2"
        )
    if engine == "fsdp2" and not trainer.reduces_every_chunk:
        raise ConfigError(
            "NoiseScaleCallback under FSDP2 reads the reduce-scattered first-chunk gradient; "
            "fsdp_gradient_sync='last_chunk' keeps it unsharded inside FSDP. Use fsdp_gradient_sync='every_chunk'"
        )
    if engine is not None and engine.startswith("zero") and trainer.args.fp16:
        raise ConfigError(
            "NoiseScaleCallback under DeepSpeed fp16 would read loss-scaled partitioned gradients; use bf16 (or DDP)"
        )


class NoiseScaleCallback(TrainerBoundCallback, TrainerCallback):
    """Measure the gradient noise scale every ``every_n_steps`` optimizer steps of a ``BatchRampTrainer``.

    Args:
        trainer (`BatchRampTrainer`, *optional*): the trainer (any ``Trainer`` with ``BatchRampMixin``); the callback
            is bound to it (add it to the trainer's callbacks too: the micro-chunk events go to that list). Without it,
            the trainer binds the callback when it is in its ``callbacks=[...]`` or given to ``add_callback`` (class or
            instance).
        beta (`float`, *optional*): EMA decay of the estimator. Defaults to `0.99`, or to the adaptive schedule's
            estimator when the trainer's ``batch_schedule`` is an ``AdaptiveBatchSchedule`` (which owns it; a
            different ``beta`` then raises).
        every_n_steps (`int`, *optional*, defaults to `1`): measure on optimizer steps ``0, n, 2n, ...``. The cost
            is two in-place norm reductions over the gradients and one 2-float all-reduce per measured step.

    The estimator and (adaptive) schedule state are stored in ``TrainerState.stateful_callbacks`` under
    ``"hf_batchsched.NoiseScaleCallback"``, so they travel with every checkpoint and are restored on
    ``train(resume_from_checkpoint=...)``. Supported: single process, DDP, DeepSpeed ZeRO-3 and FSDP2 (with the
    trainer's ``fsdp_gradient_sync="every_chunk"``); see "Sharded engines" in the module docstring. Refused:
    ZeRO-0/1/2, FSDP1, FSDP2 with ``"last_chunk"``, DeepSpeed fp16.

    Example:

    ```python
    trainer = BatchRampTrainer(model=model, args=args, train_dataset=data, batch_schedule=64, max_micro_batch_size=8)
    trainer.add_callback(NoiseScaleCallback(trainer, beta=0.95))
    trainer.train()  # logs batchsched/noise_scale, batchsched/grad_sq_norm, batchsched/trace_sigma
    ```
    """

    STATE_KEY = "hf_batchsched.NoiseScaleCallback"

    def __init__(self, trainer: Any = None, beta: float | None = None, every_n_steps: int = 1):
        check_positive("every_n_steps", every_n_steps)
        self.every_n_steps = int(every_n_steps)
        self.beta = beta
        self.schedule: AdaptiveBatchSchedule | None = None
        self.estimator: GradientNoiseScale | None = None
        self.skipped_steps = 0
        self._attached = False
        self._small: torch.Tensor | None = None
        self._small_samples = 0
        self._small_weight: float | None = None
        self._new_event = False
        self._param_list: list[torch.Tensor] | None = None
        if trainer is not None:
            self.bind(trainer)

    def _bind(self, trainer: Any) -> None:
        if not hasattr(trainer, "accumulated_grad_sq_norm"):  # BatchRampMixin's chunked step
            raise ConfigError(
                f"NoiseScaleCallback needs a BatchRampTrainer (or a Trainer with BatchRampMixin), got "
                f"{type(trainer).__name__}: it measures the gradient of one micro-chunk inside each step"
            )
        _check_engine(trainer)
        beta = self.beta
        schedule = getattr(trainer, "batch_schedule", None)
        self.schedule = schedule if isinstance(schedule, AdaptiveBatchSchedule) else None
        if self.schedule is not None:
            multiple = trainer.batch_size_multiple
            if self.schedule.min_size % multiple:
                raise ConfigError(
                    f"AdaptiveBatchSchedule(min_size={self.schedule.min_size}) is not a multiple of the trainer's "
                    f"batch_size_multiple (default world_size) = {multiple}; the sampler would "
                    "round the grown sizes. Pick min_size as a multiple of it"
                )
            if beta is not None and float(beta) != self.schedule.estimator.beta:
                raise ConfigError(
                    f"beta={beta} differs from the adaptive schedule's estimator "
                    f"(beta={self.schedule.estimator.beta}); the schedule owns the estimator: set beta on "
                    "AdaptiveBatchSchedule and omit it here"
                )
            self.estimator = self.schedule.estimator
        else:
            self.estimator = GradientNoiseScale(beta=0.99 if beta is None else beta)
        self._check_two_chunks_possible()

    def _check_two_chunks_possible(self) -> None:
        trainer = self.trainer
        world_size = trainer.args.world_size
        micro = trainer.max_micro_batch_size
        if self.schedule is not None:  # it only grows once measured: the first size must already have two chunks
            largest, which = self.schedule.min_size, "the adaptive schedule's min_size"
        else:
            largest, which = _max_global_batch(getattr(trainer, "batch_schedule", None)), "the largest global batch"
        if largest is not None and largest // world_size <= micro:
            raise ConfigError(
                f"NoiseScaleCallback needs at least two micro-chunks per step, but {which} {largest} "
                f"over {world_size} rank(s) is {largest // world_size} samples per rank, one chunk of "
                f"max_micro_batch_size={micro}. Set max_micro_batch_size to at most "
                f"{max(1, largest // world_size // 2)} or use a larger batch"
            )

    # ---- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Estimator (or adaptive schedule, which holds the estimator) state and the skip counter."""
        state = {"skipped_steps": self.skipped_steps}
        if self.schedule is not None:
            state["schedule"] = self.schedule.state_dict()
        else:
            state["estimator"] = self.estimator.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = int(state["skipped_steps"])
        if self.schedule is not None:
            if "schedule" not in state:
                raise ConfigError(
                    "the checkpoint's NoiseScaleCallback state has no adaptive-schedule state; resume with the "
                    "batch_schedule the checkpoint was trained with"
                )
            self.schedule.load_state_dict(state["schedule"])
        else:
            if "estimator" not in state:
                raise ConfigError(
                    "the checkpoint's NoiseScaleCallback state comes from an adaptive-schedule run; resume with its "
                    "AdaptiveBatchSchedule as batch_schedule"
                )
            self.estimator.load_state_dict(state["estimator"])

    def _save(self, state) -> None:
        save_callback_state(state, self.STATE_KEY, self.state_dict())

    # ---- micro-chunk events (every rank) ----------------------------------------------------------------
    @property
    def step(self) -> int:
        """The optimizer step being run (completed steps so far)."""
        return self.trainer.state.global_step

    def _measuring(self) -> bool:
        return self.trainer.state.global_step % self.every_n_steps == 0

    def _params(self) -> list[torch.Tensor]:
        # Listed once per train() (walking the module tree costs about as much as the norms themselves).
        if self._param_list is None:
            self._param_list = [p for p in self.trainer.model.parameters() if p.requires_grad]
        return self._param_list

    def on_micro_chunk_end(self, trainer, chunk_index: int, num_chunks: int, chunk_num_samples: int) -> None:
        if not self._attached:
            raise ConfigError(
                "NoiseScaleCallback hears the micro-chunk events but was not added as a callback; call "
                "trainer.add_callback(callback) so it can log and save its state"
            )
        if chunk_index == 0 and num_chunks > 1 and self._measuring():
            # Only chunk 1 has been accumulated: .grad is (this rank's) chunk-1 gradient times its loss weight; under
            # ZeRO-2/3 and FSDP2 it is already reduced over ranks (see "Sharded engines").
            if getattr(trainer, "reduces_every_chunk", False):
                self._small = trainer.accumulated_grad_sq_norm(self._params())
            else:
                self._small = grad_sq_norm(self._params())
            self._small_samples = int(chunk_num_samples)
            # The factor by which chunk 1's mean loss (over its samples or label tokens) entered .grad; the trainer
            # sets it before every hook call.
            self._small_weight = trainer.current_chunk_loss_weight

    def on_step_batch_end(self, trainer, step_num_samples: int) -> None:
        if not self._measuring():
            return
        small, self._small = self._small, None
        if small is None:  # one chunk per rank (the same on every rank): no second batch size
            self.skipped_steps += 1
            if self.skipped_steps == 1:
                logger.warning(
                    "NoiseScaleCallback: a step of %d samples fits in one micro-chunk per rank; such steps are not "
                    "measured (see NoiseScaleCallback.skipped_steps)",
                    step_num_samples,
                )
            return
        world_size = trainer.accelerator.num_processes
        small_samples = self._small_samples
        if getattr(trainer, "reduces_every_chunk", False):
            # The reduced chunk-1 gradient is the mean over ranks of weight_r * (rank r's chunk-1 mean-loss
            # gradient) = mean_r(weight_r) * (gradient of the mean loss over all ranks' first chunks).
            weight = torch.tensor([float(self._small_weight)], dtype=torch.float64, device=trainer.args.device)
            weight = trainer.accelerator.reduce(weight, reduction="mean")
            big = trainer.step_grad_sq_norm(self._params())
            weight = float(weight)
            # a weight of 0 (no label token in any rank's first chunk): a non-finite reading, skipped below
            sq_small = float(small) / weight**2 if weight > 0 else math.inf
            sq_big = float(big)
            small_samples *= world_size
        else:
            big = grad_sq_norm(self._params())
            norms = torch.stack([small.to(big.device, big.dtype) / self._small_weight**2, big])
            if world_size > 1:  # every rank: mean of the per-rank small norms; the big one is identical on all ranks
                norms = trainer.accelerator.reduce(norms, reduction="mean")
            sq_small, sq_big = (float(value) for value in norms.tolist())
        scaler = getattr(trainer.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():  # fp16: .grad holds loss-scaled gradients until unscale_
            loss_scale = float(scaler.get_scale())
            sq_small, sq_big = sq_small / loss_scale**2, sq_big / loss_scale**2
        if not (math.isfinite(sq_small) and math.isfinite(sq_big)):
            self.skipped_steps += 1
            logger.warning("NoiseScaleCallback: non-finite gradient norm at step %d, skipped", self.step)
            return
        self.estimator.update(sq_small, sq_big, small_samples, step_num_samples)
        if self.schedule is not None:
            # The change applies to batches the sampler has not drawn yet: with DataLoader workers, that is after
            # the num_workers * prefetch_factor batches already requested.
            args = trainer.args
            prefetched = args.dataloader_num_workers * (args.dataloader_prefetch_factor or 2)
            event = self.schedule.observe(
                consumed=trainer.clock.consumed_samples,
                prefetched_batches=prefetched,
                step=trainer.state.global_step,
            )
            self._new_event = self._new_event or event is not None

    # ---- Trainer callbacks ----------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self._attached = True
        self._param_list = None
        saved = load_callback_state(state, self.STATE_KEY)
        if saved is not None and state.global_step > 0:
            self.load_state_dict(saved)
        elif state.global_step == 0:  # a fresh run starts a fresh estimate
            if self.schedule is not None:
                self.schedule.reset()
            else:
                self.estimator.reset()
            self.skipped_steps = 0
        self._save(state)

    def metrics(self) -> dict[str, float]:
        """The values ``NoiseScaleCallback`` logs (see the module docstring's table)."""
        logs = {
            "batchsched/noise_scale": self.estimator.noise_scale,
            "batchsched/grad_sq_norm": self.estimator.grad_sq_norm,
            "batchsched/trace_sigma": self.estimator.trace_sigma,
        }
        if self.schedule is not None:
            logs["batchsched/adaptive_batch_size"] = self.schedule.current_size
            logs["batchsched/adaptive_events"] = len(self.schedule.events)
        return logs

    def on_step_end(self, args, state, control, **kwargs):
        self._save(state)
        if self._new_event or (control.should_log and self.estimator.num_updates):
            self._new_event = False
            log_metrics(self.trainer, self.metrics())
