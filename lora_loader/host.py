"""What pipelines and models share: loading, blending, enabling and deleting adapters.

`LoraHost` holds the calls; a host class says only which components it has
(`_lora_components`) and where a file's symbolic component goes
(`_lora_resolve_component`). `pipeline.py` and `model.py` are the two hosts.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from . import hotswap, inject, merge, save
from .adapters import AdapterRecord, AdapterRegistry, ComponentWeight
from .blocks import BlockWeights, expand_block_weights, expand_path_weights
from .config import LoraConfig, lycoris_peft_config
from .errors import LoraError, LoraFormatError, LoraNameError, LoraWarning
from .formats import convert
from .fuse import dense_delta, fuse_layer, fuse_problem, keep_fused, originals_keeper, unfuse_layer
from .hub import read_source
from .layers import CALL_SCALE
from .residency import LoraResidency

# Every component name a pipeline may give LoRA layers (pipeline.py's LORA_COMPONENTS), for checks.
LORA_COMPONENT_NAMES = (
    "unet", "transformer", "transformer_2", "transformer_ref", "connectors", "text_conditioner",
    "text_encoder", "text_encoder_2", "text_encoder_3",
)
# diffusers' load_lora_weights(load_into_transformer_2=True) (Wan 2.2's second expert) and
# load_into_transformer_ref=True (MiniMax-H3's reference partition): the file's transformer part goes there.
_LOAD_INTO = {"load_into_transformer_2": "transformer_2", "load_into_transformer_ref": "transformer_ref"}
# diffusers' load_lora_weights kwargs that change nothing for us; accepted so diffusers code runs unchanged.
_IGNORED_DIFFUSERS_KWARGS = {"low_cpu_mem_usage", "use_safetensors", "force_download", "proxies", "user_agent"}
ALL_COMPONENTS = "*"
_REGISTRY = "_lora_registry_state"
# On each component of an attached pipeline: its name there ("unet", "text_encoder", ...), so its
# component-level calls act on that component of the registry it shares with the pipeline.
COMPONENT_NAME = "_lora_component_name"


@dataclass
class LoadReport:
    """What one `load_lora_weights` call did. ``print(report)`` gives a readable summary."""

    adapter_name: str
    format: str
    source: str
    modules: dict[str, int]  # component -> number of modules adapted
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = ", ".join(f"{component}: {n} modules" for component, n in self.modules.items())
        text = f"adapter '{self.adapter_name}' ({self.format}) from {self.source}: {parts}"
        if self.skipped:
            shown = ", ".join(self.skipped[:10]) + (" ..." if len(self.skipped) > 10 else "")
            text += f"; skipped {len(self.skipped)} keys: {shown}"
        return text


def resolve_source(resolver, name: str):
    """The source (path, repo id or state dict) a resolver gives for adapter ``name``, or None.

    >>> resolve_source("my-org", "style")
    'my-org/style'
    >>> resolve_source(lambda n: None, "style") is None
    True
    """
    if name == "__base__" or not name or "/" in name or "\\" in name or name.startswith("."):
        return None  # never a path outside the folder, never the base model's row marker
    if callable(resolver):
        return resolver(name)
    root = os.fspath(resolver)
    if os.path.isdir(root):
        for candidate in (os.path.join(root, name), os.path.join(root, f"{name}.safetensors")):
            if os.path.exists(candidate):
                return candidate
        return None
    return f"{root.rstrip('/')}/{name}"


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LoraError(f"{what} must be a finite number, got {value!r}")
    return float(value)


class LoraHost(LoraResidency):
    """The adapter calls shared by `LoraPipelineMixin` and `LoraModelMixin` (residency calls: residency.py)."""

    # -- what a host provides -------------------------------------------------------
    def _lora_components(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def _lora_resolve_component(self, symbolic: str) -> str | None:
        raise NotImplementedError

    def _lora_component_weights(self, name: str, weights: dict) -> dict[str, ComponentWeight]:
        raise NotImplementedError

    # -- state ---------------------------------------------------------------------
    def _lora_registry_to_read(self) -> AdapterRegistry:
        """The registry if there is one, else an empty one that is not attached: for calls that only read
        (or refuse), so that asking a model without adapters leaves it without a registry."""
        for module in self._lora_components().values():
            if _REGISTRY in module.__dict__:
                return module.__dict__[_REGISTRY]
        return AdapterRegistry()

    def _lora_registry_to_change(self) -> AdapterRegistry:
        """The registry, attached to every component (created if there is none yet): for calls that change it."""
        # The registry lives on the component modules, not on the host: adapters live in those
        # modules, so a second pipeline built from the same components (img2img from txt2img,
        # `from_pipe`) sees the same adapters, as it does with diffusers.
        components = list(self._lora_components().values())
        registry = next((m.__dict__[_REGISTRY] for m in components if _REGISTRY in m.__dict__), None)
        if registry is None:
            registry = AdapterRegistry()
        for module in components:
            if module.__dict__.get(_REGISTRY) is not registry:
                # object.__setattr__: not a submodule, parameter or config entry.
                object.__setattr__(module, _REGISTRY, registry)
        return registry

    def _lora_release_registry_if_empty(self) -> None:
        """With no adapter left, take the registry off the modules: they are plain modules again
        (unless it holds a residency cap or a resolver, which outlive the adapters). The components of an attached
        pipeline keep theirs: it is what their component-level calls share with the pipeline."""
        for module in self._lora_components().values():
            registry = module.__dict__.get(_REGISTRY)
            if (registry is not None and not registry.adapters and registry.enabled and registry.residency.cap is None
                    and registry.resolver is None
                    and COMPONENT_NAME not in module.__dict__):
                del module.__dict__[_REGISTRY]

    def _lora_scope(self) -> list[str]:
        """The components a call on this host acts on: all of a pipeline's, or the one a model is."""
        return list(self._lora_components())

    # -- loading ---------------------------------------------------------------------
    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict,
        weight_name: str | None = None,
        adapter_name: str | None = None,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | None = None,
        local_files_only: bool | None = None,
        subfolder: str | None = None,
        hotswap: bool = False,
        strict: bool = True,
        **kwargs,
    ) -> LoadReport:
        """Load a LoRA (Kohya, PEFT or diffusers layout) as a named adapter, active with weight 1.0.

        The source is a Hub repo id, a local folder, a ``.safetensors`` file or a
        state dict. Every key is applied or reported; anything that does not fit
        raises a `LoraError` and leaves the model exactly as it was.

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> report = model.load_lora_weights(
        ...     {"0.lora_A.weight": torch.ones(2, 4), "0.lora_B.weight": torch.ones(4, 2)}, adapter_name="x")
        >>> print(report)
        adapter 'x' (diffusers) from <state dict>: model: 1 modules
        """
        adapter_config = kwargs.pop("_adapter_config", None)  # load_adapter(adapter_state_dict=, peft_config=)
        activate = kwargs.pop("_activate", True)  # False: a load on first use (the resolver) activates nothing
        allow_pickle = kwargs.pop("allow_pickle", None)  # diffusers' flag: False refuses pickled (.bin) files
        into = [component for flag, component in _LOAD_INTO.items() if kwargs.pop(flag, False)]
        unknown = set(kwargs) - _IGNORED_DIFFUSERS_KWARGS
        if unknown:
            raise LoraError(f"load_lora_weights() got unexpected keyword arguments {sorted(unknown)}")
        components, resolve = self._lora_load_target(into)
        registry = self._lora_registry_to_read()
        name = registry.default_name() if adapter_name is None else adapter_name
        source_kwargs = dict(
            subfolder=subfolder, revision=revision, token=token, cache_dir=cache_dir,
            local_files_only=local_files_only, allow_pickle=allow_pickle,
        )  # fmt: skip
        if hotswap:
            if not isinstance(name, str) or name not in registry.adapters:
                raise LoraNameError(f"hotswap=True replaces a loaded adapter; {name!r} is not loaded ({sorted(registry.adapters)})")
            return self._lora_hotswap(pretrained_model_name_or_path_or_dict, weight_name, name, source_kwargs)
        registry.check_new_name(name, list(components) if into else self._lora_scope())
        source = read_source(pretrained_model_name_or_path_or_dict, weight_name, **source_kwargs)
        if adapter_config is not None:
            source.adapter_config = adapter_config
        if lycoris_peft_config(source.adapter_config, source.tensors, source.name):
            source.adapter_config = None  # diffusion-pipe's LoKr folder: its lokr_* keys say it all
        try:
            converted = convert(source.tensors, source.metadata, source.adapter_config)
        except LoraFormatError as err:
            raise LoraFormatError(f"{source.name}: {err}") from None
        if converted.is_not_lora():
            raise converted.not_lora_error(source.name, source.tensors)
        planned = inject.plan(converted, components, resolve, source.name, source.tensors, strict)
        hotswap_rank = registry.hotswap_rank
        if hotswap_rank is not None:
            above = [f"{p.component}.{p.path} (rank {p.delta.rank})" for p in planned.modules if p.delta.rank > hotswap_rank]
            if above:
                raise LoraError(f"{source.name}: enable_lora_hotswap(target_rank={hotswap_rank}) was called, and these modules "
                                f"have a higher rank: {above[:5]}")
        layers, copies = inject.apply(planned, name, copy=not source.owned)
        config = LoraConfig.from_dict(source.adapter_config, source.name) if source.adapter_config else None
        record = AdapterRecord(name, converted.format, source.name, layers, planned.skipped, copies, config)
        self._lora_registry_to_change().add(record, activate=activate)
        if hotswap_rank is not None:
            _pad_for_hotswap(self._lora_registry_to_change(), record, hotswap_rank)
        counts: dict[str, int] = {}
        for component, _, _ in layers + copies:
            counts[component] = counts.get(component, 0) + 1
        return LoadReport(name, converted.format, source.name, counts, list(planned.skipped))

    def _lora_load_target(self, into: list[str]):
        """``(components, resolve)`` a load applies to: the host's, or with ``load_into_transformer_2`` /
        ``load_into_transformer_ref`` that component alone, taking the file's transformer (denoiser) part."""
        components = self._lora_components()
        if not into:
            return components, self._lora_resolve_component
        if len(into) > 1:
            raise LoraError(f"load_lora_weights(): pass one of {sorted(_LOAD_INTO)}, not several")
        target = into[0]
        if target not in components:
            raise LoraError(
                f"load_lora_weights(load_into_{target}=True): {type(self).__name__} has no '{target}' component "
                f"(its LoRA components: {sorted(components)}); Wan 2.1 has one transformer, Wan 2.2 A14B two"
            )
        return {target: components[target]}, lambda symbolic: target if symbolic in ("denoiser", "transformer") else None

    def _lora_hotswap(self, src, weight_name, name: str, source_kwargs: dict) -> LoadReport:
        """Replace adapter ``name``'s tensors in place with the file's (see hotswap.py); nothing else changes."""
        registry = self._lora_registry_to_read()
        registry.refuse_fused([name], f"hotswapping '{name}'")
        source = read_source(src, weight_name, **source_kwargs)
        try:
            converted = convert(source.tensors, source.metadata, source.adapter_config)
        except LoraFormatError as err:
            raise LoraFormatError(f"{source.name}: {err}") from None
        planned = inject.plan(converted, self._lora_components(), self._lora_resolve_component, source.name, source.tensors)
        record = registry.adapters[name]
        if planned.copies or planned.biases or planned.norms or planned.params or any(p.widen for p in planned.modules):
            raise LoraError(f"{source.name}: hotswap of full module copies, biases, norm weights, parameter diffs or a wider "
                            "x_embedder is not supported")
        loaded = {id(module) for _, _, module in record.layers}
        extra = [f"{p.component}.{p.path}" for p in planned.modules if id(p.module) not in loaded]
        if extra:
            raise LoraError(
                f"{source.name}: hotswap into '{name}' targets layers the loaded adapter does not ({extra[:5]}); "
                "a compiled model cannot grow new layers: load first the adapter with the most layers"
            )
        new = {id(p.module): p.delta for p in planned.modules}
        where = {id(module): f"{component}.{path}" for component, path, module in record.layers}
        # Every check of every layer before the first tensor is written: a swap is all or nothing.
        for _, _, module in record.layers:
            hotswap.check(module.lora_adapters[name], new.get(id(module)), f"{source.name}: {where[id(module)]}")
        for _, _, module in record.layers:
            adapter = module.lora_adapters[name]
            if id(module) in new:
                hotswap.swap_in(adapter, new[id(module)])
            else:
                hotswap.silence(adapter)
        record.source, record.format = source.name, converted.format
        registry = self._lora_registry_to_change()
        registry.push()
        counts: dict[str, int] = {}
        for p in planned.modules:
            counts[p.component] = counts.get(p.component, 0) + 1
        return LoadReport(name, converted.format, source.name, counts, list(planned.skipped))

    # -- blending ----------------------------------------------------------------------
    def set_adapters(self, adapter_names, weights=None, *, adapter_weights=None) -> None:
        """Activate exactly these adapters, with blend weights.

        ``weights`` (or diffusers' name ``adapter_weights``): None (all 1.0), a
        number, a list with one entry per adapter, and per adapter a dict per
        component (``{"unet": 0.7, "text_encoder": 0.5}``), with UNet block
        weights as diffusers defines them. Adapters not named become inactive.
        A name that is not loaded raises `LoraNameError` and changes nothing.

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> _ = model.load_lora_weights({"0.lora_A.weight": torch.ones(2, 4), "0.lora_B.weight": torch.ones(4, 2)}, adapter_name="a")
        >>> model.set_adapters(["a"], weights=[0.5]); model.get_active_adapters()
        ['a']
        """
        if adapter_weights is not None:
            if weights is not None:
                raise LoraError("pass either weights= or adapter_weights=, not both")
            weights = adapter_weights
        self._lora_load_missing(adapter_names)
        names = self._lora_registry_to_read().names(adapter_names, "set_adapters")
        if weights is None or not isinstance(weights, (list, tuple)):
            weights = [weights] * len(names)
        if len(weights) != len(names):
            raise LoraError(f"got {len(weights)} weights for {len(names)} adapters {names}; expected one weight per adapter")
        # On a pipeline's component (pipe.unet.set_adapters), a number is that component's weight only.
        on_component = COMPONENT_NAME in self.__dict__
        everywhere = self._lora_scope()[0] if on_component else ALL_COMPONENTS
        normalized = []
        for name, weight in zip(names, weights):
            if weight is None:
                normalized.append({} if everywhere == ALL_COMPONENTS else {everywhere: 1.0})
            elif isinstance(weight, dict):
                normalized.append(self._lora_component_weights(name, weight))
            else:
                normalized.append({everywhere: _number(weight, f"weight of adapter '{name}'")})
        self._lora_registry_to_change().set_active(names, normalized, self._lora_scope(), update=on_component)

    def disable_lora(self) -> None:
        """Bypass every adapter: outputs equal the base model's exactly, until `enable_lora`.

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> lora = {"0.lora_A.weight": torch.ones(2, 4), "0.lora_B.weight": torch.ones(4, 2)}
        >>> x = torch.randn(1, 4)
        >>> base = model(x)
        >>> _ = model.load_lora_weights(lora, adapter_name="a")
        >>> model.disable_lora()
        >>> torch.equal(model(x), base)
        True
        """
        self._lora_registry_to_change().set_enabled(False, self._lora_scope())

    def enable_lora(self) -> None:
        """Restore the adapters and weights of the last `set_adapters` (or loads) after `disable_lora`.

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> lora = {"0.lora_A.weight": torch.ones(2, 4), "0.lora_B.weight": torch.ones(4, 2)}
        >>> x = torch.randn(1, 4)
        >>> _ = model.load_lora_weights(lora, adapter_name="a")
        >>> with_lora = model(x)
        >>> model.disable_lora(); model.enable_lora()
        >>> torch.equal(model(x), with_lora)
        True
        """
        self._lora_registry_to_change().set_enabled(True, self._lora_scope())

    def get_active_adapters(self) -> list[str]:
        """Names of the active adapters, in the order they were set.

        On a pipeline, those of the last component that has adapters, in diffusers' order (denoiser,
        then text encoders), as diffusers reports them; each component keeps its own list (see
        `AdapterRegistry`), so after a UNet-only load this can name the text encoder's.

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> lora = {"0.lora_A.weight": torch.ones(2, 4), "0.lora_B.weight": torch.ones(4, 2)}
        >>> for name in ("a", "b"):
        ...     _ = model.load_lora_weights(lora, adapter_name=name)
        >>> model.get_active_adapters()
        ['b']
        >>> model.set_adapters(["a", "b"], [0.5, 1.0])
        >>> model.get_active_adapters()
        ['a', 'b']
        """
        registry = self._lora_registry_to_read()
        adapted = set(registry.list_by_component())
        for component in reversed(self._lora_scope()):
            if component in adapted:
                return list(registry.active_in.get(component, []))
        return []

    def get_list_adapters(self) -> dict[str, list[str]]:
        """``{component: [adapter names]}`` for every component an adapter touches.

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> lora = {"0.lora_A.weight": torch.ones(2, 4), "0.lora_B.weight": torch.ones(4, 2)}
        >>> _ = model.load_lora_weights(lora, adapter_name="a")
        >>> model.get_list_adapters()
        {'model': ['a']}
        """
        return self._lora_registry_to_read().list_by_component()

    # -- adapters by name -------------------------------------------------------------------
    def set_adapter_resolver(self, resolver) -> None:
        """Where an adapter that is named but not loaded comes from: `set_adapters` / `set_adapter` and a mixed
        batch's ``adapter_names=`` then load it on first use (as serving engines load adapters by name).

        ``resolver`` is a local folder (adapter ``x`` is its ``x/`` PEFT folder or ``x.safetensors``),
        a Hub namespace (``"my-org"``: adapter ``x`` is the repo ``my-org/x``), a callable
        ``name -> source`` (a path, repo id or state dict; None for a name it does not know), or None
        (names must be loaded first, the default). A name the resolver does not know is the usual
        `LoraNameError`. With `set_max_resident_adapters`, adapters loaded this way are parked and brought
        home as any other.

        >>> import os, tempfile, torch, lora_loader
        >>> from safetensors.torch import save_file
        >>> folder = tempfile.mkdtemp()
        >>> save_file({"0.lora_A.weight": torch.ones(2, 4), "0.lora_B.weight": torch.ones(4, 2)}, os.path.join(folder, "x.safetensors"))
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> model.set_adapter_resolver(folder)
        >>> model.set_adapters("x")
        >>> model.get_active_adapters()
        ['x']
        """
        if resolver is not None and not callable(resolver) and not isinstance(resolver, (str, os.PathLike)):
            raise LoraError(f"resolver must be a folder, a Hub namespace, a callable name -> source, or None; got {resolver!r}")
        self._lora_registry_to_change().resolver = resolver

    def _lora_load_missing(self, adapter_names) -> None:
        """Load, without activating them, the adapters ``adapter_names`` names that are not loaded and that the
        resolver (`set_adapter_resolver`) knows; the others are left for the caller's name check."""
        registry = self._lora_registry_to_read()
        if registry.resolver is None:
            return
        names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
        if not isinstance(names, (list, tuple)):
            return
        for name in dict.fromkeys(n for n in names if isinstance(n, str) and n not in registry.adapters):
            source = resolve_source(registry.resolver, name)
            if source is not None:
                self.load_lora_weights(source, adapter_name=name, _activate=False)

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """A new adapter ``adapter_name`` made of ``adapters`` with ``weights``, as PEFT's ``add_weighted_adapter``
        makes it (`lora_loader.merge`: linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune and their
        ``*_svd`` variants). The sources stay loaded; the new adapter is loaded beside them (and made active,
        as every load does). A name already in use is a `LoraNameError` (PEFT returns without a word).

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> _ = model.load_lora_weights({"0.lora_A.weight": torch.ones(2, 4), "0.lora_B.weight": torch.ones(4, 2)}, adapter_name="a")
        >>> _ = model.load_lora_weights({"0.lora_A.weight": torch.ones(2, 4), "0.lora_B.weight": -torch.ones(4, 2)}, adapter_name="b")
        >>> model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "ab", combination_type="linear")
        >>> model.get_active_adapters(), bool(model[0].lora_adapters["ab"].to_delta().up.abs().sum() < 1e-6)
        (['ab'], True)
        """
        registry = self._lora_registry_to_read()
        names = registry.names(adapters, "add_weighted_adapter")
        if isinstance(weights, (int, float)) or len(weights) != len(names):
            raise LoraError(f"add_weighted_adapter: got weights {weights!r} for {len(names)} adapters; expected one weight each")
        weights = [_number(w, "add_weighted_adapter weight") for w in weights]
        registry.check_new_name(adapter_name, self._lora_scope())
        merge.check_combination(combination_type, density, majority_sign_method)
        if len(names) == 1:
            combination_type = "linear"  # PEFT's rule: one adapter merges linearly
        components = self._lora_components()
        modules, ranks, configs = self._lora_weighted_sources(registry, names, weights, components)
        new_rank = merge.new_rank_of(combination_type, ranks, svd_rank)
        merged = merge.weighted_merge(modules, combination_type, new_rank, density, majority_sign_method,
                                      svd_clamp, svd_full_matrices, svd_driver)  # fmt: skip
        by_component: dict[str, dict] = {}
        for (component, path), delta in merged.items():
            by_component.setdefault(component, {})[path] = delta
        tensors, _ = save.to_diffusers(by_component)
        config = dict(configs[0] or {}) | {"r": new_rank, "lora_alpha": new_rank, "rank_pattern": {}, "alpha_pattern": {},
                                            "use_rslora": False, "use_dora": False}  # fmt: skip
        targets = [t for c in configs if c for t in (c.get("target_modules") or [])] if all(
            isinstance((c or {}).get("target_modules"), (list, tuple)) for c in configs) else None
        config["target_modules"] = sorted(set(targets)) if targets else sorted({p.rsplit(".", 1)[-1] for _, p in merged})
        self.load_lora_weights(tensors, adapter_name=adapter_name, _adapter_config=config)

    def _lora_weighted_sources(self, registry, names: list[str], weights: list[float], components: dict):
        """``({(component, path): [(delta, weight), ...]}`` in the model's module order, each adapter's largest
        rank, each adapter's config as a dict)`` for `add_weighted_adapter`."""
        order = {id(m): i for component in components.values() for i, m in enumerate(component.modules())}
        modules: dict[tuple[str, str], list] = {}
        ranks, configs = [], []
        for name, weight in zip(names, weights):
            record = registry.adapters[name]
            if record.copies:
                raise LoraError(f"adapter '{name}' carries full module copies (modules_to_save), which cannot be merged")
            ranks.append(max(module.lora_adapters[name].rank for _, _, module in record.layers))
            config = record.config_for(record.components()[0]) if record.components() else None
            configs.append(config.to_dict() if config is not None else None)
            for component, path, module in record.layers:
                modules.setdefault((order.get(id(module), 0), component, path), []).append(
                    (module.lora_adapters[name].to_delta(), weight))
        ordered = {(component, path): entries for (_, component, path), entries in sorted(modules.items(), key=lambda kv: kv[0][0])}
        return ordered, ranks, configs

    def delete_adapters(self, adapter_names) -> None:
        """Remove adapters and free their tensors; a layer left with no adapter becomes the plain module again.

        ``adapter_names`` is a name or a list of names, each loaded and not fused
        (`unfuse_lora` first); otherwise `LoraError` and nothing changes.

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> lora = {"0.lora_A.weight": torch.ones(2, 4), "0.lora_B.weight": torch.ones(4, 2)}
        >>> _ = model.load_lora_weights(lora, adapter_name="a")
        >>> model.delete_adapters("a")
        >>> model.get_list_adapters(), type(model[0]) is torch.nn.Linear
        ({}, True)
        """
        existing = self._lora_registry_to_read()
        names = existing.names(adapter_names, "delete_adapters")
        existing.refuse_fused(names, "deleting them")
        registry = self._lora_registry_to_change()
        scope = self._lora_scope()
        for name in names:
            if len(scope) == 1 and COMPONENT_NAME in self.__dict__:  # pipe.unet.delete_adapters: the UNet's part only
                part = registry.remove_component(name, scope[0])
            else:
                record = registry.remove(name)
                part = record.layers + record.copies
            inject.remove(name, [module for _, _, module in part])
        registry.push()
        self._lora_release_registry_if_empty()


def block_or_number(component: str, value, module: nn.Module, adapter: str) -> ComponentWeight:
    """A component's weight: a number, a UNet block dict expanded as diffusers does, or DiT weights by path."""
    if isinstance(value, dict):
        if hasattr(module, "down_blocks") and hasattr(module, "up_blocks"):
            return expand_block_weights(module, value)
        try:
            return expand_path_weights(module, value)
        except LoraError as err:
            raise LoraError(f"adapter '{adapter}', '{component}': {err}") from None
    return _number(value, f"weight of adapter '{adapter}' for '{component}'")


def warn_unused_component(adapter: str, component: str) -> None:
    warnings.warn(
        f"adapter '{adapter}': weights for '{component}' are ignored: this pipeline has no such component",
        LoraWarning,
        stacklevel=4,
    )


__all__ = ["LoadReport", "LoraHost", "BlockWeights"]


class _or_diffusers_classmethod:
    """A method that is also diffusers' classmethod of the same name, for the calls diffusers' training
    scripts make: ``StableDiffusionPipeline.save_lora_weights(dir, unet_lora_layers=...)`` on an attached
    pipeline's class, or the same keywords on an instance, write the state dicts they are given (diffusers'
    own classmethod, which needs no peft); ``pipe.save_lora_weights(path, "a")`` saves a loaded adapter."""

    def __init__(self, method):
        self.method = method
        functools.update_wrapper(self, method)

    def __set_name__(self, owner, name):
        self.name = name

    def _diffusers(self, cls):
        for klass in cls.__mro__:
            found = klass.__dict__.get(self.name)
            if isinstance(found, classmethod):
                return found.__get__(None, cls)
        raise LoraError(f"{cls.__name__}.{self.name}(...) with *_lora_layers= needs a diffusers pipeline class")

    def __get__(self, obj, cls=None):
        if obj is None:
            return self._diffusers(cls)

        @functools.wraps(self.method)
        def bound(*args, **kwargs):
            if any(key.endswith("_lora_layers") for key in kwargs):
                return self._diffusers(type(obj))(*args, **kwargs)
            return self.method(obj, *args, **kwargs)

        return bound


class LoraLifecycle:
    """Fuse, unfuse, unload, per-call scale and device moves: the rest of an adapter's life (both hosts)."""

    def fuse_lora(
        self,
        lora_scale: float = 1.0,
        adapter_names: list[str] | None = None,
        components: list[str] | None = None,
        safe_fusing: bool = False,
        keep_originals: str = "auto",
        **kwargs,
    ) -> None:
        """Write the current blend of ``adapter_names`` (default: the active adapters) into the base weights.

        ``lora_scale`` multiplies this fuse only; the weights `set_adapters` set are
        unchanged. `unfuse_lora` restores the original weights bit for bit.

        ``keep_originals``: where the original weights wait for `unfuse_lora`. ``"device"``: beside
        the fused ones (twice the targeted weights' memory there); ``"cpu"``: in CPU memory (pinned
        with CUDA), the fused weights written in place; ``"disk"``: in a temporary file (``TMPDIR``);
        ``"auto"`` (default): on the device if its free memory holds the fused copies, else ``"cpu"``,
        else ``"disk"``. A model in CPU memory keeps them as they are unless ``"disk"``; layers
        offloaded by accelerate or quantized by bitsandbytes keep them where they always do.

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> lora = {"0.lora_A.weight": torch.ones(2, 4), "0.lora_B.weight": torch.ones(4, 2)}
        >>> original = model[0].weight.clone()
        >>> _ = model.load_lora_weights(lora, adapter_name="a")
        >>> model.fuse_lora()
        >>> torch.equal(model[0].weight, original + 2.0)  # up @ down = 2 everywhere, scale 1
        True
        >>> model.unfuse_lora()
        >>> torch.equal(model[0].weight, original)
        True
        """
        registry = self._lora_registry_to_read()
        given = None if adapter_names is None else registry.names(adapter_names, "fuse_lora")
        lora_scale = _number(lora_scale, "lora_scale")
        scope = self._lora_scope()
        if components is not None:
            if isinstance(components, str) or not isinstance(components, (list, tuple)) or not components:
                raise LoraError(f"components={components!r}: expected a non-empty list of component names")
            unknown = sorted(set(components) - set(scope) - set(LORA_COMPONENT_NAMES))
            if unknown:
                raise LoraError(f"fuse_lora(components=...) names {unknown}, which are not components of this host ({scope})")
        wanted = set(scope) if components is None else set(components) & set(scope)
        per_module: dict[int, tuple[str, nn.Module, list]] = {}
        paths: dict[int, str] = {}  # for the error of a layer that cannot be fused
        for component in wanted:
            # Each component fuses its own active adapters (or the ones named), as diffusers+peft do.
            for name in (registry.active_in.get(component, []) if given is None else given):
                for path, module, adapter in registry.adapters[name].by_component().get(component, []):
                    w = registry.weight(name, component, path) * float(lora_scale)
                    entry = per_module.setdefault(id(module), (component, module, []))
                    paths[id(module)] = path
                    entry[2].append((name, adapter, w))
        already = sorted({c for c, m in registry.fused_modules if id(m) in per_module})
        if already:
            raise LoraError(f"adapters are already fused into {already}; call unfuse_lora() first")
        for component, module, items in per_module.values():  # every layer checked before any is fused
            problem = fuse_problem(module, [(adapter, w) for _, adapter, w in items])
            if problem is not None:
                where = f"{component}.{paths[id(module)]}"
                raise LoraError(f"cannot fuse {sorted(n for n, _, _ in items)} into {where}: {problem}; nothing fused")
        if safe_fusing:

            for component, module, items in per_module.values():
                for name, adapter, w in items:
                    if not torch.isfinite(dense_delta(module, adapter, w)[0]).all():
                        raise LoraError(f"fusing adapter '{name}' into {component} gives non-finite weights; nothing fused")
        keep = originals_keeper(keep_originals, [module for _, module, _ in per_module.values()])
        registry = self._lora_registry_to_change()
        for component, module, items in per_module.values():
            fuse_layer(module, [(adapter, w) for _, adapter, w in items if w != 0.0], keep)
            registry.mark_fused(component, module, [name for name, _, _ in items])
        registry.push()

    def unfuse_lora(self, components: list[str] | None = None, **kwargs) -> None:
        """Restore the weights `fuse_lora` changed, bit for bit; the adapters run unfused again.

        ``components`` (a pipeline's, e.g. ``["unet"]``) unfuses only those.

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> lora = {"0.lora_A.weight": torch.ones(2, 4), "0.lora_B.weight": torch.ones(4, 2)}
        >>> original = model[0].weight.clone()
        >>> _ = model.load_lora_weights(lora, adapter_name="a")
        >>> model.fuse_lora(); model.unfuse_lora()
        >>> torch.equal(model[0].weight, original), model.get_active_adapters()
        (True, ['a'])
        """
        registry = self._lora_registry_to_read()
        scope = [c for c in self._lora_scope() if components is None or c in components]
        for module in registry.forget_fused(scope):
            unfuse_layer(module)
        registry.push()

    def unload_lora_weights(self, *args, **kwargs) -> None:
        """Remove every adapter and every injected layer: the model is structurally the base model again.

        Weights fused before the unload stay fused (diffusers' "fuse, then unload" way of baking a LoRA in).

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> lora = {"0.lora_A.weight": torch.ones(2, 4), "0.lora_B.weight": torch.ones(4, 2)}
        >>> _ = model.load_lora_weights(lora, adapter_name="a")
        >>> model.unload_lora_weights()
        >>> model.get_list_adapters(), type(model[0]) is torch.nn.Linear
        ({}, True)
        """
        registry = self._lora_registry_to_read()
        scope = self._lora_scope()
        for module in registry.forget_fused(scope):
            keep_fused(module)
        whole_host = not (len(scope) == 1 and COMPONENT_NAME in self.__dict__)
        for name in list(registry.adapters):
            if whole_host:
                record = registry.remove(name)
                part = record.layers + record.copies
            elif scope[0] in registry.adapters[name].components():  # pipe.unet.unload_lora(): the UNet's parts
                part = registry.remove_component(name, scope[0])
            else:
                continue
            inject.remove(name, [module for _, _, module in part])
        registry.set_enabled(True, scope)  # pushes
        self._lora_release_registry_if_empty()

    @_or_diffusers_classmethod
    def save_lora_weights(self, save_directory, adapter_name: str | None = None, format: str = "diffusers", **kwargs) -> str:
        """Write one adapter as ``.safetensors`` in the ``diffusers``, ``kohya`` or ``peft`` layout.

        ``peft`` on a model given a folder writes PEFT's folder (``adapter_config.json`` too);
        otherwise it is one file with PEFT's ``base_model.model.*`` keys (a pipeline's text
        encoders prefixed with their component).

        The real alpha of every module is written (rank/alpha patterns in the
        diffusers header, ``.alpha`` tensors for Kohya), and the header records
        the format and base model family. ``save_directory`` is a folder (the
        file is ``pytorch_lora_weights.safetensors``) or a ``.safetensors`` path.
        Returns the path written.

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> lora = {"0.lora_A.weight": torch.ones(2, 4), "0.lora_B.weight": torch.ones(4, 2)}
        >>> import os, tempfile
        >>> _ = model.load_lora_weights(lora, adapter_name="a")
        >>> path = model.save_lora_weights(tempfile.mkdtemp(), adapter_name="a", format="kohya")
        >>> os.path.basename(path)
        'pytorch_lora_weights.safetensors'
        >>> _ = model.load_lora_weights(path, adapter_name="again")  # the file reads back
        """
        registry = self._lora_registry_to_read()
        if adapter_name is None:
            if len(registry.adapters) != 1:
                raise LoraError(f"pass adapter_name=: loaded adapters are {sorted(registry.adapters)}")
            adapter_name = next(iter(registry.adapters))
        registry.check_known([adapter_name])
        record = registry.adapters[adapter_name]
        if format == "peft" and hasattr(self, "save_adapter") and not os.fspath(save_directory).endswith(".safetensors"):
            self.save_adapter(os.fspath(save_directory), adapter_name)  # a model: PEFT's folder, config included
            return os.fspath(save_directory)
        components = self._lora_components()
        deltas = save.adapter_deltas(record, components)
        if format == "peft":
            tensors, metadata = save.to_peft(deltas)
        elif format == "diffusers":
            tensors, metadata = save.to_diffusers(deltas)
        elif format == "kohya":
            tensors, metadata = save.to_kohya(deltas, components)
        else:
            raise LoraError(f"format={format!r}; expected 'diffusers', 'kohya' or 'peft'")
        return save.write(os.fspath(save_directory), tensors, metadata, format, save.model_family(components))

    def enable_lora_hotswap(self, target_rank: int = 128, check_compiled: str = "error") -> None:
        """diffusers' call before loading the first adapter that will be hotswapped under ``torch.compile``:
        every adapter loaded from now on (and any already loaded) is zero-padded to ``target_rank``, so
        ``load_lora_weights(..., hotswap=True)`` with any rank up to it never recompiles. An adapter
        above ``target_rank`` is refused when it is loaded. ``check_compiled`` is diffusers' argument,
        accepted for its signature.

        >>> import torch, lora_loader
        >>> m = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> m.enable_lora_hotswap(target_rank=8)
        >>> _ = m.load_lora_weights({"0.lora_A.weight": torch.ones(2, 4), "0.lora_B.weight": torch.ones(4, 2)}, adapter_name="x")
        >>> m[0].lora_adapters["x"].down.shape
        torch.Size([8, 4])
        """
        if isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank < 1:
            raise LoraError(f"target_rank must be an int >= 1, got {target_rank!r}")
        prepare_hotswap(self, max_rank=target_rank)
        self._lora_registry_to_change().hotswap_rank = target_rank

    def set_lora_device(self, adapter_names: str | list[str], device: str | torch.device) -> None:
        """Move these adapters' tensors to ``device`` (e.g. park unused ones on the CPU).

        An adapter moved off the device of any of its layers counts as parked (see
        `lora_residency`); when it is activated again (`set_adapters`,
        `set_adapter`, `enable_lora`) it is moved back first, layer by layer, to the
        device of each base layer, so a forward never mixes devices. An unknown
        name or a device that is not one (or ``meta``, which would drop the
        values) raises `LoraError` and moves nothing. To cap the number of
        resident adapters automatically, see `set_max_resident_adapters`.

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> _ = model.load_lora_weights({"0.lora_A.weight": torch.ones(2, 4), "0.lora_B.weight": torch.ones(4, 2)}, adapter_name="a")
        >>> model.set_lora_device(["a"], "cpu"); model[0].lora_adapters["a"].down.device
        device(type='cpu')
        """
        registry = self._lora_registry_to_read()
        names = registry.names(adapter_names, "set_lora_device")
        registry.residency.move(registry, names, device)
        registry.push()  # moved factor tensors are new objects: give the layers the current ones


@contextlib.contextmanager
def call_scale(scale):
    """Scale every unfused adapter by ``scale`` for the calls inside, without touching stored weights."""
    if scale is None:
        yield
        return
    token = CALL_SCALE.set(float(scale))
    try:
        yield
    finally:
        CALL_SCALE.reset(token)


def scale_from_kwargs(kwargs: dict):
    """diffusers' per-call LoRA scale: ``{cross,joint,}attention_kwargs["scale"]`` or ``lora_scale``."""
    for name in ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs"):
        value = kwargs.get(name)
        if isinstance(value, dict) and value.get("scale") is not None:
            return value["scale"]
    return kwargs.get("lora_scale")


def prepare_hotswap(host, max_rank: int) -> None:
    """Zero-pad every loaded adapter of ``host`` (an attached pipeline or model) to ``max_rank``, before
    ``torch.compile``, so later ``load_lora_weights(..., hotswap=True)`` with any rank up to it never recompiles.

    >>> import torch, lora_loader
    >>> m = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    >>> _ = m.load_lora_weights({"0.lora_A.weight": torch.ones(2, 4), "0.lora_B.weight": torch.ones(4, 2)}, adapter_name="x")
    >>> lora_loader.prepare_hotswap(m, max_rank=8); m[0].lora_adapters["x"].down.shape
    torch.Size([8, 4])
    """
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise LoraError(f"prepare_hotswap: max_rank must be a positive int, got {max_rank!r}")
    registry = host._lora_registry_to_read()
    # Every adapter checked before the first is padded: a refusal pads none.
    too_big = {
        f"'{record.name}' ({component}.{path}: rank {module.lora_adapters[record.name].down.shape[0]})": None
        for record in registry.adapters.values()
        for component, path, module in record.layers
        if hasattr(module.lora_adapters[record.name], "down") and module.lora_adapters[record.name].down.shape[0] > max_rank
    }
    if too_big:
        raise LoraError(f"prepare_hotswap: adapter(s) {', '.join(list(too_big)[:5])} are above max_rank={max_rank}; nothing was padded")
    for record in registry.adapters.values():
        _pad_for_hotswap(registry, record, max_rank)


def _pad_for_hotswap(registry, record, max_rank: int) -> None:
    for _, _, module in record.layers:
        adapter = module.lora_adapters[record.name]
        if hasattr(adapter, "down"):  # LyCORIS kinds swap only into factors of the same shapes
            hotswap.pad_adapter(adapter, max_rank)
        module.drop_lora_cache()  # the padded factors are new tensors
    registry.push()
