"""``BatchRampMixin`` (set-up, data, plan, checkpoints, logs; the step itself is ``RampStepsMixin``) and
``BatchRampTrainer``."""

from __future__ import annotations

import copy
import functools
import logging
import os

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy

from ..callback_binding import bind_callbacks, check_chunk_listeners_added, save_callback_state
from ..checkpoint import (
    RAMP_STATE_KEY,
    TRAINER_STATE_FILE,
    append_batch_size,
    check_same_stream,
    expand_batch_sizes,
    find_resume_checkpoint,
    save_trainer_state_atomically,
    validate_ramp_state,
)
from ..clock import TrainingClock
from ..coupling import CouplingCallback, resolve_coupling
from ..data.sampler import RampBatchSampler
from ..errors import ConfigError, check_choice
from ..launch import (
    FSDP_GRADIENT_SYNC,
    FSDP_ON_CPU_ENV,
    check_distributed_launch,
    check_lr_policy_owns_lr,
    check_ramp_options,
    check_sharding_engine,
    copy_training_arguments,
    env_flag,
    ramp_batch_sizes,
    ramp_data_options,
)
from ..ramp_loader import build_ramp_sampler, ramp_dataloader
from ..ramp_metrics import add_ramp_metrics
from ..ramp_plan import (
    check_resumed_plan,
    check_training_left,
    plan_fingerprint,
    plan_summary,
    resumed_plan_changes,
    step_sizes,
)
from ..schedules.base import Policy
from ..schedules.batch_config import as_batch_schedule
from ..schedules.seesaw_pair import check_seesaw_pair
from ..schedules.smith import sgd_noise_of_group
from .internals import enable_fsdp_on_cpu
from .steps import RampStepsMixin

logger = logging.getLogger("hf_batchsched.trainer")  # one logger for the whole trainer package


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


class BatchRampMixin(RampStepsMixin):
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
            enable_fsdp_on_cpu(kwargs.get("args", args[1] if len(args) > 1 else None))
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
            from ..schedules.lr_config import lr_policy_from_config

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
            from ..schedules.scheduler import PolicyLRScheduler

            self.lr_scheduler = PolicyLRScheduler(optimizer or self.optimizer, self.lr_policy, self.clock)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    # ---- one optimizer step --------------------------------------------------------------------
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
