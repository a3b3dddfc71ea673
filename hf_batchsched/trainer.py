"""Batch-size ramping inside the Hugging Face ``Trainer``: ``BatchRampMixin`` and ``BatchRampTrainer``.

The global batch B(t) is a pure function of the training clock (consumed samples or tokens), realised as
accumulation at a fixed micro-batch: the DataLoader yields one step batch per optimizer step (``RampBatchSampler``),
``training_step`` runs it in micro-chunks of at most ``max_micro_batch_size`` sequences, and the loss is normalised
over the whole step batch. Options, behaviour, micro-chunk events and metrics: ``docs/batch-ramp.md``; checkpoints
and resume: ``docs/checkpoints.md``; engines: ``docs/distributed.md``.

This is the one module that touches Trainer, accelerate or torch internals (the ``Trainer`` overrides,
``_prepare_inputs``, FSDP2/ZeRO-3 parameter gathering, and the public helpers the callbacks use instead:
``set_scheduler_lrs``, ``log_metrics``, ``prepare_inputs``); the logic that reads no internals lives in
``launch``, ``ramp_plan``, ``batching``, ``loss_weights``, ``sharded_grads``, ``checkpoint`` and ``callback_binding``.

Example:

>>> from transformers import TrainingArguments
>>> from hf_batchsched.assets import tiny_llama, synthetic_lm_dataset
>>> args = TrainingArguments("/tmp/ramp-doctest", per_device_train_batch_size=4, num_train_epochs=1,
...                          report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
>>> trainer = BatchRampTrainer(model=tiny_llama(), args=args, train_dataset=synthetic_lm_dataset(32),
...                            batch_schedule=lambda consumed: 8 if consumed < 16 else 16)
>>> from transformers import PrinterCallback
>>> trainer.remove_callback(PrinterCallback)
>>> _ = trainer.train()
>>> trainer.ramp_plan, trainer.clock.optimizer_steps, trainer.clock.consumed_samples
([8, 8, 16], 3, 32)
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
from collections.abc import Mapping
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy

from .batching import batch_len, count_batch, packed_sequence_starts, split_micro_chunks
from .callback_binding import bind_callbacks, check_chunk_listeners_added, save_callback_state
from .checkpoint import (
    RAMP_STATE_KEY,
    TRAINER_STATE_FILE,
    append_batch_size,
    check_same_stream,
    expand_batch_sizes,
    find_resume_checkpoint,
    save_trainer_state_atomically,
    validate_ramp_state,
)
from .chunk_checks import check_packed_batch, has_left_padding, leading_trim_candidate, trimmed_outputs_agree
from .clock import TrainingClock
from .coupling import CouplingCallback, resolve_coupling
from .data.sampler import DrawnStep, RampBatchSampler
from .errors import ConfigError, check_choice
from .launch import (
    FSDP_GRADIENT_SYNC,
    FSDP_ON_CPU_ENV,
    check_distributed_launch,
    check_lr_policy_owns_lr,
    check_ramp_options,
    check_sharding_engine,
    copy_training_arguments,
    env_flag,
    fsdp_requested,
    no_tokens_for_policy,
    ramp_batch_sizes,
    ramp_data_options,
)
from .loss_weights import chunk_accumulation, chunk_loss_weights, per_token_labels
from .ramp_loader import build_ramp_sampler, ramp_dataloader
from .ramp_metrics import add_ramp_metrics
from .ramp_plan import (
    check_resumed_plan,
    check_training_left,
    plan_fingerprint,
    plan_summary,
    resumed_plan_changes,
    step_sizes,
)
from .schedules.base import Policy
from .schedules.batch_config import as_batch_schedule
from .schedules.seesaw_pair import check_seesaw_pair
from .schedules.smith import sgd_noise_of_group
from .sharded_grads import accumulated_grad_sq_norm, step_grad_sq_norm

__all__ = [
    "BatchRampMixin",
    "BatchRampTrainer",
    "full_parameters",
    "log_metrics",
    "prepare_inputs",
    "set_scheduler_lrs",
]

logger = logging.getLogger(__name__)


# ---- helpers for the callbacks: the Trainer's and torch's internals they need, in one place ---------------------
def fsdp_gradient_bytes(model: torch.nn.Module) -> int:
    """Bytes of gradient this rank holds now: the local shards of the parameters' ``.grad`` plus, under FSDP2, the
    unsharded gradients and accumulated gradients that FSDP keeps in its own (private) parameter state between a
    backward and the reduce-scatter. The sharded-engine benchmark reads it after a micro-chunk."""
    from torch.distributed.fsdp import FSDPModule

    total = 0
    for module in model.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            for fsdp_param in group.fsdp_params if group is not None else []:
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                if unsharded is not None and unsharded.grad is not None:
                    total += unsharded.grad.numel() * unsharded.grad.element_size()
                accumulated = getattr(fsdp_param, "unsharded_accumulated_grad", None)
                if accumulated is not None:
                    total += accumulated.numel() * accumulated.element_size()
    for p in model.parameters():
        if p.grad is not None:
            local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            total += local.numel() * local.element_size()
    return total


def set_scheduler_lrs(scheduler, lrs) -> None:
    """Tell a torch LR scheduler that its last LRs are ``lrs`` (what ``get_last_lr()`` returns), after a callback set
    the optimizer's group LRs itself (an LR cut, a policy switch). torch keeps them in the private ``_last_lr``; a
    scheduler without it is left alone.

    >>> import torch
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    >>> set_scheduler_lrs(sched, [0.05]); sched.get_last_lr()
    [0.05]
    """
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = list(lrs)


def prepare_inputs(trainer: Trainer, batch: Mapping) -> dict:
    """``batch`` as the Trainer would feed it to the model (on its device, through its private ``_prepare_inputs``),
    for code that runs the model on batches itself (the LR range test, probes)."""
    return trainer._prepare_inputs(batch)


def _plain(value: Any) -> Any:
    """A Python number for a one-element tensor (integrations such as MLflow reject tensors), else ``value``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def log_metrics(trainer: Any, logs: Mapping[str, Any]) -> None:
    """Log ``logs`` through ``trainer.log`` from any callback event without cancelling the Trainer's own log.

    A plain ``trainer.log`` from ``on_step_end``/``on_epoch_end`` on a logging step would clear ``control.should_log``
    and cancel the Trainer's own training entry; this calls the base ``transformers.Trainer.log`` (not trl's
    override, which would repeat or take away its step metrics) and puts the flag back. Call it on every rank; it runs
    no collective. Why, event by event: ``docs/api.md`` ("Logging from a callback").

    Args:
        trainer (`transformers.Trainer`):
            The trainer (``transformers.Trainer.log`` is called on it; anything else with ``log(dict)`` has its own
            ``log`` called; ``control`` is read when present).
        logs (`Mapping[str, float]`):
            Metric name to value; one-element tensors are turned into Python numbers. Nothing is logged when empty.

    Example:

    >>> from types import SimpleNamespace
    >>> from transformers.trainer_callback import TrainerControl
    >>> trainer = SimpleNamespace(control=TrainerControl(should_log=True), history=[])
    >>> def log(logs):  # what Trainer.log does to the flag, through CallbackHandler.on_log
    ...     trainer.history.append(logs)
    ...     trainer.control.should_log = False
    >>> trainer.log = log
    >>> log_metrics(trainer, {"sharpness/avg": torch.tensor(0.25)})
    >>> trainer.history, trainer.control.should_log
    ([{'sharpness/avg': 0.25}], True)
    """
    if not logs:
        return
    control = getattr(trainer, "control", None)
    pending = bool(getattr(control, "should_log", False))
    log = functools.partial(Trainer.log, trainer) if isinstance(trainer, Trainer) else trainer.log
    log({key: _plain(value) for key, value in logs.items()})
    if pending:
        # Trainer.log may have replaced trainer.control with what the on_log callbacks returned: set both.
        control.should_log = True
        trainer.control.should_log = True


def _enable_fsdp_on_cpu(args) -> None:
    """Let accelerate build its FSDP plugin for CPU processes (opt-in through ``HF_BATCHSCHED_FSDP_ON_CPU=1``).

    accelerate picks FSDP only when the process state is a multi-GPU-like type; CPU processes are ``MULTI_CPU`` and
    get plain DDP. Before the Trainer creates its ``Accelerator``, the (not yet final) process type is presented as
    multi-device so the ``AcceleratorState`` turns it into ``FSDP``; the device stays the CPU and the process group
    is the one already initialised (gloo). Does nothing when no FSDP was asked for or the state is already built.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if not fsdp_requested(args) or AcceleratorState._shared_state:
        return
    state = PartialState()
    if state.distributed_type == DistributedType.MULTI_CPU:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def _fsdp_modules(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


@contextlib.contextmanager
def full_parameters(trainer):
    """Yield ``trainer.model`` with every parameter whole and plain on every rank, for probes that perturb weights.

    One process, DDP, ZeRO-0/1/2: the model as it is (parameters are not sharded). ZeRO-3: all parameters gathered
    (``deepspeed.zero.GatheredParameters``, no write-back) with the engine's partitioning hooks detached, so forwards
    see the full weights. FSDP2: every ``FSDPModule`` unsharded with resharding and gradient reduction off, so the
    model's parameters are the unsharded tensors and forwards/backwards run on them without collectives. On exit the
    sharded state is restored; a probe that restores what it perturbs (all hf-batchsched probes do) leaves the
    model exactly as found. Costs the memory of the full model on each rank while inside. Call on every rank.
    """
    engine = getattr(trainer, "sharding_engine", None) or check_sharding_engine(trainer)
    model = trainer.model
    if engine == "zero3":
        import deepspeed

        offload = trainer.model_wrapped.optimizer.parameter_offload
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            for param in model.parameters():
                param.ds_active_sub_modules.clear()
            for hook in offload.forward_hooks + offload.backward_hooks:
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield model
            finally:
                coordinator = getattr(offload, "param_coordinator", None)
                if coordinator is not None and not coordinator.is_invalid_trace():
                    coordinator._invalidate_trace()
                offload._register_deepspeed_module(offload.module)
    elif engine == "fsdp2":
        # modules that own parameters (a root whose parameters all live in wrapped children has no group)
        modules = [m for m in _fsdp_modules(model) if m._get_fsdp_state()._fsdp_param_group is not None]
        saved = []
        for module in modules:
            group = module._get_fsdp_state()._fsdp_param_group
            saved.append((group.post_forward_mesh_info is not None, group.reshard_after_backward))
            module.set_reshard_after_forward(False, recurse=False)
            module.set_reshard_after_backward(False, recurse=False)
            module.set_requires_gradient_sync(False, recurse=False)
        for module in modules:
            module.unshard()
        try:
            yield model
        finally:
            for module, (after_forward, after_backward) in zip(modules, saved):
                module.reshard()
                module.set_reshard_after_forward(after_forward, recurse=False)
                module.set_reshard_after_backward(after_backward, recurse=False)
                module.set_requires_gradient_sync(True, recurse=False)
    elif engine == "fsdp1":
        raise ConfigError("probes on FSDP1 models are not supported; use FSDP2 (fsdp_version: 2) or DeepSpeed")
    else:
        yield model


class _RampCallback(TrainerCallback):
    """Keeps ``state.epoch`` in data passes, fires epoch strategies at pass boundaries, records each step's size."""

    def __init__(self, trainer: BatchRampMixin):
        self.trainer = trainer
        self._epoch_flags_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        # The Trainer runs the whole ramp as one epoch of the first batch size; trainer_state.json gets the real
        # figures: passes over the data, and the most sequences one forward sees per rank.
        state.num_train_epochs = round(self.trainer.ramp_passes, 6)
        state.train_batch_size = self.trainer.max_micro_batch_size

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        append_batch_size(trainer._batch_size_history, trainer.last_batch_size)
        rows_per_pass = trainer._ramp_sampler.num_rows
        consumed = trainer.ramp_position
        state.epoch = consumed / rows_per_pass
        if (consumed - (trainer.last_step_rows or 0)) // rows_per_pass < consumed // rows_per_pass:
            if args.logging_strategy == IntervalStrategy.EPOCH:
                control.should_log = True
            if args.eval_strategy == IntervalStrategy.EPOCH and args.eval_delay <= state.epoch:
                control.should_evaluate = True
            if args.save_strategy == IntervalStrategy.EPOCH:
                control.should_save = True
            self._epoch_flags_at = state.global_step
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        # The Trainer sees one "epoch" spanning the whole run; if its end coincides with a pass boundary we have
        # already logged/evaluated/saved at this step, so do not do it twice.
        if self._epoch_flags_at == state.global_step:
            control.should_log = control.should_evaluate = control.should_save = False
        return control


class BatchRampMixin:
    """Mix into any ``Trainer`` subclass (``class T(BatchRampMixin, trl.SFTTrainer)``) to ramp the batch size.

    Args (defaults, effects and refusals in full: ``docs/batch-ramp.md``, "Options" and "Not supported"):
        batch_schedule (`Callable`, `int` or `dict`, *optional*): global batch size as a function of consumed
            samples (or tokens, if its ``.unit`` is ``"tokens"``). Defaults to the plain Trainer's global batch.
        max_micro_batch_size (`int`, *optional*): most sequences one forward/backward sees on one rank; a memory
            bound only. Defaults to ``per_device_train_batch_size``.
        lr_policy (`Policy` or `dict`, *optional*): an LR policy read on ``self.clock`` (``PolicyLRScheduler``).
        seed (`int`, *optional*): data-order seed. Defaults to ``args.data_seed``, else ``args.seed``.
        batch_size_multiple (`int`, *optional*): global sizes are rounded down to multiples of it (default
            ``world_size``).
        rounding (`str`, *optional*, defaults to `"down"`): ``"error"`` refuses sizes that need rounding.
        allow_schedule_change_on_resume (`bool`, *optional*, defaults to `False`): let a resume continue with other
            batch plan settings than the checkpoint's (``docs/checkpoints.md``).
        couple (`Coupling`, `dict` or `str`, *optional*): optimizer hyperparameters that follow the batch size
            (``hf_batchsched.coupling``), e.g. ``"lr=sqrt,wd,betas"``.
        fsdp_gradient_sync (`str`, *optional*, defaults to `"every_chunk"`): under FSDP2, reduce-scatter every
            micro-chunk's gradient or only the last chunk's (``"last_chunk"``).

    Bad input raises ``ConfigError``. Engines: one process, DDP, DeepSpeed ZeRO and FSDP2 (``docs/distributed.md``).
    """

    def __init__(
        self,
        *args,
        batch_schedule=None,
        max_micro_batch_size: int | None = None,
        lr_policy: Policy | dict | None = None,
        seed: int | None = None,
        batch_size_multiple: int | None = None,
        rounding: str = "down",
        allow_schedule_change_on_resume: bool = False,
        fsdp_gradient_sync: str = "every_chunk",
        couple=None,
        **kwargs,
    ):
        check_choice("fsdp_gradient_sync", fsdp_gradient_sync, FSDP_GRADIENT_SYNC)
        # The trainer changes its TrainingArguments (gradient_accumulation_steps, ignore_data_skip): work on a copy
        # so the caller's object stays as it was.
        if kwargs.get("args") is not None:
            kwargs["args"] = copy_training_arguments(kwargs["args"])
        elif len(args) > 1 and args[1] is not None:
            args = (args[0], copy_training_arguments(args[1]), *args[2:])
        if env_flag(FSDP_ON_CPU_ENV):
            _enable_fsdp_on_cpu(kwargs.get("args", args[1] if len(args) > 1 else None))
        check_ramp_options(max_micro_batch_size, batch_size_multiple, seed)  # before the Trainer makes output_dir
        check_distributed_launch(kwargs.get("args", args[1] if len(args) > 1 else None))
        super().__init__(*args, **kwargs)
        targs = self.args
        self.fsdp_gradient_sync = fsdp_gradient_sync
        self.sharding_engine = check_sharding_engine(self)
        batch_schedule, self.max_micro_batch_size = ramp_batch_sizes(targs, batch_schedule, max_micro_batch_size)
        if targs.gradient_accumulation_steps > 1:
            targs.gradient_accumulation_steps = 1
            self.accelerator.gradient_accumulation_steps = 1
        self.batch_schedule = as_batch_schedule(batch_schedule)
        if lr_policy is not None and not isinstance(lr_policy, Policy):
            from .schedules.lr_config import lr_policy_from_config

            lr_policy = lr_policy_from_config(lr_policy)
        self.lr_policy = lr_policy
        if lr_policy is not None:
            check_lr_policy_owns_lr(targs, self._deepspeed_config(), seesaw=False)
        self.ramp_seed, self.batch_size_multiple, self.sampling_strategy = ramp_data_options(
            targs, seed, batch_size_multiple, self.train_dataset, allow_schedule_change_on_resume
        )
        self.ramp_rounding = rounding
        self.allow_schedule_change_on_resume = allow_schedule_change_on_resume
        self.clock = TrainingClock()
        self.ramp_passes = 0.0  # passes over the data the planned run makes (set when train() plans it)
        self._samples_at_train_start = 0
        self.last_batch_size: int | None = None
        self.last_micro_chunks: int | None = None
        self._batch_size_history: list[list[int]] = []  # [[global batch size, steps], ...] of this run so far
        self._plan_fingerprint: dict | None = None
        self._resumed_ramp_state: dict | None = None
        self._resume_source: str | None = None
        self.ramp_position = 0  # stream position (dataset rows) after the last completed optimizer step
        self.last_step_rows: int | None = None
        self._leading_trim_exact: bool | None = None
        self._bound_callbacks: list = []  # hf_batchsched callbacks bound to this trainer (note_bound_callback)
        self._ramp_sampler: RampBatchSampler | None = None
        self._ramp_callback = _RampCallback(self)
        self.add_callback(self._ramp_callback)
        # ---- Seesaw's own LR schedule; coupled hyperparameters (hf_batchsched.coupling) ----
        self.lr_policy = check_seesaw_pair(self.batch_schedule, self.lr_policy, self.batch_size_multiple)
        if lr_policy is None and self.lr_policy is not None:
            check_lr_policy_owns_lr(targs, self._deepspeed_config(), seesaw=True)
        self.couple = resolve_coupling(couple, self.batch_schedule)
        self._coupling = CouplingCallback(self, self.couple) if self.couple is not None else None
        if self._coupling is not None:
            self.add_callback(self._coupling)
        # Callbacks given as callbacks=[XCallback()] (or the class) get this trainer; add_callback binds later ones.
        self._binds_callbacks = True
        bind_callbacks(self)

    def add_callback(self, callback) -> None:
        """``Trainer.add_callback``; an ``hf_batchsched`` callback (class or instance) without a trainer gets bound."""
        super().add_callback(callback)
        if getattr(self, "_binds_callbacks", False):
            bind_callbacks(self)

    # ---- public extras -------------------------------------------------------------------------
    def _deepspeed_config(self) -> dict | None:
        """The DeepSpeed config under ZeRO-1/2/3 (where a 'scheduler' section drives the LR), else ``None``."""
        if self.sharding_engine in ("zero1", "zero2", "zero3"):
            return self.accelerator.state.deepspeed_plugin.deepspeed_config
        return None

    def note_bound_callback(self, callback) -> None:
        """Called by an ``hf_batchsched`` callback bound to this trainer, so ``train()`` can refuse one that listens to
        the micro-chunk events but was never added to the callback list."""
        self._bound_callbacks.append(callback)

    def _chunk_listeners(self, event: str) -> list:
        return [callback for callback in self.callback_handler.callbacks if hasattr(callback, event)]

    def ramp_state_dict(self) -> dict:
        """What checkpoints store (in ``trainer_state.json``): the clock after the last completed optimizer step, the
        global batch size of every step so far (run-length encoded) and the plan fingerprint."""
        return {
            "clock": self.clock.state_dict(),
            "consumed_rows": self.ramp_position,
            "batch_sizes": [list(entry) for entry in self._batch_size_history],
            "plan": copy.deepcopy(self._plan_fingerprint),
            "last_batch_size": self.last_batch_size,
            "last_micro_chunks": self.last_micro_chunks,
            "save_only_model": bool(self.args.save_only_model),
            "coupling": self._coupling.state_dict() if self._coupling is not None else None,
            "checkpoint_files": [],  # filled in when the checkpoint's trainer_state.json is written
        }

    def load_ramp_state_dict(self, state: dict, source: str = "ramp state") -> None:
        """Restore a ``ramp_state_dict()``; it is checked against this run's plan when ``train`` plans it."""
        validate_ramp_state(state, source)
        check_same_stream(state["plan"], self._stream_fingerprint(), source)
        self.clock.load_state_dict(state["clock"])
        self._batch_size_history = [list(entry) for entry in state["batch_sizes"]]
        self.ramp_position = state["consumed_rows"]
        self.last_batch_size = state["last_batch_size"]
        self.last_micro_chunks = state["last_micro_chunks"]
        if self._coupling is not None:  # B0 of the run; a checkpoint saved without coupling: its first step's batch
            saved_base = (state["coupling"] or {}).get("base_batch_size")
            history = state["batch_sizes"]
            self._coupling.base_batch_size = saved_base or (history[0][0] if history else None)
        self._resumed_ramp_state = state

    def _stream_fingerprint(self) -> dict:
        return {"dataset_size": len(self.train_dataset), "seed": self.ramp_seed}

    # ---- training entry ------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint=True`` takes the newest *complete* checkpoint, and a resume is
        checked against this run (see ``hf_batchsched.checkpoint``); a mismatch raises ``ConfigError``."""
        check_chunk_listeners_added(self._bound_callbacks, self.callback_handler.callbacks)
        point = find_resume_checkpoint(
            resume_from_checkpoint, self.args.output_dir, announce=self.is_world_process_zero()
        )
        self.clock.load_state_dict(TrainingClock().state_dict())
        self.last_batch_size = self.last_micro_chunks = self.last_step_rows = None
        self.ramp_position, self._leading_trim_exact = 0, None
        self._batch_size_history, self._resumed_ramp_state = [], None
        if self._coupling is not None:
            self._coupling.base_batch_size = None
        self._resume_source = point.path if point is not None else None
        if point is not None:
            self.load_ramp_state_dict(point.ramp_state, source=point.state_file)
        self._samples_at_train_start = self.clock.consumed_samples
        # The sampler resumes from the clock; the Trainer's own skip (global_step x GAS batches) must not run.
        ignore_data_skip = self.args.ignore_data_skip
        self.args.ignore_data_skip = True
        try:
            return super().train(
                resume_from_checkpoint=point.path if point is not None else None,
                trial=trial,
                ignore_keys_for_eval=ignore_keys_for_eval,
                **kwargs,
            )
        finally:
            self.args.ignore_data_skip = ignore_data_skip

    def get_train_dataloader(self) -> DataLoader:
        """One batch per optimizer step, this rank's share, from a rank-aware ``RampBatchSampler``.

        The DataLoader is not passed through ``accelerator.prepare``: accelerate would re-shard the batch sampler
        (``BatchSamplerShard``) and prefetch; the Trainer's ``_prepare_inputs`` moves each chunk to the device.
        """
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        dataset = self.train_dataset
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
            collator = self.data_collator
        else:
            collator = self._get_collator_with_removed_columns(self.data_collator, description="training")
        self._ramp_sampler = build_ramp_sampler(
            dataset,
            self.batch_schedule,
            self.args,
            lr_policy=self.lr_policy,
            seed=self.ramp_seed,
            sampling_strategy=self.sampling_strategy,
            batch_size_multiple=self.batch_size_multiple,
            rounding=self.ramp_rounding,
            consumed_rows=self.ramp_position,
            resumed_state=self._resumed_ramp_state,
        )
        return ramp_dataloader(dataset, self._ramp_sampler, collator, self.args, self.ramp_seed)

    def set_initial_training_values(self, args, dataloader):
        """Simulate the ramp from the start of the run: the Trainer sees one "epoch" of ``max_steps`` steps."""
        planner = self._ramp_sampler
        plan, end_row = self._plan_run(args)
        max_steps = len(plan)
        self.ramp_plan = plan
        self.clock.total_steps = max_steps
        self.clock.total_samples = sum(plan)
        if planner.lengths is not None:
            self.clock.total_tokens = planner.tokens_before(end_row)
        self.ramp_passes = end_row / planner.num_rows
        if self.is_world_process_zero():
            # At warning level, the one level shown by default: the Trainer's own (info) header counts the ramp as one
            # epoch at its first batch size.
            logger.warning(
                "%s",
                plan_summary(plan, self.ramp_passes, planner.num_rows, self.max_micro_batch_size, args.world_size),
            )
        # num_train_epochs, num_update_steps_per_epoch, num_examples, num_train_samples, total_train_batch_size,
        # steps_in_epoch, max_steps
        return 1, max_steps, planner.num_rows, sum(plan), plan[0], max_steps, max_steps

    def _plan_run(self, args) -> tuple[list[int], int]:
        """The global batch size of every step of the run (on resume, the steps taken so far are the checkpoint's),
        and the stream position (dataset rows) at its end.

        Also sets the plan fingerprint saved with checkpoints, and checks a resumed state against this run: the
        fingerprint, the batch sizes already taken (for schedules that are pure functions of the clock), and that
        training is not already over.
        """

        planner = self._ramp_sampler.at_position(0)
        cap = args.max_steps if args.max_steps > 0 else None
        steps_from_start = planner.plan_rows(max_steps=cap)
        from_start = step_sizes(planner, steps_from_start)
        self._plan_fingerprint = plan_fingerprint(
            args,
            **self._stream_fingerprint(),
            batch_schedule=self.batch_schedule,
            max_micro_batch_size=self.max_micro_batch_size,
            batch_size_multiple=self.batch_size_multiple,
            rounding=self.ramp_rounding,
            sampling_strategy=self.sampling_strategy,
            # what the schedule does not already say (an adaptive schedule's lr_scaling is in its own config)
            couple=None if self.couple == resolve_coupling(None, self.batch_schedule) else str(self.couple),
        )
        saved = self._resumed_ramp_state
        if saved is None:
            if not from_start:
                raise ConfigError("the batch ramp plans no optimizer step; check num_train_epochs / max_steps")
            return from_start, steps_from_start[-1][1]
        source = self._resume_source or "the checkpoint"
        taken = expand_batch_sizes(saved["batch_sizes"])
        online = getattr(self.batch_schedule, "online", False)
        changes = resumed_plan_changes(saved["plan"], self._plan_fingerprint, taken, from_start, online=online)
        check_resumed_plan(changes, allow_change=self.allow_schedule_change_on_resume, source=source)
        if changes:
            logger.warning(
                "BatchRampTrainer: resuming %s with a changed batch plan (allow_schedule_change_on_resume=True): %s",
                source,
                "; ".join(changes),
            )
        remaining_steps = self._ramp_sampler.plan_rows(max_steps=None if cap is None else max(cap - len(taken), 0))
        remaining = step_sizes(self._ramp_sampler, remaining_steps)
        check_training_left(remaining, taken, self.clock.consumed_samples, source)
        return taken + remaining, remaining_steps[-1][1]

    def _save_checkpoint(self, model, trial):
        """The Trainer's save, with the ramp state inside ``trainer_state.json``, which is written atomically with the
        list of the checkpoint's other files (its completeness marker; see ``hf_batchsched.checkpoint``)."""
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save and os.path.isfile(os.path.join(folder, TRAINER_STATE_FILE)):
            # An older checkpoint of this step (a resumed run passing it again) is overwritten file by file: drop its
            # marker first, so that a crash before the new one is written leaves it recognisably incomplete.
            os.remove(os.path.join(folder, TRAINER_STATE_FILE))
        save_callback_state(self.state, RAMP_STATE_KEY, self.ramp_state_dict())
        state = self.state
        state.save_to_json = functools.partial(save_trainer_state_atomically, state)  # this call only
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del state.save_to_json

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer = None):
        """``PolicyLRScheduler`` on ``self.clock`` when an ``lr_policy`` was given, else the Trainer's scheduler."""
        if self.lr_policy is None:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            from .schedules.scheduler import PolicyLRScheduler

            self.lr_scheduler = PolicyLRScheduler(optimizer or self.optimizer, self.lr_policy, self.clock)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    # ---- one optimizer step --------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        """Forward/backward the step batch in micro-chunks; only the last chunk synchronises gradients."""
        drawn = self._ramp_sampler.take_drawn_step() if self._ramp_sampler is not None else None
        packed = packed_sequence_starts(inputs) is not None
        if packed:
            inputs = self._prepare_packed_batch(model, inputs, num_items_in_batch, drawn)
        chunks = split_micro_chunks(
            inputs,
            self.max_micro_batch_size,
            trim_leading=not packed and self._leading_padding_trim_is_exact(model, inputs),
            labels_shifted=self._loss_shifts_labels,
        )
        world_size = self.accelerator.num_processes
        local_rows = batch_len(inputs)
        step_rows, step_samples, step_tokens = self._count_step(inputs, drawn, local_rows)
        if world_size > 1 and self.sharding_engine is not None:
            self._check_equal_chunk_counts(len(chunks))
        if self.is_deepspeed_enabled:  # the engine's batch bookkeeping follows the step (its boundary is set below)
            engine = self.accelerator.deepspeed_engine_wrapped.engine
            engine.set_train_batch_size(len(chunks) * engine.train_micro_batch_size_per_gpu() * engine.dp_world_size)
        if not step_tokens and self.lr_policy is not None and self.lr_policy.unit == "tokens":
            raise no_tokens_for_policy(self.lr_policy)
        if num_items_in_batch is not None and self.compute_loss_func is None and not per_token_labels(inputs):
            # Items are examples here: per-example weighting (below) is the same normalisation, and it does not rely
            # on the model's forward honouring num_items_in_batch. Image classifiers such as
            # ResNetForImageClassification take **kwargs (so the Trainer passes it) but return a plain chunk mean,
            # which would make k chunks sum k means.
            num_items_in_batch = None
        accumulation = chunk_accumulation(inputs, chunks, step_rows, world_size, packed)
        chunk_listeners = self._chunk_listeners("on_micro_chunk_end")
        step_listeners = self._chunk_listeners("on_step_batch_end")
        # (items, loss weight) per chunk for the listeners; only computed when one listens (it reads
        # num_items_in_batch, which syncs with the device)
        listening = chunk_listeners or step_listeners
        weights = self._chunk_loss_weights(chunks, num_items_in_batch, accumulation) if listening else None
        total_loss = None
        for index, chunk in enumerate(chunks):
            self.current_gradient_accumulation_steps = accumulation[index]
            if weights is not None:
                self.current_chunk_num_items, self.current_chunk_loss_weight = weights[index]
            last = index == len(chunks) - 1
            # DeepSpeed: accelerate marks the engine's accumulation boundary from sync_gradients, and steps there
            self.accelerator.gradient_state._set_sync_gradients(last)
            with self._chunk_sync_context(model, last):
                loss = super().training_step(model, chunk, num_items_in_batch)
            total_loss = loss if total_loss is None else total_loss + loss
            chunk_samples = count_batch(chunk)[0] if packed else batch_len(chunk)
            for callback in chunk_listeners:
                callback.on_micro_chunk_end(self, index, len(chunks), chunk_samples)
        self.clock.advance(samples=step_samples, tokens=step_tokens)
        self.ramp_position = drawn.consumed_rows if drawn is not None else self.ramp_position + step_rows
        self.last_step_rows = step_rows
        self.last_batch_size, self.last_micro_chunks = step_samples, len(chunks)
        for callback in step_listeners:
            callback.on_step_batch_end(self, step_samples)
        return total_loss

    def _count_step(self, inputs: dict, drawn: DrawnStep | None, local_rows: int) -> tuple[int, int, int]:
        """Global ``(rows, samples, tokens)`` of the step batch.

        The sampler's accounting of the rows it drew is the clock of record (samples are sequences; tokens are the
        rows' non-pad tokens, ``sample_lengths``), so the clock, the token schedules and a resumed sampler agree even
        when the collator truncates. Without it (a batch that did not come from the ramp's sampler), or without
        lengths, the collated batch is counted (one all-reduce under DDP).
        """
        sampler = self._ramp_sampler
        if drawn is not None and sampler.lengths is not None:
            mask = inputs.get("attention_mask")
            if torch.is_tensor(mask) and mask.dim() == 2 and int(mask.sum()) != drawn.local_tokens:
                self._warn_once(
                    "collated_tokens",
                    "BatchRampTrainer: the collated batch holds %d non-pad tokens but its dataset rows hold %d (the "
                    "collator truncates or drops tokens); the clock and token schedules count the dataset rows' "
                    "tokens. Truncate the dataset instead so both agree",
                    int(mask.sum()),
                    drawn.local_tokens,
                )
            return drawn.rows, drawn.samples, drawn.tokens
        samples, tokens = count_batch(inputs)
        rows = local_rows
        if self.accelerator.num_processes > 1:  # the collated batch is still on the CPU; one small all-reduce
            counts = torch.tensor([rows, samples, tokens], dtype=torch.long, device=self.args.device)
            rows, samples, tokens = (int(value) for value in self.accelerator.reduce(counts, "sum").tolist())
        if drawn is not None:
            return drawn.rows, drawn.samples, tokens
        return rows, samples, tokens

    def _warn_once(self, key: str, message: str, *args) -> None:
        warned = self.__dict__.setdefault("_ramp_warned", set())
        if key not in warned:
            warned.add(key)
            logger.warning(message, *args)

    def _prepare_packed_batch(self, model, inputs: dict, num_items_in_batch, drawn: DrawnStep | None) -> dict:
        """Checks that a packed (flattened) step batch can be chunked exactly; turns the model's cache off.

        The block-diagonal attention of packed sequences comes from ``position_ids`` only when the model runs
        without a cache (transformers builds it when ``attention_mask`` is None and no cache is passed; a model whose
        config has ``use_cache=True`` creates one even in training), so ``use_cache=False`` is added, as trl does.
        """
        config = getattr(self.accelerator.unwrap_model(model), "config", None)
        attn_implementation = getattr(config, "_attn_implementation", None)
        drawn_samples = None if drawn is None else drawn.local_samples
        check_packed_batch(inputs, num_items_in_batch, attn_implementation, drawn_samples)
        if getattr(config, "use_cache", False) and "use_cache" not in inputs:
            inputs = {**inputs, "use_cache": False}
        return inputs

    def _leading_padding_trim_is_exact(self, model, inputs: dict) -> bool:
        """Whether cutting a chunk's leading all-pad columns leaves the model's outputs unchanged: decided once, on the
        first chunk that would lose leading columns, by running it both ways (no grad, eval mode); kept under FSDP or
        for 16-bit logits (``docs/batch-ramp.md``, "Padding")."""
        if self._leading_trim_exact is not None:
            return self._leading_trim_exact
        if not has_left_padding(inputs):
            return False  # no left padding in this batch: decide on a batch that has some
        if not self._loss_shifts_labels or self.is_fsdp_enabled:
            self._leading_trim_exact = False
            return False
        candidate = leading_trim_candidate(inputs, self.max_micro_batch_size)
        if candidate is None:
            return False
        untrimmed, trimmed, removed = candidate
        unwrapped = self.accelerator.unwrap_model(model)
        was_training = unwrapped.training
        unwrapped.eval()
        device = self.args.device
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                strip = {"labels", "shift_labels"}
                full = unwrapped(**{k: v for k, v in self._prepare_inputs(untrimmed).items() if k not in strip})
                cut = unwrapped(**{k: v for k, v in self._prepare_inputs(trimmed).items() if k not in strip})
        finally:
            unwrapped.train(was_training)
        exact = trimmed_outputs_agree(
            getattr(full, "logits", None), getattr(cut, "logits", None), removed, trimmed, device
        )
        self._leading_trim_exact = exact
        logger.info(
            "BatchRampTrainer: left padding is %s per micro-chunk (%s)",
            "trimmed" if exact else "kept",
            "the model's outputs do not change without the leading pad columns"
            if exact
            else "cutting the leading pad columns changes this model's outputs (eager attention, absolute positions "
            "or 16-bit logits)",
        )
        return exact

    def _chunk_sync_context(self, model, last: bool):
        """How a chunk's gradient is synchronised: DDP and FSDP1 defer all but the last chunk (``no_sync``); ZeRO
        reduces in its own backward hooks (partitioned gradients) and steps at the boundary; FSDP2 reduce-scatters
        every chunk (``fsdp_gradient_sync="every_chunk"``: gradients stay sharded) or only the last one (unsharded
        gradients of the whole model accumulate on every rank until then)."""
        if last or self.is_deepspeed_enabled:
            return contextlib.nullcontext()
        if self.sharding_engine == "fsdp2" and self.fsdp_gradient_sync == "every_chunk":
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model=model)

    def _check_equal_chunk_counts(self, num_chunks: int) -> None:
        """Sharded engines run collectives in every chunk's backward: all ranks must run the same number."""
        extremes = torch.tensor([num_chunks, -num_chunks], dtype=torch.long, device=self.args.device)
        torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX)
        if int(extremes[0]) != -int(extremes[1]):
            raise ConfigError(
                f"ranks split this step into {-int(extremes[1])} to {int(extremes[0])} micro-chunks; under "
                f"{self.sharding_engine} every rank must run the same number (each backward communicates). Use a "
                "batch_size_multiple of max_micro_batch_size * world_size"
            )

    @property
    def reduces_every_chunk(self) -> bool:
        """Whether each chunk's gradient is reduced over ranks in its own backward (ZeRO-2/3, FSDP2 with
        ``fsdp_gradient_sync="every_chunk"``); under DDP, ZeRO-0/1 and FSDP1 only the last chunk's is."""
        return self.sharding_engine in ("zero2", "zero3") or (
            self.sharding_engine == "fsdp2" and self.fsdp_gradient_sync == "every_chunk"
        )

    def accumulated_grad_sq_norm(self, params: list[torch.Tensor]) -> torch.Tensor:
        """Squared norm of the gradient accumulated so far in this step, as this trainer's engine holds it
        (``hf_batchsched.sharded_grads.accumulated_grad_sq_norm``). With a sharded engine every rank must call it."""
        return accumulated_grad_sq_norm(self.sharding_engine, params)

    def step_grad_sq_norm(self, params: list[torch.Tensor]) -> torch.Tensor:
        """Squared norm of the whole step's reduced gradient, read after the last chunk's backward
        (``hf_batchsched.sharded_grads.step_grad_sq_norm``)."""
        engine = self.accelerator.deepspeed_engine_wrapped.engine if self.is_deepspeed_enabled else None
        return step_grad_sq_norm(self.sharding_engine, params, deepspeed_engine=engine)

    def _chunk_loss_weights(self, chunks: list[dict], num_items_in_batch, accumulation: list[float]) -> list[tuple]:
        """``(items, loss weight)`` of each chunk (``hf_batchsched.loss_weights``), from the Trainer's settings."""
        token_normalised = num_items_in_batch is not None and (
            self.model_accepts_loss_kwargs or self.compute_loss_func is not None
        )
        scaled_for_ga = getattr(self, "loss_is_scaled_for_ga", None)  # a Trainer attribute since transformers 5.19
        if scaled_for_ga is None:
            scaled_for_ga = token_normalised or self.compute_loss_func is not None
        items_scale = 1
        if token_normalised and self.args.average_tokens_across_devices:
            world_size = self.accelerator.num_processes
            items_scale = world_size // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
        return chunk_loss_weights(
            chunks,
            num_items_in_batch,
            accumulation,
            token_normalised=token_normalised,
            scaled_for_ga=scaled_for_ga,
            items_scale=items_scale,
            labels_shifted=self._loss_shifts_labels,
        )

    # ---- logging -------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        add_ramp_metrics(
            logs,
            self.clock,
            batch_size=self.last_batch_size,
            micro_chunks=self.last_micro_chunks,
            sgd_noise=self._sgd_noise,
            coupled=self._coupling.last if self._coupling is not None else None,
            samples_at_train_start=getattr(self, "_samples_at_train_start", 0),
        )
        super().log(logs, start_time)

    def _sgd_noise(self, lr: float | None) -> float | None:
        if self.optimizer is None or self._ramp_sampler is None:
            return None
        group = self.optimizer.param_groups[0]
        return sgd_noise_of_group(group, self._ramp_sampler.samples_per_pass, self.last_batch_size, lr=lr)


class BatchRampTrainer(BatchRampMixin, Trainer):
    """A ``transformers.Trainer`` with a batch-size ramp; see ``BatchRampMixin`` for the extra arguments."""
