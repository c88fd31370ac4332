"""Residency: which adapters keep their tensors where their layers compute, and which are parked.

Fifty adapters on a GPU cost fifty adapters of GPU memory. With a cap
(`set_max_resident_adapters`), adapters that are not active are moved to a
park device (the CPU by default), least recently activated first, and come
back when they are activated again. The policy:

- an active adapter is always resident: it computes where its base layer
  computes, so activating a parked adapter (`set_adapters`, `set_adapter`,
  `enable_lora`, a load) first moves it back, layer by layer, to the device of
  each base layer (a dispatched model may hold its layers on several devices);
- recency is the order of activation: a load, or being named in `set_adapters`;
- after every activation, while more than ``cap`` adapters are resident, the
  least recently activated inactive one is parked.

A layer whose weight is on the meta device computes on its accelerate hook's
execution device (offloading keeps the real weight elsewhere between calls),
which is that layer's device here; a meta layer with no hook (a config-only
skeleton) computes nowhere, and its adapter is left where it is.

`AdapterRegistry` owns one `Residency` and calls it before each change of the
active set; `LoraResidency` gives pipelines and models the public calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from . import offload
from .errors import LoraError
from .layers import LoraLayer

if TYPE_CHECKING:
    from .adapters import AdapterRecord, AdapterRegistry

# Where a module keeps one adapter's tensors: LoRA factors, PEFT's modules_to_save copies, bias deltas, norm weights.
_CONTAINERS = ("lora_adapters", "lora_copies", "lora_biases", "lora_norms", "lora_params")


def parse_device(device, what: str = "device") -> torch.device:
    """``device`` as a concrete, usable ``torch.device`` (``"cuda"`` becomes ``cuda:<current>``).

    Raises `LoraError` for something that is not a device, a device this
    machine does not have, and ``meta``, which holds no values.
    """
    try:
        parsed = torch.device(device)
    except (TypeError, RuntimeError, ValueError):
        raise LoraError(f"{what} must be a torch.device or a string such as 'cpu' or 'cuda:0', got {device!r}") from None
    if parsed.type == "meta":
        raise LoraError(f"{what}='meta' would drop the adapters' values (meta tensors hold none); use 'cpu'")
    try:
        return torch.empty(0, device=parsed).device
    except (RuntimeError, AssertionError, ValueError) as err:
        raise LoraError(f"{what}={device!r} is not available on this machine ({err})") from None


def _base_tensors(module: nn.Module):
    """The module's own parameters and buffers, then its children's, never an adapter's."""
    yield from (t for t in module._parameters.values() if t is not None)
    yield from (t for t in module._buffers.values() if t is not None)
    for name, child in module._modules.items():
        if child is not None and name not in _CONTAINERS:
            yield from _base_tensors(child)


def home_device(module: nn.Module) -> torch.device | None:
    """Where ``module`` computes: its weight's device; for a weight on the meta device, its accelerate
    hook's execution device (where its adapters are created), or None without a hook."""
    tensor = getattr(module, "weight", None)
    if not isinstance(tensor, torch.Tensor):
        tensor = next(_base_tensors(module), None)
    return None if tensor is None else offload.compute_device(module, tensor)


def _move(record: AdapterRecord, device: torch.device | None) -> bool:
    """Move one adapter's tensors on every layer to ``device`` (None: to each base layer's own device).

    A layer with no device (`home_device` None) keeps its adapter where it is. Returns
    whether the adapter now sits on the device of every layer that has one.
    """
    name, home = record.name, True
    for _, _, module in record.layers + record.copies:
        layer_device = home_device(module)
        if layer_device is None:
            continue
        target = layer_device if device is None else device
        for container in _CONTAINERS:
            holder = module._modules.get(container)
            if holder is not None and name in holder:
                holder[name].to(target)
        if target != layer_device:
            home = False
        if isinstance(module, LoraLayer):
            # The concatenation of the active factors may hold this adapter's values on the old device.
            module.drop_lora_cache()
    return home


POLICIES = ("lru", "fifo")


class Residency:
    """One host's residency state: the cap, the park device, the eviction policy, recency and load order,
    which adapters are pinned and which are parked."""

    def __init__(self) -> None:
        self.cap: int | None = None
        self.park_device: torch.device = torch.device("cpu")
        self.policy: str = "lru"  # which inactive adapter is parked first: least recently used, or first loaded
        self.recency: dict[str, None] = {}  # every loaded name, least recently activated first
        self.load_order: dict[str, None] = {}  # every loaded name, first loaded first
        self.pinned: set[str] = set()  # never parked, and not counted against the cap
        self.parked: set[str] = set()

    # -- bookkeeping -------------------------------------------------------------------------
    def touch(self, names: list[str]) -> None:
        for name in names:
            self.recency.pop(name, None)
            self.recency[name] = None

    def loaded(self, name: str) -> None:
        self.load_order.setdefault(name, None)

    def forget(self, name: str) -> None:
        self.recency.pop(name, None)
        self.load_order.pop(name, None)
        self.pinned.discard(name)
        self.parked.discard(name)

    def eviction_order(self) -> list[str]:
        """Loaded names in the order the policy parks them: least recently used first, or first loaded first."""
        return list(self.recency if self.policy == "lru" else self.load_order)

    # -- moves -------------------------------------------------------------------------------
    def activate(self, registry: AdapterRegistry, names: list[str], active: list[str] | None = None) -> None:
        """Before ``names`` become active: bring them home, count them as just used, then park the
        least recently used inactive adapters beyond the cap (``active``: the active set to be,
        ``names`` by default). Costs nothing per layer unless an adapter moves."""
        self.bring_home(registry, names)
        self.touch(names)
        self.enforce(registry, names if active is None else active)

    def bring_home(self, registry: AdapterRegistry, names: list[str]) -> None:
        """Move the parked ones among ``names`` back to the device of each of their layers."""
        for name in names:
            if name in self.parked:
                _move(registry.adapters[name], None)
                self.parked.discard(name)  # only once every layer is back

    def enforce(self, registry: AdapterRegistry, active: list[str]) -> None:
        """Park inactive, unpinned adapters in the policy's order while more than ``cap`` unpinned ones are resident."""
        if self.cap is None:
            return
        excess = len(set(registry.adapters) - self.parked - self.pinned) - self.cap
        if excess <= 0:
            return
        keep = set(active) | self.pinned
        for name in self.eviction_order():
            if excess <= 0:
                break
            if name in keep or name in self.parked:
                continue
            self.parked.add(name)  # first: a move that fails midway still leaves it to be brought home
            _move(registry.adapters[name], self.park_device)
            excess -= 1

    def move(self, registry: AdapterRegistry, names: list[str], device) -> None:
        """`set_lora_device`: move ``names`` to ``device``; an adapter off any of its layers' devices counts as parked."""
        target = parse_device(device)
        for name in names:
            self.parked.add(name)
            if _move(registry.adapters[name], target):
                self.parked.discard(name)


class LoraResidency:
    """The residency calls of `LoraHost` (pipelines and models): a cap on resident adapters, and the query."""

    def set_max_resident_adapters(self, max_resident: int | None, park_device: str | torch.device = "cpu",
                                  policy: str = "lru") -> None:  # fmt: skip
        """Keep at most ``max_resident`` adapters' tensors where their layers compute; park the others.

        When more than ``max_resident`` adapters are resident, inactive ones are moved
        to ``park_device`` in the order of ``policy``: ``"lru"`` parks the least
        recently used first (use: a load, being named in `set_adapters` /
        `set_adapter`, or in a mixed batch's ``adapter_names``), ``"fifo"`` the first
        loaded first. Pinned adapters (`pin_adapters`) are never parked and do not
        count against the cap. Active
        adapters are always resident, so the cap can be exceeded by the active
        set. A parked adapter that is activated again is moved back first, layer
        by layer, to the device of each base layer (a layer whose weight is on the
        meta device keeps the adapter where it is). ``None`` (the default state)
        removes the cap; parked adapters then stay parked until they are activated.
        Calling it again re-parks every parked adapter on the new ``park_device``.
        Moving the whole model (``pipe.to("cuda")``) moves parked adapters with it:
        call this again afterwards to park them again.

        ``max_resident`` must be None or an int >= 0, ``park_device`` a device this
        machine has (not ``meta``) and ``policy`` "lru" or "fifo"; otherwise
        `LoraError`, and nothing changes.

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> model.set_max_resident_adapters(1, park_device="cpu")
        >>> for name in ("a", "b", "c"):
        ...     _ = model.load_lora_weights({"0.lora_A.weight": torch.ones(2, 4), "0.lora_B.weight": torch.ones(4, 2)}, adapter_name=name)
        ...     model.set_adapters(name)
        >>> model.lora_residency()
        {'resident': ['c'], 'parked': ['a', 'b']}
        """
        if max_resident is not None and (isinstance(max_resident, bool) or not isinstance(max_resident, int) or max_resident < 0):
            raise LoraError(f"max_resident must be None (no cap) or an int >= 0, got {max_resident!r}")
        if policy not in POLICIES:
            raise LoraError(f"policy={policy!r}; expected one of {', '.join(POLICIES)}")
        device = parse_device(park_device, "park_device")
        registry = self._lora_registry_to_change()
        residency = registry.residency
        residency.cap, residency.park_device, residency.policy = max_resident, device, policy
        if max_resident is None:
            return
        active = set(registry.active)
        residency.bring_home(registry, registry.active)
        for name in [n for n in residency.recency if n in residency.parked and n not in active]:
            _move(registry.adapters[name], device)
        residency.enforce(registry, registry.active)
        registry.push()  # an adapter brought home has new factor tensors

    def lora_residency(self) -> dict[str, list[str]]:
        """``{"resident": [...], "parked": [...]}``, each least recently activated first.

        Resident adapters keep their tensors on the device of each of their
        layers; parked ones were moved away (to the park device by the cap of
        `set_max_resident_adapters`, or elsewhere by `set_lora_device`) and come
        back when activated. Every loaded adapter is in exactly one list.

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> _ = model.load_lora_weights({"0.lora_A.weight": torch.ones(2, 4), "0.lora_B.weight": torch.ones(4, 2)}, adapter_name="a")
        >>> model.lora_residency()
        {'resident': ['a'], 'parked': []}
        """
        residency = self._lora_registry_to_read().residency
        order = list(residency.recency)
        return {
            "resident": [n for n in order if n not in residency.parked],
            "parked": [n for n in order if n in residency.parked],
        }

    def pin_adapters(self, adapter_names: str | list[str]) -> None:
        """Keep these adapters resident whatever the cap (a serving engine's pinned adapters): they are brought
        home now, never parked, and not counted against `set_max_resident_adapters`'s cap.

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> lora = {"0.lora_A.weight": torch.ones(2, 4), "0.lora_B.weight": torch.ones(4, 2)}
        >>> for name in ("a", "b", "c"):
        ...     _ = model.load_lora_weights(lora, adapter_name=name)
        >>> model.pin_adapters("a")
        >>> model.set_max_resident_adapters(1)
        >>> model.lora_residency(), model.pinned_adapters()
        ({'resident': ['a', 'c'], 'parked': ['b']}, ['a'])
        """
        registry = self._lora_registry_to_change()
        names = registry.names(adapter_names, "pin_adapters")
        residency = registry.residency
        residency.bring_home(registry, names)
        residency.pinned.update(names)
        residency.enforce(registry, registry.active)
        registry.push()

    def unpin_adapters(self, adapter_names: str | list[str]) -> None:
        """Let these pinned adapters be parked again by the cap (the least used first, as any other)."""
        registry = self._lora_registry_to_change()
        names = registry.names(adapter_names, "unpin_adapters")
        registry.residency.pinned.difference_update(names)
        registry.residency.enforce(registry, registry.active)
        registry.push()

    def pinned_adapters(self) -> list[str]:
        """The pinned adapters, in load order."""
        residency = self._lora_registry_to_read().residency
        return [n for n in residency.load_order if n in residency.pinned]
