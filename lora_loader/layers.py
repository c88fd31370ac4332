"""LoRA layers: a wrapped module stays the same object, now a subclass of its own class.

Wrapping swaps ``module.__class__`` for a subclass that adds the adapters
(as loralib's layers subclass the layer they adapt). The module keeps its
identity, its parameters and its ``state_dict`` keys (``to_q.weight`` stays
``to_q.weight``), and code that reads ``attn.to_q.weight`` or checks
``isinstance(m, nn.Linear)`` keeps working. Unwrapping restores the class and
removes every attribute wrapping added, so the module is structurally the
original again.

The forward is ``base(x) + sum_i factor_i * up_i(down_i(x))``, where
``factor_i = weight_i * scale_i`` is pushed in by the adapter registry when the
blend changes. With several adapters active and no gradients needed, the
down's and the factor-folded up's are concatenated once, so k adapters cost two
matmuls instead of 2k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .delta import LoraDelta


class LoraAdapter(nn.Module):
    """One adapter's factors on one layer (``down``, ``up``) and its scale."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scale: float, alpha: float):
        super().__init__()
        self.down = nn.Parameter(down, requires_grad=False)
        self.up = nn.Parameter(up, requires_grad=False)
        self.scale = float(scale)
        self.alpha = float(alpha)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    # Adapters are not part of the model's state_dict: `unet.state_dict()` stays the base model's,
    # so save_pretrained, load_state_dict(strict=True) and copies such as ControlNetModel.from_unet
    # work while adapters are loaded. Adapters are saved with save_lora_weights.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        return

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        return

    def to_delta(self) -> LoraDelta:
        # scale = alpha / rank (or alpha / sqrt(rank)); keep whichever holds.
        use_rslora = abs(self.scale - self.alpha / self.rank) > 1e-12 * max(1.0, abs(self.scale))
        return LoraDelta(self.down.detach(), self.up.detach(), self.alpha, use_rslora)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}"


class AdapterDict(nn.ModuleDict):
    """A ModuleDict that takes any adapter name, also those that are nn.Module attributes ("train", "to").

    Adapters are only ever reached with ``[name]``, never as attributes, so the
    attribute clash nn.Module guards against cannot happen here.
    """

    def __setitem__(self, name: str, module: nn.Module) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise KeyError(f"adapter name must be a non-empty string without '.', got {name!r}")
        self._modules[name] = module


class LoraLayer:
    """Mixin placed in front of the wrapped module's class. Never instantiated directly."""

    lora_adapters: AdapterDict
    _lora_base_class: type
    # (adapter, factor) pairs, factor = blend weight * adapter scale; empty means "base only".
    _lora_active: list[tuple[LoraAdapter, float]]
    _lora_concat: tuple | None

    def set_lora_active(self, active: list[tuple[LoraAdapter, float]]) -> None:
        self._lora_active = active
        self._lora_concat = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = super().forward(x, *args, **kwargs)
        active = self._lora_active
        if not active:
            return out
        first = active[0][0].down
        h = x if x.dtype == first.dtype else x.to(first.dtype)
        if len(active) == 1 or (torch.is_grad_enabled() and any(a.down.requires_grad or a.up.requires_grad for a, _ in active)):
            delta = None
            for adapter, factor in active:
                d = self._lora_up(self._lora_down(h, adapter.down), adapter.up) * factor
                delta = d if delta is None else delta + d
        else:
            down, up = self._concatenated(active)
            delta = self._lora_up(self._lora_down(h, down), up)
        return out + delta.to(out.dtype)

    def _concatenated(self, active):
        # Keyed on device, dtype and the tensors' in-place version counters, so a
        # `.to()` or an optimizer step invalidates the cache without any hook.
        key = tuple((a.down._version, a.up._version, a.down.device, a.down.dtype) for a, _ in active)
        cached = self._lora_concat
        if cached is None or cached[0] != key:
            with torch.no_grad():
                down = torch.cat([a.down for a, _ in active], dim=0)
                up = torch.cat([a.up * factor for a, factor in active], dim=1)
            cached = (key, down, up)
            self._lora_concat = cached
        return cached[1], cached[2]


class LoraLinearMixin(LoraLayer):
    def _lora_down(self, x, down):
        return F.linear(x, down)

    def _lora_up(self, h, up):
        return F.linear(h, up)


class LoraConv2dMixin(LoraLayer):
    def _lora_down(self, x, down):
        # The base conv's stride, padding (mode included) and dilation; groups is 1 (checked at plan).
        return self._conv_forward(x, down, None)

    def _lora_up(self, h, up):
        return F.conv2d(h, up)


_MIXIN_FOR_BASE = ((nn.Conv2d, LoraConv2dMixin), (nn.Linear, LoraLinearMixin))
_wrapped_classes: dict[type, type] = {}


def supported_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv2d"`` or None for modules we cannot adapt."""
    if isinstance(module, LoraLayer):
        module_type = module._lora_base_class
    else:
        module_type = type(module)
    if issubclass(module_type, nn.Conv2d):
        return "conv2d"
    if issubclass(module_type, nn.Linear):
        return "linear"
    return None


def _wrapped_class(base_class: type) -> type:
    cls = _wrapped_classes.get(base_class)
    if cls is None:
        mixin = next(m for b, m in _MIXIN_FOR_BASE if issubclass(base_class, b))
        cls = type(f"Lora{base_class.__name__}", (mixin, base_class), {"__module__": __name__})
        _wrapped_classes[base_class] = cls
    return cls


def wrap(module: nn.Module) -> None:
    """Turn ``module`` into a LoRA layer in place (no-op if it already is one)."""
    if isinstance(module, LoraLayer):
        return
    base_class = type(module)
    module.__class__ = _wrapped_class(base_class)
    module._lora_base_class = base_class
    module._lora_active = []
    module._lora_concat = None
    module.lora_adapters = AdapterDict()


def unwrap(module: nn.Module) -> None:
    """Restore the module's original class and drop everything `wrap` added."""
    if not isinstance(module, LoraLayer):
        return
    base_class = module._lora_base_class
    del module._modules["lora_adapters"]
    for name in ("_lora_base_class", "_lora_active", "_lora_concat"):
        module.__dict__.pop(name, None)
    module.__class__ = base_class


def adapter_from_delta(delta: LoraDelta, module: nn.Module) -> LoraAdapter:
    """Build the adapter for ``module`` on its device and in its dtype (shapes checked by the planner)."""
    weight = module.weight
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    down, up = delta.down, delta.up
    if supported_kind(module) == "linear":
        down, up = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)
    else:
        down = down.reshape(down.shape[0], -1, *module.kernel_size) if down.dim() == 2 else down
        up = up.reshape(up.shape[0], up.shape[1], 1, 1)
    down = down.to(device=weight.device, dtype=dtype, copy=True).contiguous()
    up = up.to(device=weight.device, dtype=dtype, copy=True).contiguous()
    alpha = float(delta.rank if delta.alpha is None else delta.alpha)
    return LoraAdapter(down, up, delta.scale, alpha)
