"""The adapter registry: names, the active set, blend weights, enabled/disabled.

All blending state lives here and nowhere else. When it changes, `push`
computes each wrapped layer's ``[(adapter, weight * scale), ...]`` list once,
so a forward does no dictionary work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .blocks import BlockWeights, PathWeights
from .errors import LoraError, LoraNameError
from .fuse import show_fused
from .layers import BASE, BiasLayer, LoraAdapter, SavedCopyLayer
from .residency import Residency

# Per component: a float, or (for a UNet) block weights.
ComponentWeight = float | BlockWeights | PathWeights
_BY_PATH = (BlockWeights, PathWeights)  # weights that differ from layer to layer


@dataclass
class AdapterRecord:
    name: str
    format: str
    source: str
    layers: list[tuple[str, str, nn.Module]]  # (component, path, module)
    skipped: list[str] = field(default_factory=list)
    copies: list[tuple[str, str, nn.Module]] = field(default_factory=list)  # PEFT's modules_to_save
    config: object = None  # the LoraConfig it was created or loaded with, for saving

    def by_component(self) -> dict[str, list[tuple[str, nn.Module, LoraAdapter]]]:
        """``{component: [(path, module, adapter), ...]}``, the adapters looked up once and kept."""
        cached = self.__dict__.get("_by_component")
        if cached is None or sum(map(len, cached.values())) != len(self.layers):
            cached = {}
            for component, path, module in self.layers:
                cached.setdefault(component, []).append((path, module, module.lora_adapters[self.name]))
            self.__dict__["_by_component"] = cached
        return cached

    def components(self) -> list[str]:
        return sorted({component for component, _, _ in self.layers + self.copies})


class AdapterRegistry:
    """Named adapters of one host (pipeline or model) and how they are blended."""

    def __init__(self) -> None:
        self.adapters: dict[str, AdapterRecord] = {}
        self.active: list[str] = []
        self.weights: dict[str, dict[str, ComponentWeight]] = {}  # name -> component -> weight
        self.enabled: bool = True
        # Fusion: which (adapter, layer) pairs are written into the weights, and the fused layers.
        self.fused_pairs: set[tuple[str, int]] = set()
        self.fused_modules: list[tuple[str, nn.Module]] = []  # (component, module)
        # The layers given a non-empty active list by the last push, to reset them next time.
        self._pushed: dict[nn.Module, list] = {}
        self._copies_pushed = False
        # Which adapters keep their tensors where their layers compute (see residency.py).
        self.residency = Residency()

    # -- names ---------------------------------------------------------------
    def check_known(self, names: list[str]) -> None:
        missing = [n for n in names if n not in self.adapters]
        if missing:
            raise LoraNameError(f"adapter(s) {missing} are not loaded; loaded adapters: {sorted(self.adapters)}")

    def names(self, adapter_names, what: str) -> list[str]:
        """The one reading of a caller's adapter names (``what``: the call, for messages): a str or a
        list/tuple of str, each loaded, none twice, never the mixed-batch word ``__base__``."""
        if isinstance(adapter_names, str):
            names = [adapter_names]
        elif isinstance(adapter_names, (list, tuple)):
            names = list(adapter_names)
        else:
            raise LoraNameError(f"{what}: adapter names must be a str or a list of str, got {adapter_names!r}")
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise LoraNameError(f"{what}: adapter names must be strings, got {bad}")
        if BASE in names:
            raise LoraNameError(
                f"{what}: '{BASE}' is not an adapter; it means 'no adapter' in a mixed batch (adapter_names= of a forward)"
            )
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise LoraNameError(f"{what}: adapter name(s) {repeated} repeat in {names}; name each adapter once")
        self.check_known(names)
        return names

    def check_new_name(self, name) -> None:
        """A name a new adapter may take: a non-empty str without '.', not ``__base__``, not in use."""
        if not isinstance(name, str) or not name or "." in name:
            raise LoraNameError(f"adapter_name must be a non-empty string without '.', got {name!r}")
        if name == BASE:
            raise LoraNameError(f"adapter_name {name!r} is reserved: it means 'no adapter' in a mixed batch")
        if name in self.adapters:
            raise LoraNameError(
                f"adapter name '{name}' is already in use (loaded adapters: {sorted(self.adapters)}); "
                f"choose another adapter_name or delete_adapters('{name}') first"
            )

    def fused_names(self) -> list[str]:
        return sorted({n for n, _ in self.fused_pairs})

    def refuse_fused(self, names: list[str] | None, action: str) -> None:
        """The rule for fused adapters: their factors are written into the weights, so nothing that would
        change or drop them (delete, hotswap, a per-row forward) runs until `unfuse_lora`.
        ``names`` None: any fused adapter refuses."""
        fused = self.fused_names()
        hit = fused if names is None else [n for n in fused if n in names]
        if hit:
            raise LoraError(f"adapter(s) {hit} are fused into the weights; call unfuse_lora() before {action}")

    def default_name(self) -> str:
        n = len(self.adapters)
        while f"default_{n}" in self.adapters:
            n += 1
        return f"default_{n}"

    # -- state changes ---------------------------------------------------------
    def add(self, record: AdapterRecord) -> None:
        """Register a freshly applied adapter and make it active alongside the others, weight 1.0."""
        self.adapters[record.name] = record
        self.active.append(record.name)
        self.weights[record.name] = {}
        self.residency.activate(self, [record.name], self.active)
        if self.enabled:
            self._push_added(record)
        else:
            self.push()

    def remove(self, name: str) -> AdapterRecord:
        """Forget adapter ``name`` everywhere the registry keeps it, the lists pushed into layers included
        (a later `_push_added` extends those lists: a stale entry would run the removed adapter again)."""
        record = self.adapters.pop(name)
        self.weights.pop(name, None)
        if name in self.active:
            self.active.remove(name)
        self.residency.forget(name)
        for _, _, module in record.layers:
            pushed = self._pushed.get(module)
            if pushed is None:
                continue
            adapter = module.lora_adapters[name] if name in getattr(module, "lora_adapters", {}) else None
            kept = [(a, f) for a, f in pushed if a is not adapter]
            if kept:
                self._pushed[module] = kept
            else:
                del self._pushed[module]
        return record

    def set_active(self, names: list[str], weights: list[dict[str, ComponentWeight]]) -> None:
        self.check_known(names)
        self.residency.activate(self, names)  # parked ones come back before anything else changes
        self.active = list(names)
        for name, weight in zip(names, weights):
            self.weights[name] = weight
        self.push()

    def set_enabled(self, enabled: bool) -> None:
        if enabled:
            self.residency.bring_home(self, self.active)
        self.enabled = enabled
        self.push()

    # -- pushing into layers -----------------------------------------------------
    def weight(self, name: str, component: str, path: str) -> float:
        given = self.weights.get(name, {})
        spec = given.get(component, given.get("*", 1.0))  # "*": one number for every component
        return spec.weight_for(path) if isinstance(spec, _BY_PATH) else float(spec)

    def push(self) -> None:
        """Give every wrapped layer its list of (adapter, weight * scale) for the current blend.

        Only the layers of the adapters active now or at the last push are visited,
        so the cost follows the active set, not the number of adapters loaded; a
        factor tensor is written only when its value changes.
        """
        lists: dict[nn.Module, list] = {}  # modules hash by identity
        if self.enabled:
            fused = self.fused_pairs
            for name in self.active:
                given = self.weights.get(name) or {}
                everywhere = given.get("*", 1.0)
                for component, entries in self.adapters[name].by_component().items():
                    spec = given.get(component, everywhere)
                    blocks = isinstance(spec, _BY_PATH)
                    for path, module, adapter in entries:
                        w = spec.weight_for(path) if blocks else spec
                        if w == 0.0 or (fused and (name, id(module)) in fused):
                            continue
                        value = w * adapter.scale
                        factor = adapter._buffers["factor"]
                        if adapter._factor_value != value:
                            factor.fill_(value)
                            adapter.__dict__["_factor_value"] = value
                        active = lists.get(module)
                        if active is None:
                            lists[module] = [(adapter, factor)]
                        else:
                            active.append((adapter, factor))
        for module in self._pushed:
            if module not in lists:
                state = module.__dict__
                if state.get("_lora_active"):  # None once the module was unwrapped
                    state["_lora_active"] = []
                    state["_lora_concat"] = None
        for module, active in lists.items():
            state = module.__dict__
            state["_lora_active"] = active
            if len(active) < 2:  # a concatenation is kept (and checked) only where two or more adapters run
                state["_lora_concat"] = None
        self._pushed = lists
        for _, module in self.fused_modules:
            show_fused(module, self.enabled)
        if self._copies_pushed or any(record.copies for record in self.adapters.values()):
            self._push_copies()

    def _push_added(self, record: AdapterRecord) -> None:
        """What `push` gives after `add`, touching only the new adapter's layers: it is active last,
        at weight 1.0 and fused nowhere, so each of its layers gets its list with the new adapter
        appended, and every other layer keeps its list. Keeps a load's cost flat in the number of
        adapters already active."""
        pushed = self._pushed
        for entries in record.by_component().values():
            for _, module, adapter in entries:
                value = adapter.scale
                factor = adapter._buffers["factor"]
                if adapter._factor_value != value:
                    factor.fill_(value)
                    adapter.__dict__["_factor_value"] = value
                before = pushed.get(module)
                active = [(adapter, factor)] if not before else before + [(adapter, factor)]
                pushed[module] = active
                state = module.__dict__
                state["_lora_active"] = active
                if len(active) < 2:
                    state["_lora_concat"] = None
        if self._copies_pushed or record.copies:
            self._push_copies()

    def _push_copies(self) -> None:
        # modules_to_save: a module runs the copy of the first active adapter that has one.
        # bias="all": a module without LoRA adds each active adapter's weighted bias delta.
        chosen: dict[int, tuple[nn.Module, nn.Module | None]] = {}
        biases: dict[int, tuple[nn.Module, list]] = {}
        for record in self.adapters.values():
            for _, _, module in record.copies:
                if isinstance(module, SavedCopyLayer):
                    chosen.setdefault(id(module), (module, None))
                elif isinstance(module, BiasLayer):
                    biases.setdefault(id(module), (module, []))
        self._copies_pushed = bool(chosen or biases)
        if self.enabled:
            for name in self.active:
                for component, path, module in self.adapters[name].copies:
                    w = self.weight(name, component, path)
                    if w == 0.0:
                        continue
                    if id(module) in chosen and chosen[id(module)][1] is None:
                        chosen[id(module)] = (module, module.lora_copies[name])
                    elif id(module) in biases:
                        biases[id(module)][1].append((module.lora_biases[name], w))
        for module, copy in chosen.values():
            module.set_lora_copy(copy)
        for module, active in biases.values():
            module.set_lora_bias_active(active)

    def list_by_component(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, record in self.adapters.items():
            for component in record.components():
                out.setdefault(component, []).append(name)
        return out
