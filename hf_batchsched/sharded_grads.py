"""Squared gradient norms as each engine holds the gradient inside a chunked step: one process and DDP (``.grad``),
DeepSpeed ZeRO-3 (the local fp32 partitions), FSDP2 (the local shards of a ``DTensor``). ``BatchRampMixin`` exposes
them as ``trainer.accumulated_grad_sq_norm`` / ``trainer.step_grad_sq_norm`` for ``NoiseScaleCallback``.

``engine`` is ``hf_batchsched.launch.check_sharding_engine``'s name: ``None`` (one process, DDP), ``"zero0"`` to
``"zero3"``, ``"fsdp1"`` or ``"fsdp2"``.
"""

from __future__ import annotations

import torch

from .errors import ConfigError
from .probes.noise_scale import grad_sq_norm

__all__ = ["accumulated_grad_sq_norm", "step_grad_sq_norm"]


def _sq_norm(tensors: list[torch.Tensor | None]) -> torch.Tensor:
    """``Σ |t|²`` over the tensors that are not ``None`` (each normed in float32), as a float64 scalar."""
    norms = [torch.linalg.vector_norm(t, dtype=torch.float32).double() for t in tensors if t is not None]
    return torch.stack(norms).pow(2).sum() if norms else torch.zeros((), dtype=torch.float64)


def accumulated_grad_sq_norm(engine: str | None, params: list[torch.Tensor]) -> torch.Tensor:
    """Squared norm of the gradient accumulated so far in this step, as the engine holds it (float64 scalar).

    One process / DDP: this rank's ``.grad`` (in place, no copy). ZeRO-3: the reduced (mean over ranks)
    gradient's local partitions (``safe_get_local_grad``) summed over ranks (one scalar all-reduce).
    FSDP2: the reduced, sharded ``.grad`` (local shards summed over ranks). With a sharded engine every rank
    must call it. Under ZeRO read it before the last chunk (the engine steps and clears in the last backward):
    use :func:`step_grad_sq_norm` after it.

    >>> layer = torch.nn.Linear(2, 1, bias=False)
    >>> layer.weight.grad = torch.tensor([[3.0, 4.0]])
    >>> float(accumulated_grad_sq_norm(None, list(layer.parameters())))
    25.0
    """
    if engine in ("zero0", "zero1", "zero2"):
        raise ConfigError(
            f"{engine} keeps a micro-chunk's gradient in internal buffers until the accumulation boundary; the "
            "accumulated gradient can be read under ZeRO-3, FSDP2 and DDP"
        )
    if engine in (None, "fsdp1"):
        return grad_sq_norm(params)
    if engine == "zero3":
        from deepspeed.utils import safe_get_local_grad  # deepspeed is an optional dependency

        total = _sq_norm([safe_get_local_grad(p) for p in params])
    else:
        total = _sq_norm([p.grad.to_local() if p.grad is not None else None for p in params])
    torch.distributed.all_reduce(total)
    return total


def step_grad_sq_norm(engine: str | None, params: list[torch.Tensor], deepspeed_engine=None) -> torch.Tensor:
    """Squared norm of the whole step's reduced gradient, read after the last chunk's backward: under DeepSpeed
    (``deepspeed_engine`` given) the engine's own pre-clipping norm (``engine.get_global_grad_norm()``), else
    :func:`accumulated_grad_sq_norm`."""
    if deepspeed_engine is not None:
        norm = deepspeed_engine.get_global_grad_norm()
        if norm is None:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return torch.as_tensor(norm, dtype=torch.float64).reshape(()) ** 2
    return accumulated_grad_sq_norm(engine, params)
