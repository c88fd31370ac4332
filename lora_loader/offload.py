"""Models dispatched or offloaded by accelerate: where a layer computes, and where its real weights are.

``device_map=...``, ``cpu_offload``, ``disk_offload`` and diffusers'
``enable_sequential_cpu_offload`` attach an ``AlignDevicesHook`` to modules. With
offloading, a module's own weights are meta tensors between calls; the hook
loads them from its ``weights_map`` (CPU memory or files on disk) onto its
``execution_device`` for each forward and drops them after. lora_loader never
removes or re-adds these hooks (diffusers does, and can leave offloading
switched on behind the user's back, diffusers#10914); it works with them:

- an adapter is created on the hook's execution device, where its layer computes;
- a wrapped module's hook keeps calling the wrapped forward (`rebind_hooked_forward`);
- reading a base weight (DoRA norms, fusing, PEFT's saved embeddings) reads the
  weights map, and fusing writes the fused weight into it (in memory, also for
  weights offloaded to disk), restored on unfuse.

accelerate is imported only when a hooked module is met.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _align_hook(module: nn.Module):
    """The module's ``AlignDevicesHook`` (also inside a ``SequentialHook``), or None."""
    hook = module.__dict__.get("_hf_hook")
    for candidate in getattr(hook, "hooks", (hook,)):
        if hasattr(candidate, "execution_device") and hasattr(candidate, "weights_map"):
            return candidate
    return None


def execution_device(module: nn.Module) -> torch.device | None:
    """The device accelerate runs ``module`` on, or None when no hook places it."""
    hook = _align_hook(module)
    device = getattr(hook, "execution_device", None)
    if device is None:
        return None
    return torch.device(device if not isinstance(device, int) else f"cuda:{device}")


def compute_device(module: nn.Module, tensor: torch.Tensor) -> torch.device | None:
    """Where ``module`` computes with ``tensor`` (one of its own): the tensor's device, or for a meta
    tensor its hook's execution device (None without a hook: a config-only skeleton computes nowhere)."""
    return execution_device(module) if tensor.is_meta else tensor.device


def _offloaded_slot(module: nn.Module, name: str):
    """``(mapping, key)`` where the hook keeps ``module.<name>`` between calls, or None if it is not offloaded."""
    hook = _align_hook(module)
    if hook is None or not hook.offload or hook.weights_map is None:
        return None
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset

    mapping, key = hook.weights_map, name
    while isinstance(mapping, PrefixedDataset):
        mapping, key = mapping.dataset, mapping.prefix + key
    if isinstance(mapping, OffloadedWeightsLoader):
        return mapping, key
    return (mapping, key) if isinstance(mapping, dict) else None


def real_tensor(module: nn.Module, name: str) -> torch.Tensor:
    """``module.<name>`` with its values: read from the hook's weights map when the module holds a meta tensor."""
    tensor = getattr(module, name, None)
    if tensor is None or not tensor.is_meta:
        return tensor
    slot = _offloaded_slot(module, name)
    if slot is None:
        return tensor
    mapping, key = slot
    return mapping[key]


def is_offloaded(module: nn.Module, name: str = "weight") -> bool:
    tensor = getattr(module, name, None)
    return tensor is not None and tensor.is_meta and _offloaded_slot(module, name) is not None


def store(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    """Make ``value`` what the hook loads as ``module.<name>`` from now on; None forgets a value stored
    here, so the hook reads the original again (from its files, for weights offloaded to disk)."""
    mapping, key = _offloaded_slot(module, name)
    target = getattr(mapping, "state_dict", mapping)  # OffloadedWeightsLoader reads its state_dict first
    if value is None:
        target.pop(key, None)
    else:
        target[key] = value


def stored_here(module: nn.Module, name: str) -> bool:
    """Whether the hook keeps ``module.<name>`` in memory (rather than reading it from disk)."""
    mapping, key = _offloaded_slot(module, name)
    return key in getattr(mapping, "state_dict", mapping)


def rebind_hooked_forward(module: nn.Module, old_class: type) -> None:
    """accelerate's hook calls ``module._old_forward``, the forward bound when the hook was added:
    after a class swap, bind it to the new class's forward (our adapters, or the plain layer again)."""
    old = module.__dict__.get("_old_forward")
    if isinstance(old, types.MethodType) and old.__self__ is module and old.__func__ is old_class.forward:
        module.__dict__["_old_forward"] = types.MethodType(type(module).forward, module)
