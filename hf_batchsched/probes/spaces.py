"""The spaces a probe measures in: the trainable parameters, or the merged weights of a peft LoRA model.

A space holds the probe's variables (leaf tensors that require grad), their base values and the reference point
``x`` (the values the noise and box scales are relative to). In the merged space each LoRA layer's merged weight
``W0 + s*B@A`` gets an offset ``E`` added by a forward hook (``output += x @ E.T``), which makes a measurement
invariant to the LoRA rescaling symmetry ``(B*c, A/c)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .preserve import PreservedState

__all__ = ["MergedLoraSpace", "ParameterSpace", "Space", "make_space"]


class Space:
    """Variables of the probe: leaf tensors that require grad, their base values, and the reference point x."""

    variables: list[torch.Tensor]
    names: list[str]

    def reference(self) -> list[torch.Tensor]:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:
        pass


class ParameterSpace(Space):
    def __init__(self, model: nn.Module, preserved: PreservedState | None = None):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ConfigError(
                "the model has no trainable parameters (requires_grad=True) to probe; unfreeze the parameters to "
                "measure (e.g. attach a LoRA adapter with peft), or use merged=True on a peft LoRA model"
            )
        self.names = [n for n, _ in named]
        self.variables = [p for _, p in named]
        # the copy preserved_model_state already made, when the parameter still holds it; else a copy of our own
        saved = [preserved.value_of(p) if preserved is not None else None for p in self.variables]
        self.base = [value if value is not None else p.detach().clone() for p, value in zip(self.variables, saved)]

    def reference(self) -> list[torch.Tensor]:
        return self.base


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer  # here, not at the top: peft's import is slow and most probes need none

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def _base_weight(layer: nn.Module) -> torch.Tensor:
    weight = layer.get_base_layer().weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes 4-bit (QLoRA): dequantize the base weight for the reference
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, quant_state).float()
    if weight.dtype in (torch.int8, torch.uint8):
        raise ConfigError("merged=True does not support 8-bit base weights; use merged=False (adapter space)")
    return weight.detach().float()


class MergedLoraSpace(Space):
    """Offsets E of each adapted layer's merged weight, added as ``output += x @ E.T`` by a forward hook."""

    def __init__(self, model: nn.Module):
        layers = _lora_layers(model)
        if not layers:
            raise ConfigError("merged=True needs a peft LoRA model (no LoraLayer found); use merged=False")
        self.names, self.variables, self._reference, self._hooks = [], [], [], []
        for name, layer in layers:
            if getattr(layer, "fan_in_fan_out", False) or not hasattr(layer.get_base_layer(), "weight"):
                raise ConfigError(f"merged=True supports LoRA on Linear layers only; {name!r} is not one")
            merged = _base_weight(layer)
            for adapter in layer.active_adapters:
                if adapter in getattr(layer, "lora_A", {}):
                    merged = merged + layer.get_delta_weight(adapter).detach().float()
            dtype = torch.float64 if layer.get_base_layer().weight.dtype == torch.float64 else torch.float32
            offset = torch.zeros(merged.shape, dtype=dtype, device=merged.device, requires_grad=True)
            self.names.append(name + ".merged_weight")
            self.variables.append(offset)
            self._reference.append(merged.to(dtype))
            self._hooks.append(layer.register_forward_hook(self._hook(offset), with_kwargs=True))
        self.base = [torch.zeros_like(v) for v in self.variables]

    @staticmethod
    def _hook(offset: torch.Tensor):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["x"]
            return output + F.linear(x.to(offset.dtype), offset).to(output.dtype)

        return hook

    def reference(self) -> list[torch.Tensor]:
        return self._reference

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def make_space(model: nn.Module, merged: bool, preserved: PreservedState | None = None) -> Space:
    """The merged LoRA space with ``merged=True``, else the trainable parameters (reusing ``preserved``'s copies)."""
    return MergedLoraSpace(model) if merged else ParameterSpace(model, preserved)
