"""The helpers that read Trainer, accelerate and torch internals for the callbacks and the bench: logging from a
callback, telling a scheduler its LRs, preparing inputs, gathering ZeRO-3/FSDP2 parameters, FSDP2 gradient bytes."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Mapping
from typing import Any

import torch
from transformers import Trainer

from ..errors import ConfigError
from ..launch import (
    check_sharding_engine,
    fsdp_requested,
)

logger = logging.getLogger("hf_batchsched.trainer")  # one logger for the whole trainer package


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


def enable_fsdp_on_cpu(args) -> None:
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
