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
from .layers import (
    BASE, BiasLayer, LoraAdapter, LoraGate, NormWeightLayer, ParamDiffLayer, SavedCopyLayer, honours_gate, show_active, show_nothing,
)
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
    # A pipeline's adapter added per component (unet.add_adapter(cfg_u, "a"), text_encoder.add_adapter(cfg_t, "a")):
    # each component's own config.
    component_configs: dict[str, object] = field(default_factory=dict)

    def config_for(self, component: str):
        return self.component_configs.get(component, self.config)

    def by_component(self) -> dict[str, list[tuple[str, nn.Module, LoraAdapter]]]:
        """``{component: [(path, module, adapter), ...]}``, the adapters looked up once and kept."""
        cached = self.__dict__.get("_by_component")
        if cached is None or sum(map(len, cached.values())) != len(self.layers):
            cached = {}
            for component, path, module in self.layers:
                cached.setdefault(component, []).append((path, module, module.lora_adapters[self.name]))
            self.__dict__["_by_component"] = cached
            self.__dict__["_ungated"] = {component for component, _, module in self.layers if not honours_gate(module)}
        return cached

    def ungated(self, component: str) -> bool:
        """Whether some of its layers in ``component`` do not read their `LoraGate` (LoRA on parameters)."""
        self.by_component()
        return component in self.__dict__["_ungated"]

    def components(self) -> list[str]:
        return sorted({component for component, _, _ in self.layers + self.copies})


class AdapterRegistry:
    """Named adapters of one host (a pipeline with its components, or a model) and how they are blended.

    Activation is per component, as in diffusers+peft, where each component's layers keep their own
    active list: ``pipe.unet.set_adapters("a")`` leaves the text encoder's list alone, a load
    activates the new adapter in the components it adapts, and ``pipe.unet.disable_lora()`` bypasses
    the UNet only. A model is one component, ``"model"``.
    """

    def __init__(self) -> None:
        self.adapters: dict[str, AdapterRecord] = {}
        self.active_in: dict[str, list[str]] = {}  # component -> its active adapters, in order
        self.weights: dict[str, dict[str, ComponentWeight]] = {}  # name -> component (or "*") -> weight
        self.disabled: set[str] = set()  # components whose adapters are bypassed (disable_lora)
        # Per component, the one flag its layers read to run their adapters: off while it is disabled.
        self.gates: dict[str, LoraGate] = {}
        # Fusion: which (adapter, layer) pairs are written into the weights, and the fused layers.
        self.fused_pairs: set[tuple[str, int]] = set()
        self.fused_modules: list[tuple[str, nn.Module]] = []  # (component, module)
        # The layers given a non-empty active list by the last push, to reset them next time.
        self._pushed: dict[nn.Module, list] = {}
        self._copies_pushed = False
        # What the last push's lists follow from (`_shown_signature`); None: unknown, the next change pushes.
        self._pushed_signature: tuple | None = None
        # Which adapters keep their tensors where their layers compute (see residency.py).
        self.residency = Residency()
        # enable_lora_hotswap(target_rank): every adapter loaded from then on is zero-padded to it.
        self.hotswap_rank: int | None = None
        # set_adapter_resolver: where an adapter named but not loaded is loaded from (see host.resolve_source).
        self.resolver = None

    # -- queries ---------------------------------------------------------------
    @property
    def active(self) -> list[str]:
        """The adapters active in any component, in order of first appearance."""
        return list(dict.fromkeys(name for names in self.active_in.values() for name in names))

    @property
    def enabled(self) -> bool:
        return not self.disabled

    def fused_names(self) -> set[str]:
        """The adapters written into the weights of at least one layer (diffusers' ``fused_loras``)."""
        return {name for name, _ in self.fused_pairs}

    # -- names ---------------------------------------------------------------
    def check_known(self, names: list[str]) -> None:
        missing = [n for n in names if n not in self.adapters]
        if missing:
            # diffusers' words ("not in the list of present adapters"), which code and tests match on.
            raise LoraNameError(
                f"adapter(s) {missing} not in the list of present adapters: {sorted(self.adapters)} (they are not loaded)"
            )

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

    def check_new_name(self, name, scope: list[str]) -> None:
        """A name a load or ``add_adapter`` on ``scope`` may take: a non-empty str without '.', not
        ``__base__``, and free there (`check_free`)."""
        if not isinstance(name, str) or not name or "." in name:
            raise LoraNameError(f"adapter_name must be a non-empty string without '.', got {name!r}")
        if name == BASE:
            raise LoraNameError(f"adapter_name {name!r} is reserved: it means 'no adapter' in a mixed batch")
        self.check_free(name, scope)

    def refuse_fused(self, names: list[str] | None, action: str) -> None:
        """The rule for fused adapters: their factors are written into the weights, so nothing that would
        change or drop them (delete, hotswap, a per-row forward) runs until `unfuse_lora`.
        ``names`` None: any fused adapter refuses."""
        fused = sorted(self.fused_names())
        hit = fused if names is None else [n for n in fused if n in names]
        if hit:
            raise LoraError(f"adapter(s) {hit} are fused into the weights; call unfuse_lora() before {action}")

    def default_name(self) -> str:
        n = len(self.adapters)
        while f"default_{n}" in self.adapters:
            n += 1
        return f"default_{n}"

    def check_free(self, name: str, scope: list[str]) -> None:
        """A name is free for a load or ``add_adapter`` on ``scope``: a host-wide call (several
        components) needs a new name; a component-level one (diffusers' ``unet.add_adapter(cfg, "a")``
        + ``text_encoder.add_adapter(cfg, "a")``) a name its component does not hold yet, and adds a part
        to the one adapter of that name."""
        record = self.adapters.get(name)
        if record is None:
            return
        taken = sorted(set(record.components()) & set(scope)) if len(scope) == 1 else record.components()
        if taken:
            raise LoraNameError(
                f"adapter name '{name}' is already in use in {taken} (loaded adapters: {sorted(self.adapters)}); "
                f"choose another adapter_name or delete_adapters('{name}') first"
            )

    # -- state changes ---------------------------------------------------------
    def add(self, record: AdapterRecord, activate: bool = True) -> None:
        """Register a freshly applied adapter (or a new component's part of one already registered) and
        make it the only active adapter, weight 1.0, of each component it adapts: what diffusers+peft
        and transformers do after a load or ``add_adapter``. Other components keep their active lists.
        ``activate=False`` (a load on first use, by the resolver) registers it and leaves every active list."""
        existing = self.adapters.get(record.name)
        if record.config is not None:
            record.component_configs.update({c: record.config for c in record.components()})
        if existing is not None:
            existing.component_configs.update(record.component_configs)
            existing.layers.extend(record.layers)
            existing.copies.extend(record.copies)
            existing.skipped.extend(record.skipped)
            existing.__dict__.pop("_by_component", None)
            record = existing
        else:
            self.adapters[record.name] = record
            self.weights[record.name] = {}
        self.residency.loaded(record.name)
        if not activate:
            self.residency.activate(self, [record.name], self.active)
            return
        components = record.components()
        was_idle = not any(self.active_in.get(c) for c in components)
        for component in components:
            self.active_in[component] = [record.name]
        self.residency.activate(self, [record.name], self.active)
        if was_idle and existing is None and not self.disabled & set(components):
            self._push_added(record)
        else:
            self.push()

    def remove(self, name: str) -> AdapterRecord:
        """Forget adapter ``name`` everywhere the registry keeps it, the lists pushed into layers included
        (a later `_push_added` extends those lists: a stale entry would run the removed adapter again)."""
        record = self.adapters.pop(name)
        self.weights.pop(name, None)
        for component in list(self.active_in):  # a host-wide set_adapters lists it in every component
            self._deactivate(name, component)
        self.residency.forget(name)
        self._forget_pushed(name, record.layers)
        return record

    def _forget_pushed(self, name: str, layers) -> None:
        """Drop adapter ``name`` of these layers from the lists last pushed into them."""
        self._pushed_signature = None
        for _, _, module in layers:
            pushed = self._pushed.get(module)
            if pushed is None:
                continue
            adapter = module.lora_adapters[name] if name in getattr(module, "lora_adapters", {}) else None
            kept = [(a, f) for a, f in pushed if a is not adapter]
            if kept:
                self._pushed[module] = kept
            else:
                del self._pushed[module]

    def _deactivate(self, name: str, component: str) -> None:
        """Take a deleted adapter out of ``component``'s active list. If it was the only one active
        there, the component's first remaining adapter becomes active: peft's rule on delete, so
        diffusers' and transformers' ``delete_adapters`` leave the same adapter on."""
        names = self.active_in.get(component, [])
        if name not in names:
            return
        names.remove(name)
        if not names:
            remaining = [n for n, r in self.adapters.items() if n != name and component in r.components()]
            if remaining:
                names.append(remaining[0])
                self.residency.activate(self, remaining[:1], self.active)

    def remove_component(self, name: str, component: str) -> list[tuple[str, str, nn.Module]]:
        """Take ``component``'s part of adapter ``name`` out (``pipe.unet.delete_adapters``); the whole
        record goes when no part is left. Returns the part's layers and copies."""
        record = self.adapters[name]
        part = [entry for entry in record.layers + record.copies if entry[0] == component]
        if len(part) == len(record.layers) + len(record.copies):
            self.remove(name)
            return part
        self._forget_pushed(name, [entry for entry in record.layers if entry[0] == component])
        record.layers = [entry for entry in record.layers if entry[0] != component]
        record.copies = [entry for entry in record.copies if entry[0] != component]
        record.__dict__.pop("_by_component", None)
        self._deactivate(name, component)
        self.weights.get(name, {}).pop(component, None)
        return part

    def set_active(
        self, names: list[str], weights: list[dict[str, ComponentWeight]], components: list[str], *, update: bool = False
    ) -> None:
        """``names`` become the active adapters of each of ``components``, with these weights.

        The weight dicts replace the adapters' weights, or with ``update`` (a component-level call on a
        pipeline's component) update only the entries they name, so the other components keep theirs."""
        self.check_known(names)
        to_be = dict(self.active_in)
        to_be.update({c: list(names) for c in components})
        self.residency.activate(self, names, list(dict.fromkeys(n for ns in to_be.values() for n in ns)))  # parked ones come back first
        self.active_in = to_be
        for name, weight in zip(names, weights):
            if update:
                self.weights.setdefault(name, {}).update(weight)
            else:
                self.weights[name] = weight
        if not self._reweigh():
            self.push()

    def _shown_signature(self) -> tuple | None:
        """What decides which layers show which adapters, but not at which weight: each component's active
        names, which weights are 0, the adapters' layer counts, the disabled and parked sets. None where a
        push decides more than that (fused layers, copies, per-block or per-path weights)."""
        if self.fused_pairs or self._copies_pushed:
            return None
        parts = []
        for component, names in self.active_in.items():
            for name in names:
                given = self.weights.get(name) or {}
                spec = given.get(component, given.get("*", 1.0))
                if isinstance(spec, _BY_PATH):
                    return None
                parts.append((component, name, spec == 0.0, len(self.adapters[name].layers)))
        return tuple(parts), frozenset(self.disabled), frozenset(self.residency.parked)

    def _reweigh(self) -> bool:
        """A change of blend weights only (the usual ``set_adapters`` between two blends of the same adapters,
        or back to the same adapter): the layers keep their lists, whose factors are the adapters'
        ``weighted_scale`` tensors, and only those are written. False when the lists change too, or
        a scale is another tensor than the lists were made with (a ``.to()`` since): then `push`."""
        if self._pushed_signature is None or self._shown_signature() != self._pushed_signature:
            return False
        replaced = False
        for component, names in self.active_in.items():
            for name in names:
                entries = self.adapters[name].by_component().get(component)
                if not entries:
                    continue
                given = self.weights.get(name) or {}
                weight = given.get(component, given.get("*", 1.0))
                if weight == 0.0:
                    continue  # shown nowhere, as `_collect_shown` has it
                for _, _, adapter in entries:
                    if adapter.blend_weight != weight and adapter.set_blend_weight(weight):
                        replaced = True
        return not replaced

    def mark_fused(self, component: str, module: nn.Module, names: list[str]) -> None:
        """``names`` are now written into ``module``'s weights: their unfused forward stops there."""
        self._pushed_signature = None
        self.fused_modules.append((component, module))
        self.fused_pairs.update((name, id(module)) for name in names)

    def forget_fused(self, components: list[str]) -> list[nn.Module]:
        """Forget the fusions of ``components``' layers and return those layers (to unfuse or keep fused)."""
        self._pushed_signature = None
        taken = [module for component, module in self.fused_modules if component in components]
        ids = {id(module) for module in taken}
        self.fused_modules = [(c, m) for c, m in self.fused_modules if id(m) not in ids]
        self.fused_pairs = {(n, i) for n, i in self.fused_pairs if i not in ids}
        return taken

    def set_enabled(self, enabled: bool, components) -> None:
        """``disable_lora`` / ``enable_lora`` of ``components``: their gates off or on. The layers keep what
        they show, so this touches no layer; only what the gates do not cover is pushed again: layers
        that do not read a gate (LoRA on parameters), fused layers, copies, and adapters that were parked
        while disabled (brought home with new tensors)."""
        before = set(self.disabled)
        if enabled:
            self.disabled -= set(components)
            parked = self.residency.parked & set(self.active)
            self.residency.bring_home(self, self.active)
            if parked:
                self.push()
                return
        else:
            self.disabled |= set(components)
        if self.disabled == before:
            return
        for component in components:
            self.gate(component).on = component not in self.disabled
        ungated = any(self.adapters[name].ungated(c) for c in components for name in self.active_in.get(c, ()))
        if ungated or self.fused_modules or self._copies_pushed:
            self.push()
        elif self._pushed_signature is not None:
            self._pushed_signature = self._shown_signature()  # the same lists, behind other gates

    def gate(self, component: str) -> LoraGate:
        gate = self.gates.get(component)
        if gate is None:
            gate = self.gates[component] = LoraGate(component not in self.disabled)
        return gate

    # -- pushing into layers -----------------------------------------------------
    def weight(self, name: str, component: str, path: str) -> float:
        given = self.weights.get(name, {})
        spec = given.get(component, given.get("*", 1.0))  # "*": one number for every component
        return spec.weight_for(path) if isinstance(spec, _BY_PATH) else float(spec)

    def push(self) -> None:
        """Give every wrapped layer what it shows for the current blend: `_collect_shown` decides it per
        adapter and layer; the layers store it (`layers.show_active`, `set_blend_weight`).

        Only the layers of the adapters active now or at the last push are visited,
        so the cost follows the active set, not the number of adapters loaded; a
        scale tensor is written only when its value changes.
        """
        shown: dict[nn.Module, list] = {}  # modules hash by identity
        for component, names in self.active_in.items():
            lists: dict[nn.Module, list] = {}
            for name in names:
                entries = self.adapters[name].by_component().get(component)
                if entries:
                    self._collect_shown(name, component, entries, lists)
            gate = self.gate(component)
            gate.on = component not in self.disabled
            if not gate.on and any(self.adapters[name].ungated(component) for name in names):
                # A disabled component's layers keep their lists behind the closed gate; those that read none show nothing.
                lists = {module: pairs for module, pairs in lists.items() if honours_gate(module)}
            show_active(lists, gate)
            shown.update(lists)
        show_nothing(self._pushed, unless_in=shown)  # layers that showed something and show nothing now
        self._pushed = shown
        for component, module in self.fused_modules:
            show_fused(module, component not in self.disabled)
        if self._copies_pushed or any(record.copies for record in self.adapters.values()):
            self._push_copies()
        self._pushed_signature = self._shown_signature()

    def _push_added(self, record: AdapterRecord) -> None:
        """What `push` gives after `add`, touching only the new adapter's layers: it is active last
        in each of its components, fused nowhere, so each of its layers gets its list with the new
        adapter appended, and every other layer keeps its list. Keeps a load's cost flat in the number
        of adapters already active."""
        pushed = self._pushed
        for component, entries in record.by_component().items():
            added: dict[nn.Module, list] = {}
            self._collect_shown(record.name, component, entries, added)
            for module, pairs in added.items():
                before = pushed.get(module)
                added[module] = pushed[module] = pairs if not before else before + pairs
            show_active(added, self.gate(component))
        if self._copies_pushed or record.copies:
            self._push_copies()
        self._pushed_signature = self._shown_signature()

    def _collect_shown(self, name: str, component: str, entries, lists: dict) -> None:
        """The rule of what a layer shows, in one place: adapter ``name`` on each of ``component``'s layers
        ``entries``, at its blend weight there, unless that weight is 0 or the adapter is fused into the
        layer. Appends ``(adapter, weighted_scale)`` to ``lists[module]``, the blend weight set first."""
        given = self.weights.get(name) or {}
        spec = given.get(component, given.get("*", 1.0))  # "*": one number for every component
        by_path = isinstance(spec, _BY_PATH)
        fused = self.fused_pairs
        for path, module, adapter in entries:
            weight = spec.weight_for(path) if by_path else spec
            if weight == 0.0 or (fused and (name, id(module)) in fused):
                continue
            if adapter.blend_weight != weight:  # the adapter's writer runs only for a change
                adapter.set_blend_weight(weight)
            pair = (adapter, adapter._buffers["weighted_scale"])
            active = lists.get(module)
            if active is None:
                lists[module] = [pair]
            else:
                active.append(pair)

    def _push_copies(self) -> None:
        # modules_to_save: a module runs the copy of the first active adapter that has one.
        # bias="all": a module without LoRA adds each active adapter's weighted bias delta.
        # Flux Control norms: a norm computes with the weight of the first active adapter that has one.
        # Parameter diffs (Wan's diff_m): a module adds each active adapter's weighted diff to its parameters.
        chosen: dict[int, tuple[nn.Module, nn.Module | None]] = {}
        biases: dict[int, tuple[nn.Module, list]] = {}
        params: dict[int, tuple[nn.Module, list]] = {}
        norms: dict[int, tuple[nn.Module, nn.Parameter | None]] = {}
        for record in self.adapters.values():
            for _, _, module in record.copies:
                if isinstance(module, SavedCopyLayer):
                    chosen.setdefault(id(module), (module, None))
                elif isinstance(module, BiasLayer):
                    biases.setdefault(id(module), (module, []))
                elif isinstance(module, NormWeightLayer):
                    norms.setdefault(id(module), (module, None))
                elif isinstance(module, ParamDiffLayer):
                    params.setdefault(id(module), (module, []))
        self._copies_pushed = bool(chosen or biases or norms or params)
        for component_active, names in self.active_in.items():
            if component_active in self.disabled:
                continue
            for name in names:
                for component, path, module in self.adapters[name].copies:
                    if component != component_active:
                        continue
                    w = self.weight(name, component, path)
                    if w == 0.0:
                        continue
                    if id(module) in chosen and chosen[id(module)][1] is None:
                        chosen[id(module)] = (module, module.lora_copies[name])
                    elif id(module) in biases:
                        biases[id(module)][1].append((module.lora_biases[name], w))
                    elif id(module) in norms and norms[id(module)][1] is None:
                        norms[id(module)] = (module, module.lora_norms[name].weight)
                    elif id(module) in params:
                        params[id(module)][1].append((module.lora_params[name], w))
        for module, copy in chosen.values():
            module.set_lora_copy(copy)
        for module, weight in norms.values():
            module.set_lora_norm(weight)
        for module, active in biases.values():
            module.set_lora_bias_active(active)
        for module, active in params.values():
            module.set_lora_param_active(active)

    def list_by_component(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, record in self.adapters.items():
            for component in record.components():
                out.setdefault(component, []).append(name)
        return out
