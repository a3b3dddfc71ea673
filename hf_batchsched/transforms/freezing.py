"""Freeze BatchNorm layers in inference mode through the Trainer's per-step ``model.train()``; ``unfreeze_bn``
undoes it."""

from __future__ import annotations

from torch import nn

from ..model_utils import batchnorm_modules

__all__ = ["freeze_bn", "is_bn_frozen", "unfreeze_bn"]

_FREEZE_ATTR = "_hf_batchsched_bn_freeze"


def _force_eval(module: nn.Module, args: tuple) -> None:
    module.training = False


def freeze_bn(model: nn.Module, freeze_affine: bool = False) -> int:
    """Keep every BatchNorm layer of ``model`` in inference mode until ``unfreeze_bn``, even across ``model.train()``.

    The Trainer calls ``model.train()`` at every step, which undoes a plain ``bn.eval()``. Here a forward pre-hook
    on each BN layer sets ``training = False`` just before the layer runs, so it normalises with its running
    statistics and never updates them, whatever mode the rest of the model is in. With ``freeze_affine`` the
    layers' ``weight`` and ``bias`` also stop receiving gradients (``requires_grad=False``; optimizers skip
    parameters whose ``grad`` is `None`). Already frozen layers are skipped.

    Args:
        model (`torch.nn.Module`):
            The model whose BN layers to freeze, in place.
        freeze_affine (`bool`, *optional*, defaults to `False`):
            Also stop training the BN scale and shift.

    Returns:
        `int`: the number of layers newly frozen.

    Example:

    >>> import torch
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    >>> freeze_bn(model)
    1
    >>> _ = model.train()(torch.randn(8, 3))
    >>> model[1].running_mean.abs().sum().item(), model[1].training
    (0.0, False)
    >>> unfreeze_bn(model)
    1
    """
    frozen = 0
    for _, bn in batchnorm_modules(model, tracked_only=False):
        if is_bn_frozen(bn):
            continue
        affine_flags = {name: p.requires_grad for name, p in bn.named_parameters(recurse=False)}
        if freeze_affine:
            for p in bn.parameters(recurse=False):
                p.requires_grad_(False)
        handle = bn.register_forward_pre_hook(_force_eval)
        setattr(bn, _FREEZE_ATTR, (handle, affine_flags))
        frozen += 1
    return frozen


def unfreeze_bn(model: nn.Module) -> int:
    """Undo ``freeze_bn``: remove the hooks, restore ``requires_grad``, put each layer in ``model``'s mode.

    Returns the number of layers unfrozen.
    """
    unfrozen = 0
    for _, bn in batchnorm_modules(model, tracked_only=False):
        record = getattr(bn, _FREEZE_ATTR, None)
        if record is None:
            continue
        handle, affine_flags = record
        handle.remove()
        for name, p in bn.named_parameters(recurse=False):
            p.requires_grad_(affine_flags.get(name, p.requires_grad))
        bn.training = model.training
        delattr(bn, _FREEZE_ATTR)
        unfrozen += 1
    return unfrozen


def is_bn_frozen(module: nn.Module) -> bool:
    """Whether ``freeze_bn`` froze this layer."""
    return getattr(module, _FREEZE_ATTR, None) is not None
