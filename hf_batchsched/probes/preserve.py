"""Leave the model exactly as found: the context manager every probe that perturbs the model runs under.

Restored on exit, bit for bit: parameters (those that required grad), buffers such as BatchNorm running statistics
and ``num_batches_tracked``, ``.grad`` tensors including ``None``, ``requires_grad`` flags, the train/eval mode of
every module, and the global RNG states of torch (CPU and CUDA), numpy and ``random``.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["PreservedState", "preserved_model_state"]


class PreservedState:
    """What :func:`preserved_model_state` saved on entry; a probe built inside the block reads its parameter
    copies instead of making its own (:class:`ProbeObjective` ``preserved=``)."""

    def __init__(self, params: Sequence[nn.Parameter], values: Sequence[torch.Tensor | None]):
        self._values = {id(p): (p, value) for p, value in zip(params, values) if value is not None}

    def value_of(self, param: torch.Tensor) -> torch.Tensor | None:
        """The copy of ``param`` saved on entry if ``param`` still holds exactly that value, else ``None``.

        The copy is the one restored on exit: read it, never write to it.
        """
        entry = self._values.get(id(param))
        if entry is None or entry[0] is not param:
            return None
        value = entry[1]
        return value if value.shape == param.shape and torch.equal(value, param.detach()) else None


@contextlib.contextmanager
def preserved_model_state(model: nn.Module, train_mode: bool = False) -> Iterator[PreservedState]:
    """Run a probe on ``model`` and restore everything it could change, bit for bit, on exit.

    Inside the block the model is in eval mode (dropout off, BatchNorm on running statistics), or in train mode
    with ``train_mode=True`` (BatchNorm statistics then move inside the block and are restored on exit), and
    every ``.grad`` is ``None`` (the original tensors are put back on exit, untouched). Restored on exit: the
    values of the parameters that required grad on entry (the ones a probe perturbs; frozen parameters are not
    copied, so a frozen 4-bit or 7B base costs no extra memory), every ``requires_grad`` flag, every buffer,
    every ``.grad`` (``None`` stays ``None``), each module's ``training`` flag, and the RNG states of torch (CPU,
    and CUDA when initialised), numpy and ``random``.

    Yields a :class:`PreservedState`: pass it as ``ProbeObjective(..., preserved=state)`` so the probe's base
    point is the copy made here (one copy of the trainable parameters in all, not two).

    Example:

    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2), torch.nn.Dropout(0.5))
    >>> before = [t.clone() for t in model.state_dict().values()]
    >>> with preserved_model_state(model, train_mode=True):
    ...     _ = model(torch.randn(4, 2))  # BN statistics move, dropout draws from the global RNG
    ...     with torch.no_grad():
    ...         _ = model[0].weight.add_(1.0)
    >>> all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values())), model.training
    (True, True)
    """
    params = list(model.parameters())
    # a probe perturbs only the trainable parameters: cloning the frozen base (e.g. 7B weights) would double memory
    saved_values = [p.detach().clone() if p.requires_grad else None for p in params]
    saved_flags = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    buffers = list(model.buffers())
    saved_buffers = [b.detach().clone() for b in buffers]
    modes = [(module, module.training) for module in model.modules()]
    torch_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    # bitsandbytes Linear4bit on AVX512-BF16 CPUs repacks its weight in place on the first eval-mode forward whose
    # input does not require grad, after which no gradient flows through it (gemv_4bit has no autograd kernel):
    # keep a probe from doing that to the model
    repacking = [
        (m, m.support_avx512bf16_for_cpu) for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")
    ]
    try:
        for module, _ in repacking:
            module.support_avx512bf16_for_cpu = False
        for p in params:
            p.grad = None
        model.train(train_mode)
        yield PreservedState(params, saved_values)
    finally:
        for module, flag in repacking:
            module.support_avx512bf16_for_cpu = flag
        with torch.no_grad():
            for p, value, flag, grad in zip(params, saved_values, saved_flags, saved_grads):
                p.requires_grad_(flag)
                if value is not None:
                    p.copy_(value)
                p.grad = grad
            for b, value in zip(buffers, saved_buffers):
                b.copy_(value)
        for module, mode in modes:
            module.training = mode
        torch.set_rng_state(torch_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)
