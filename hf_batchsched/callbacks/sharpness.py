"""``SharpnessProbeCallback``: measure sharpness during ``Trainer.train`` and log it to every ``report_to``.

A thin shell over :func:`hf_batchsched.probes.sharpness.estimate_sharpness` on a fixed probe set.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence

import torch
from transformers import TrainerCallback

from ..callback_binding import TrainerBoundCallback, load_callback_state, save_callback_state
from ..errors import ConfigError, check_positive
from ..model_utils import to_device, world_size_and_rank
from ..probes.sharpness import estimate_sharpness, validate_sharpness_options
from ..trainer import full_parameters, log_metrics

__all__ = ["SharpnessProbeCallback"]

_COUNTERS = ("_hvps", "_evals", "_fd")

logger = logging.getLogger(__name__)


class SharpnessProbeCallback(TrainerBoundCallback, TrainerCallback):
    """Probe the sharpness of the training loss every ``every_n_steps`` steps and/or after each evaluation.

    The probe runs at ``on_step_end`` (after ``zero_grad``, so it cannot touch accumulated gradients) on a fixed
    probe set (``num_probe_samples`` samples drawn once from the training set with ``seed``, or
    ``probe_dataset``), collated with the trainer's ``data_collator`` into batches of ``probe_batch_size`` (lower
    it if a probe batch does not fit in memory), and logs through ``trainer.log`` so the values reach every
    ``report_to`` integration. The model is left exactly as found (parameters, BatchNorm statistics, gradients,
    train/eval mode, RNG states).

    Under DDP every rank runs the probe on its share of the probe batches and the loss, gradient and HVP sums are
    all-reduced, so all ranks log the same numbers. Under DeepSpeed ZeRO-3 the parameters are gathered and under
    FSDP2 unsharded for the probe (``hf_batchsched.trainer.full_parameters``: the full model on every rank while it
    runs); under any ZeRO stage or FSDP the edge-of-stability ratio is not logged (the optimizer holds partitioned
    copies of the parameters). QLoRA (4-bit base) works in adapter space and in merged
    space (the 4-bit base is dequantised for the reference scale); only tested on CPU, where the probe also stops
    bitsandbytes from repacking 4-bit weights for inference (which would cut gradients).

    | logged name | meaning |
    |---|---|
    | ``sharpness/avg``, ``sharpness/avg_stderr`` | average-case sharpness and its standard error |
    | ``sharpness/keskar``, ``sharpness/keskar_first_order`` | Keskar metric 2.1 and its first-order prediction |
    | ``sharpness/lambda_max`` | top Hessian eigenvalue |
    | ``sharpness/eos_ratio`` | preconditioned sharpness over the optimizer's stability threshold (1 = edge) |
    | ``sharpness/lambda_max_preconditioned`` | ``lambda_1(P^-1 H)`` under Adam(W) |
    | ``sharpness/trace``, ``sharpness/trace_stderr`` | Hutchinson Hessian trace and its standard error |
    | ``sharpness/loss`` | probe-set loss at the current weights |
    | ``sharpness/skipped`` | probes skipped for ``budget`` so far (logged at each skipped probe, with an info line) |

    TensorBoard shows them as ``train/sharpness/...`` (the Trainer's TensorBoard callback prefixes ``train/``).

    Args:
        trainer (`transformers.Trainer`, *optional*):
            The trainer whose model is probed; without it the callback is bound by ``BatchRampTrainer`` or
            ``hf_batchsched.bind_callbacks(trainer)`` (see ``hf_batchsched.callbacks``).
        metrics (`Sequence[str]`, *optional*, defaults to `("avg",)`):
            Any of ``"avg"``, ``"keskar"``, ``"lambda_max"``, ``"trace"``.
        every_n_steps (`int` or `None`, *optional*, defaults to `500`):
            Probe when ``global_step`` is a multiple of it; ``None`` probes only after evaluations.
        on_evaluate (`bool`, *optional*, defaults to `True`):
            Also probe after each evaluation (once per step at most).
        probe_dataset (`Dataset`, *optional*):
            Where the probe samples come from; defaults to ``trainer.train_dataset``.
        num_probe_samples (`int`, *optional*, defaults to `16`):
            Size of the fixed probe set.
        probe_batch_size (`int`, *optional*, defaults to `8`):
            Samples per probe batch (the unit of memory).
        budget (`float` or `None`, *optional*, defaults to `0.03`):
            Maximum share of training wall time spent probing, in (0, 1]: a probe is skipped when the previous
            probe's measured cost would push the share above it (the first probe always runs). ``None`` probes at
            every scheduled point whatever it costs.
        seed (`int`, *optional*, defaults to `0`):
            Seed for choosing the probe set and for the estimators.
        **metric_options:
            Passed to :func:`~hf_batchsched.probes.sharpness.estimate_sharpness` (e.g. ``sigma=0.05``,
            ``merged=True``, ``max_steps=20``).

    Example:

    ```python
    trainer = Trainer(model=peft_model, args=TrainingArguments(..., report_to="tensorboard"), train_dataset=ds)
    trainer.add_callback(SharpnessProbeCallback(trainer, metrics=("avg", "lambda_max"), every_n_steps=200))
    trainer.train()
    ```
    """

    STATE_KEY = "hf_batchsched.SharpnessProbeCallback"

    def __init__(
        self,
        trainer=None,
        metrics: Sequence[str] = ("avg",),
        every_n_steps: int | None = 500,
        on_evaluate: bool = True,
        probe_dataset=None,
        num_probe_samples: int = 16,
        probe_batch_size: int = 8,
        budget: float | None = 0.03,
        seed: int = 0,
        **metric_options,
    ):
        params = inspect.signature(SharpnessProbeCallback.__init__).parameters.values()
        callback_keys = [p.name for p in params if p.kind is not p.VAR_KEYWORD and p.name not in ("self", "trainer")]
        self.metrics = validate_sharpness_options(metrics, metric_options, callback_keys=callback_keys)
        for reserved in ("distributed", "seed"):
            metric_options.pop(reserved, None)
        if every_n_steps is not None:
            check_positive("every_n_steps", every_n_steps)
        if every_n_steps is None and not on_evaluate:
            raise ConfigError("the probe would never run: set every_n_steps or on_evaluate=True")
        check_positive("num_probe_samples", num_probe_samples)
        check_positive("probe_batch_size", probe_batch_size)
        if budget is not None and not 0 < budget <= 1:
            raise ConfigError(f"budget is a fraction of training wall time in (0, 1], got {budget}")
        self.every_n_steps = every_n_steps
        self.on_evaluate_probe = on_evaluate
        self.probe_dataset = probe_dataset
        self.dataset = probe_dataset
        self.num_probe_samples = int(num_probe_samples)
        self.probe_batch_size = int(probe_batch_size)
        self.budget = budget
        self.seed = int(seed)
        self.metric_options = metric_options
        # state saved with checkpoints
        self.probe_indices: list[int] | None = None
        self.num_probes = 0
        self.num_skipped = 0
        self.last_probe_step = -1
        self.probe_seconds = 0.0
        self.last_probe_seconds: float | None = None
        self._batches: list | None = None
        self._train_start: float | None = None
        if trainer is not None:
            self.bind(trainer)

    def _bind(self, trainer) -> None:
        if not self.metric_options.get("merged") and not any(p.requires_grad for p in trainer.model.parameters()):
            raise ConfigError(
                "the model has no trainable parameters to probe; attach a LoRA adapter or unfreeze parameters"
            )
        dataset = self.probe_dataset if self.probe_dataset is not None else trainer.train_dataset
        if dataset is None:
            raise ConfigError("no probe data: pass probe_dataset= or give the trainer a train_dataset")
        self.dataset = dataset

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The callback's state (probe set, counters); stored in ``TrainerState.stateful_callbacks``."""
        return {
            "seed": self.seed,
            "probe_indices": self.probe_indices,
            "num_probes": self.num_probes,
            "num_skipped": self.num_skipped,
            "last_probe_step": self.last_probe_step,
            "probe_seconds": self.probe_seconds,
            "last_probe_seconds": self.last_probe_seconds,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (the probe set stays the one chosen at the start of the run)."""
        for key, value in state.items():
            setattr(self, key, value)
        self._batches = None

    def _sync_state(self, state) -> None:
        save_callback_state(state, self.STATE_KEY, self.state_dict())

    # -- probe set ------------------------------------------------------------------------------------------
    def _choose_indices(self) -> list[int]:
        if not hasattr(self.dataset, "__len__"):
            return list(range(self.num_probe_samples))
        size = len(self.dataset)
        if size == 0:
            raise ConfigError("the probe dataset is empty")
        generator = torch.Generator().manual_seed(self.seed)
        return sorted(torch.randperm(size, generator=generator)[: self.num_probe_samples].tolist())

    def _rows(self, indices: list[int]) -> list:
        if hasattr(self.dataset, "__getitem__") and hasattr(self.dataset, "__len__"):
            rows = [self.dataset[i] for i in indices]
        else:
            rows = [row for _, row in zip(range(len(indices)), iter(self.dataset))]
        # drop fields a collator cannot tensorise (raw text, ids as strings)
        return [
            {k: v for k, v in row.items() if not isinstance(v, str)} if isinstance(row, dict) else row for row in rows
        ]

    def probe_batches(self) -> list:
        """The collated probe batches of this rank (built once, on the trainer's device)."""
        if self._batches is None:
            if self.probe_indices is None:
                self.probe_indices = self._choose_indices()
            rows = self._rows(self.probe_indices)
            collator = self.trainer.data_collator
            device = self.trainer.args.device
            batches = [
                to_device(collator(rows[start : start + self.probe_batch_size]), device)
                for start in range(0, len(rows), self.probe_batch_size)
            ]
            world, rank = world_size_and_rank()
            self._batches = batches[rank::world]
        return self._batches

    # -- hooks ----------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        # On resume the Trainer has loaded the checkpoint's TrainerState by now: the probe set comes back with it.
        stored = load_callback_state(state, self.STATE_KEY)
        if stored:
            self.load_state_dict(stored)
        self._train_start = time.perf_counter()
        self.probe_batches()
        self._sync_state(state)

    def on_step_end(self, args, state, control, **kwargs):
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self.probe(state)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.on_evaluate_probe and state.global_step != self.last_probe_step:
            self.probe(state)

    def _over_budget(self) -> bool:
        if self.budget is None or self.last_probe_seconds is None or self._train_start is None:
            return False
        elapsed = time.perf_counter() - self._train_start
        predicted = self.last_probe_seconds
        skip = (self.probe_seconds + predicted) > self.budget * (elapsed + predicted)
        world, _ = world_size_and_rank()
        if world > 1:  # all ranks must agree, or the collectives inside the probe would hang
            flag = torch.tensor([float(skip)], device=self.trainer.args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            skip = bool(flag.item())
        return skip

    def probe(self, state) -> dict[str, float] | None:
        """Run the estimators now and log ``sharpness/<name>``; returns the values (``None`` when skipped)."""
        if self._over_budget():
            self.num_skipped += 1
            self._sync_state(state)
            logger.info(
                "SharpnessProbeCallback: probe at step %d skipped for budget=%s (the last probe took %.3g s; probing "
                "has used %.3g s so far); %d skipped in all. Raise budget or pass budget=None to probe every time",
                state.global_step,
                self.budget,
                self.last_probe_seconds,
                self.probe_seconds,
                self.num_skipped,
            )
            log_metrics(self.trainer, {"sharpness/skipped": self.num_skipped})
            return None
        start = time.perf_counter()
        options = dict(self.metric_options)
        # Under ZeRO / FSDP the optimizer holds flat or sharded copies, not the model's parameters: no EoS ratio
        sharded = getattr(self.trainer, "sharding_engine", None) is not None
        if "lambda_max" in self.metrics and not options.get("merged") and "optimizer" not in options and not sharded:
            optimizer = self.trainer.optimizer
            if optimizer is not None and "lr" not in options:
                options["optimizer"] = getattr(optimizer, "optimizer", optimizer)
        with full_parameters(self.trainer) as model:  # ZeRO-3 gathers, FSDP2 unshards; other set-ups: as is
            results = estimate_sharpness(model, self.probe_batches(), self.metrics, seed=self.seed, **options)
        self.last_probe_seconds = time.perf_counter() - start
        self.probe_seconds += self.last_probe_seconds
        self.num_probes += 1
        self.last_probe_step = state.global_step
        self._sync_state(state)
        logs = {f"sharpness/{k}": float(v) for k, v in results.items() if not k.endswith(_COUNTERS)}
        log_metrics(self.trainer, logs)
        return results
