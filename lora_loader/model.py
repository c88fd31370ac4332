"""transformers models and any torch.nn.Module: the whole model is one component, "model".

On top of the shared calls, the PEFT-style names transformers users know:
`load_adapter`, `add_adapter`, `set_adapter`, `disable_adapters`,
`enable_adapters`, `active_adapters`, `get_adapter_state_dict`, `save_adapter`,
`print_trainable_parameters`, and mixed batches (``adapter_names=`` per row).
They all go through the same core as pipelines: formats -> plan -> apply ->
registry -> layers.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import re

import torch
from torch import nn

from . import inject, offload
from .adapters import AdapterRecord, ComponentWeight
from .algorithms import dora
from .algorithms.lora import low_rank_product
from .config import LoraConfig
from .delta import LoraDelta
from .errors import LoraError, LoraFileError, LoraNameError
from .formats import ConvertedLora
from .formats.diffusers import saved_module_matches
from .host import _REGISTRY, COMPONENT_NAME, LoadReport, LoraHost, LoraLifecycle, block_or_number, call_scale, scale_from_kwargs
from .param_layer import ParamAdapter, ParamDelta, parameter_layout, targeted_parameters
from .layers import (
    BASE, LORA_LAYER_TYPES, MIXED_BATCH, BiasLayer, LoraLayer, NormWeightLayer, ParamDiffLayer, SavedCopyLayer, dense_base_weight, dense_weight_shape, layer_type_of,
)

MODEL = "model"
PEFT_PREFIX = "base_model.model."
# PEFT's COMMON_LAYERS_PATTERN, for layers_to_transform without layers_pattern.
_COMMON_LAYERS = ("layers", "h", "block", "blocks", "layer")


class LoraModelMixin(LoraHost, LoraLifecycle):
    """LoRA calls for a single model (a transformers ``PreTrainedModel``, a diffusers UNet, any ``nn.Module``).

    >>> import torch, lora_loader
    >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    >>> model.add_adapter(lora_loader.LoraConfig(r=2, target_modules=["0"]), adapter_name="mine")
    >>> model.active_adapters()
    ['mine']
    """

    # -- host hooks ------------------------------------------------------------------------------------
    def _lora_component(self) -> str:
        """``"model"``, or the name this model has in the attached pipeline it belongs to (``"unet"``...)."""
        return self.__dict__.get(COMPONENT_NAME, MODEL)

    def _lora_components(self) -> dict[str, nn.Module]:
        return {self._lora_component(): self}

    def _lora_resolve_component(self, symbolic: str) -> str | None:
        # Whatever component a file names (unet., transformer., or none), it targets this model.
        return self._lora_component()

    def _lora_component_weights(self, name: str, weights: dict) -> dict[str, ComponentWeight]:
        component = self._lora_component()
        # A bare block dict ({"down": ..., "up": ...}) is what diffusers' UNet.set_adapters takes.
        if set(weights) <= {"down", "mid", "up"}:
            return {component: block_or_number(component, weights, self, name)}
        if set(weights) == {component}:
            return {component: block_or_number(component, weights[component], self, name)}
        raise LoraError(f"adapter '{name}': a model takes a number or UNet block weights, got keys {sorted(weights)}")

    # -- PEFT / transformers names ----------------------------------------------------------------------
    def load_adapter(
        self,
        peft_model_id=None,
        adapter_name: str | None = None,
        *,
        is_trainable: bool = False,
        revision: str | None = None,
        token: str | bool | None = None,
        adapter_state_dict: dict | None = None,
        peft_config: dict | LoraConfig | None = None,
        **kwargs,
    ) -> LoadReport:
        """Load a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``), as transformers does.

        ``adapter_name`` defaults to ``"default"``. With ``is_trainable=True`` its
        tensors require grad, to resume training; otherwise they are frozen.

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> model.add_adapter(lora_loader.LoraConfig(r=2, target_modules=["0"]), adapter_name="a")
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> model.save_adapter(folder, adapter_name="a")
        >>> _ = model.load_adapter(folder, adapter_name="again")
        >>> model.active_adapters()
        ['again']
        """
        for ignored in ("low_cpu_mem_usage", "hotswap", "adapter_kwargs", "load_config"):
            kwargs.pop(ignored, None)
        src = adapter_state_dict if adapter_state_dict is not None else peft_model_id
        if src is None:
            raise LoraError("load_adapter() needs a folder, a Hub repo id or adapter_state_dict=")
        if peft_config is not None and isinstance(src, dict):
            if not isinstance(peft_config, (LoraConfig, dict)) and hasattr(peft_config, "to_dict"):
                peft_config = peft_config.to_dict()  # a peft.LoraConfig, as diffusers' text-encoder loader passes
            config = peft_config if isinstance(peft_config, LoraConfig) else LoraConfig.from_dict(dict(peft_config))
            src = {k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k: v for k, v in src.items()}
            kwargs["_adapter_config"] = config.to_dict()
        name = "default" if adapter_name is None else adapter_name
        report = self.load_lora_weights(src, adapter_name=name, revision=revision, token=token, **kwargs)
        record = self._lora_registry_to_change().adapters[name]
        record.config = record.config or _config_from_record(record, self)
        if is_trainable:  # as transformers' load_adapter(is_trainable=True): only the adapter trains
            for p in self.parameters():
                p.requires_grad_(False)
        _set_trainable(record, is_trainable)
        return report

    def load_lora_adapter(
        self, pretrained_model_name_or_path_or_dict, prefix: str | None = "transformer", hotswap: bool = False, **kwargs
    ) -> LoadReport:
        """diffusers' model-level load: ``pipe.unet.load_lora_adapter(state_dict, prefix="unet", adapter_name="a")``.

        From a state dict, only the keys under ``prefix.`` are taken (all of them if none has the
        prefix); diffusers' ``network_alphas`` become ``.alpha`` keys and ``metadata`` (the LoRA config
        diffusers writes in the header) gives rank and alpha. A pipeline's component loads into its
        part of the pipeline's registry.

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> sd = {"transformer.0.lora_A.weight": torch.ones(2, 4), "transformer.0.lora_B.weight": torch.ones(4, 2)}
        >>> print(model.load_lora_adapter(sd, adapter_name="x"))
        adapter 'x' (diffusers) from <state dict>: model: 1 modules
        """
        network_alphas = kwargs.pop("network_alphas", None)
        metadata = kwargs.pop("metadata", None)
        for ignored in ("_pipeline", "low_cpu_mem_usage"):
            kwargs.pop(ignored, None)
        src = pretrained_model_name_or_path_or_dict
        if isinstance(src, dict):
            src = _under_prefix(src, prefix)
            for key, alpha in _under_prefix(dict(network_alphas or {}), prefix).items():
                src[key if key.endswith(".alpha") else key + ".alpha"] = torch.as_tensor(float(alpha))
        if metadata:
            kwargs["_adapter_config"] = dict(_under_prefix(dict(metadata), prefix) if any(
                str(k).startswith(f"{prefix}.") for k in metadata) else metadata)
        return self.load_lora_weights(src, hotswap=hotswap, **kwargs)

    def unload_lora(self) -> None:
        """diffusers' model-level unload: every adapter of this model removed (on a pipeline's component,
        that component's parts only).

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> model.add_adapter(lora_loader.LoraConfig(r=2, target_modules=["0"]), adapter_name="a")
        >>> model.unload_lora()
        >>> type(model[0]) is torch.nn.Linear
        True
        """
        self.unload_lora_weights()

    def delete_adapter(self, adapter_names) -> None:
        """transformers' name for `delete_adapters`.

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> model.add_adapter(lora_loader.LoraConfig(r=2, target_modules=["0"]), adapter_name="a")
        >>> model.delete_adapter("a")
        >>> model.get_list_adapters()
        {}
        """
        self.delete_adapters(adapter_names)

    def add_adapter(self, adapter_config: LoraConfig | dict, adapter_name: str = "default") -> None:
        """Add a fresh trainable adapter with PEFT's initialisation; the base is frozen and it becomes the active one.

        ``target_modules``: suffixes (``["q_proj", "v_proj"]``), a regex matched
        against the full module name, or ``"all-linear"``. Also honoured:
        ``exclude_modules``, ``layers_to_transform`` / ``layers_pattern``,
        ``rank_pattern`` / ``alpha_pattern``, ``use_rslora``, ``use_dora``,
        ``lora_dropout``, ``modules_to_save``, ``bias``, ``lora_bias``, ``init_lora_weights``
        (True, False, ``"gaussian"``), and ``target_parameters`` (LoRA on parameters such as MoE
        experts' ``mlp.experts.gate_up_proj``, as PEFT's ``ParamWrapper``).

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> model.add_adapter(lora_loader.LoraConfig(r=2, target_modules=["0"]), adapter_name="a")
        >>> model.active_adapters(), [n for n, p in model.named_parameters() if p.requires_grad]
        (['a'], ['0.lora_adapters.a.down', '0.lora_adapters.a.up'])
        """
        registry = self._lora_registry_to_read()
        registry.check_new_name(adapter_name, self._lora_scope())
        config = _as_config(adapter_config)
        config.check_creatable()
        targets = _find_targets(self, config)
        parameters = _find_parameter_targets(self, config, {name for name, _ in targets})
        converted = ConvertedLora(formats=["new"])
        tensors: dict[str, torch.Tensor] = {}
        component = self._lora_component()
        for name, module in targets:
            delta = _initial_delta(module, config, name)
            converted.deltas[(component, name)] = delta
        for name, (module, params) in parameters.items():
            for param in params:
                converted.deltas[(component, f"{name}.{param}")] = _initial_parameter_delta(module, config, name, param)
        for name in _find_saved_modules(self, config):
            module = self.get_submodule(name)
            params = {}
            for param, tensor in module.state_dict().items():
                tensors[f"{name}.{param}"] = tensor
                params[param] = f"{name}.{param}"
            converted.module_copies[(component, name)] = params
        if config.bias == "all":  # every other bias trains too, as a delta on top of the frozen base bias
            taken = {n for n, _ in targets} | {n for (_, n) in converted.module_copies}
            for name, module in self.named_modules():
                inside = any(name == t or name.startswith(t + ".") for t in taken)
                if name and not inside and isinstance(getattr(module, "bias", None), nn.Parameter):
                    if ".lora_" in f".{name}":
                        continue
                    tensors[f"{name}.bias"] = offload.real_tensor(module, "bias").detach().clone()
                    converted.module_biases[(component, name)] = f"{name}.bias"
        planned = inject.plan(converted, self._lora_components(), self._lora_resolve_component, "add_adapter", tensors)
        trainable = [p for p in self.parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        try:
            layers, copies = inject.apply(planned, adapter_name)
        except BaseException:
            for p in trainable:  # apply rolled its own changes back; the base's flags come back too
                p.requires_grad_(True)
            raise
        record = AdapterRecord(adapter_name, "new", "add_adapter", layers, [], copies, config)
        self._lora_registry_to_change().add(record)
        _set_trainable(record, True)
        self.set_adapter(adapter_name)
        # transformers 5 renamed is_gradient_checkpointing (the old name warns).
        checkpointing = getattr(self, "is_activation_checkpointing", None)
        if checkpointing is None:
            checkpointing = getattr(self, "is_gradient_checkpointing", False)
        if checkpointing and hasattr(self, "enable_input_require_grads"):
            self.enable_input_require_grads()

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        """``{adapter name: LoraConfig}`` of the adapters on this model, as transformers' and diffusers'
        models with peft have it (``model.peft_config["default"].to_dict()``); no attribute without one."""
        registry = self.__dict__.get(_REGISTRY)
        here = self._lora_component()
        configs = {
            name: record.config_for(here) or _config_from_record(record, self)
            for name, record in (registry.adapters.items() if registry is not None else ())
            if here in record.components()
        }
        if not configs:
            raise AttributeError(f"'{type(self).__name__}' has no adapter, so no peft_config")
        return configs

    def set_adapter(self, adapter_name) -> None:
        """Activate exactly these adapters, each with weight 1.0 (transformers' and PEFT's name).

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> model.add_adapter(lora_loader.LoraConfig(r=2, target_modules=["0"]), adapter_name="a")
        >>> model.add_adapter(lora_loader.LoraConfig(r=2, target_modules=["0"]), adapter_name="b")
        >>> model.set_adapter("a")
        >>> model.active_adapters()
        ['a']
        """
        self.set_adapters(adapter_name)

    def disable_adapters(self) -> None:
        """Bypass every adapter (transformers' name for `disable_lora`).

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> x = torch.randn(1, 4)
        >>> base = model(x)
        >>> model.add_adapter(lora_loader.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), adapter_name="a")
        >>> model.disable_adapters()
        >>> torch.equal(model(x), base)
        True
        """
        self.disable_lora()

    def enable_adapters(self) -> None:
        """Undo `disable_adapters` (transformers' name for `enable_lora`).

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> x = torch.randn(1, 4)
        >>> model.add_adapter(lora_loader.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), adapter_name="a")
        >>> with_lora = model(x)
        >>> model.disable_adapters(); model.enable_adapters()
        >>> torch.equal(model(x), with_lora)
        True
        """
        self.enable_lora()

    def active_adapters(self) -> list[str]:
        """The active adapters' names (transformers' name for `get_active_adapters`).

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> model.add_adapter(lora_loader.LoraConfig(r=2, target_modules=["0"]), adapter_name="a")
        >>> model.active_adapters(), model.active_adapter()
        (['a'], 'a')
        """
        return self.get_active_adapters()

    def active_adapter(self) -> str:
        """The first active adapter's name (transformers' deprecated singular); `LoraError` when none is."""
        active = self.get_active_adapters()
        if not active:
            raise LoraError("no adapter is active")
        return active[0]

    def get_adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors with PEFT's keys (``model.layers.0.self_attn.q_proj.lora_A.weight``), as transformers
        returns them (without the ``base_model.model.`` prefix a saved file has).

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> model.add_adapter(lora_loader.LoraConfig(r=2, target_modules=["0"]), adapter_name="a")
        >>> {k: list(v.shape) for k, v in model.get_adapter_state_dict("a").items()}
        {'0.lora_A.weight': [2, 4], '0.lora_B.weight': [4, 2]}
        """
        record = self._lora_record(adapter_name)
        out: dict[str, torch.Tensor] = {}
        here = self._lora_component()  # a pipeline's component: its own part of the adapter
        for component, path, module in record.layers:
            if component != here:
                continue
            adapter = module.lora_adapters[record.name]
            if isinstance(adapter, ParamAdapter):  # PEFT's keys: one base_layer. per parameter wrapped after this one
                order = [name for name, _ in module.named_parameters(recurse=False)]
                for nesting, delta in adapter.to_group(path).nested(order):
                    stem = path + ".base_layer" * nesting
                    out[f"{stem}.lora_A.weight"] = delta.down
                    out[f"{stem}.lora_B.weight"] = delta.up
                continue
            if not hasattr(adapter, "down"):
                raise LoraError(
                    f"adapter '{record.name}' is a {adapter.kind} adapter on {path}, which PEFT's LoRA keys cannot "
                    "hold; save it with save_lora_weights(..., format='kohya')"
                )
            # [: r]: prepare_hotswap may have zero-padded the factors beyond the adapter's rank
            down, up = adapter.down.detach()[: adapter.r], adapter.up.detach()[:, : adapter.r]
            if layer_type_of(module._lora_base_class) == "embedding":
                out[f"{path}.lora_embedding_A"] = down
                out[f"{path}.lora_embedding_B"] = up
            else:
                out[f"{path}.lora_A.weight"] = down
                out[f"{path}.lora_B.weight"] = up
            if adapter.magnitude is not None:
                out[f"{path}.lora_magnitude_vector"] = adapter.magnitude.detach()
            if adapter.up_bias is not None:  # PEFT's lora_bias=True
                out[f"{path}.lora_B.bias"] = adapter.up_bias.detach()
            if adapter.bias_delta is not None:  # PEFT's bias="lora_only": the full bias the adapter trained
                out[f"{path}.base_layer.bias"] = adapter.to_delta(offload.real_tensor(module, "bias")).bias  # PEFT's key for it
        for component, path, module in record.copies:
            if component != here:
                continue
            if isinstance(module, BiasLayer):  # bias="all": the trained bias of a module without LoRA
                base_bias = offload.real_tensor(module, "bias").detach()
                out[f"{path}.bias"] = base_bias + module.lora_biases[record.name].delta.detach().to(base_bias.device)
                continue
            if isinstance(module, NormWeightLayer):  # a Flux Control LoRA's norm scale, as diffusers keys it
                out[f"{path}.weight"] = module.lora_norms[record.name].weight.detach()
                continue
            if isinstance(module, ParamDiffLayer):
                raise LoraError(f"adapter '{record.name}' diffs the parameter {path} (e.g. Wan's diff_m), which has no "
                                "PEFT key: keep the file it was loaded from")
            for param, tensor in module.lora_copies[record.name].state_dict().items():
                out[f"{path}.{param}"] = tensor.detach()
        return out

    def save_adapter(self, save_directory: str, adapter_name: str | None = None) -> None:
        """Write PEFT's layout, ``adapter_config.json`` + ``adapter_model.safetensors``, loadable by PEFT itself.

        >>> import torch, lora_loader
        >>> model = lora_loader.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> model.add_adapter(lora_loader.LoraConfig(r=2, target_modules=["0"]), adapter_name="a")
        >>> import os, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> model.save_adapter(folder, adapter_name="a")
        >>> sorted(os.listdir(folder))
        ['adapter_config.json', 'adapter_model.safetensors']
        """
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        record = self._lora_record(adapter_name)
        config = _config_to_save(record, self)
        tensors = {PEFT_PREFIX + k: v.contiguous() for k, v in self.get_adapter_state_dict(record.name).items()}
        save_directory = os.fspath(save_directory)
        try:
            os.makedirs(save_directory, exist_ok=True)
            config.save_pretrained(save_directory)
            save_file(tensors, os.path.join(save_directory, "adapter_model.safetensors"), metadata={"format": "pt"})
        except (OSError, RuntimeError, ValueError, SafetensorError) as err:  # safetensors has its own error for an unwritable path
            raise LoraFileError(f"{save_directory}: cannot write the adapter there ({type(err).__name__}: {err})") from None

    def save_pretrained(self, save_directory, *args, **kwargs):
        """With adapters loaded, save them in PEFT's layout (as transformers does with peft); else the base model.

        The adapter named ``default`` (or the only one) goes to ``save_directory``,
        each other adapter to ``save_directory/<name>``.
        """
        registry = self._lora_registry_to_read()
        if not registry.adapters or COMPONENT_NAME in self.__dict__:
            # A pipeline's component saves its base weights (pipe.save_pretrained), as diffusers does.
            return super().save_pretrained(save_directory, *args, **kwargs)
        names = list(registry.adapters)
        root = "default" if "default" in names else (names[0] if len(names) == 1 else None)
        for name in names:
            self.save_adapter(save_directory if name == root else os.path.join(save_directory, name), name)

    def print_trainable_parameters(self) -> None:
        """``trainable params: N || all params: M || trainable%: P``, counted as PEFT counts them."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # -- mixed batches ----------------------------------------------------------------------------------
    def __call__(self, *args, adapter_names: list[str] | None = None, **kwargs):
        with call_scale(scale_from_kwargs(kwargs)):  # a UNet called with cross_attention_kwargs={"scale": s}
            if adapter_names is None:
                return super().__call__(*args, **kwargs)
            with self._lora_mixed_batch(adapter_names, _batch_size(args, kwargs)):
                return super().__call__(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """transformers' ``generate``, with ``adapter_names`` (one per row; ``"__base__"`` for none) if given."""
        if adapter_names is None:
            return super().generate(*args, **kwargs)
        with self._lora_mixed_batch(adapter_names, _batch_size(args, kwargs)):
            return super().generate(*args, **kwargs)

    @contextlib.contextmanager
    def _lora_mixed_batch(self, adapter_names, batch_size: int | None):
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise LoraNameError(f"adapter_names must be a list with one adapter name (or '{BASE}') per row, got {adapter_names!r}")
        names = list(adapter_names)
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise LoraNameError(f"adapter_names must be strings (an adapter name or '{BASE}'), got {bad}")
        self._lora_load_missing([n for n in names if n != BASE])
        registry = self._lora_registry_to_read()
        unknown = sorted({n for n in names if n != BASE and n not in registry.adapters})
        if unknown:
            raise LoraNameError(f"adapter_names name {unknown}, which are not loaded (loaded: {sorted(registry.adapters)})")
        if batch_size is not None and len(names) != batch_size:
            raise LoraError(f"adapter_names has {len(names)} entries for a batch of {batch_size} rows; expected one per row")
        if self._lora_component() in registry.disabled:  # disabled: every row is the base model, as with PEFT
            names = [BASE] * len(names)
        else:  # a fused weight is in every row: neither '__base__' nor another adapter's row could be right
            registry.refuse_fused(None, "a mixed batch (adapter_names=)")
        # Every adapter of the batch is used by it: brought home once for the whole batch (past the cap, if the
        # batch needs more), counted as just used, and the cap enforced again once the batch is done.
        used = [n for n in dict.fromkeys(names) if n != BASE]
        residency = registry.residency
        residency.bring_home(registry, used)
        residency.touch(used)
        token = MIXED_BATCH.set(names)
        try:
            yield
        finally:
            MIXED_BATCH.reset(token)
            residency.enforce(registry, registry.active)

    # -- training helpers ------------------------------------------------------------------------------
    def gradient_checkpointing_enable(self, *args, **kwargs):
        # With a frozen base, reentrant checkpointing needs inputs that require grad for the adapters to
        # get gradients (what PEFT arranges through enable_input_require_grads).
        result = super().gradient_checkpointing_enable(*args, **kwargs)
        if any(p.requires_grad for p in self.parameters()) and hasattr(self, "enable_input_require_grads"):
            self.enable_input_require_grads()
        return result

    def _lora_record(self, adapter_name: str | None) -> AdapterRecord:
        registry = self._lora_registry_to_read()
        if adapter_name is None:
            active = registry.active_in.get(self._lora_component(), [])
            if not active and not registry.adapters:
                raise LoraNameError("no adapter is loaded")
            adapter_name = active[0] if active else next(iter(registry.adapters))
        registry.check_known([adapter_name])
        return registry.adapters[adapter_name]


# -- helpers ------------------------------------------------------------------------------------------------


def _under_prefix(state_dict: dict, prefix: str | None) -> dict:
    """The entries under ``prefix.`` with it removed, as diffusers' ``load_lora_adapter`` takes them; all
    entries when none has it (a state dict already for this model)."""
    if not prefix or not any(str(k).startswith(f"{prefix}.") for k in state_dict):
        return dict(state_dict)
    return {k[len(prefix) + 1:]: v for k, v in state_dict.items() if str(k).startswith(f"{prefix}.")}


def _batch_size(args, kwargs) -> int | None:
    for value in list(args) + [kwargs.get(k) for k in ("input_ids", "inputs_embeds", "sample", "x")]:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


def _as_config(config) -> LoraConfig:
    if isinstance(config, LoraConfig):
        config.check_supported()
        return config
    if isinstance(config, dict):
        return LoraConfig.from_dict(config)
    if hasattr(config, "to_dict"):  # a peft.LoraConfig, converted by its fields
        data = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
        data["peft_type"] = str(getattr(data.get("peft_type"), "value", data.get("peft_type") or "LORA"))
        return LoraConfig.from_dict(data)
    raise LoraError(f"expected a lora_loader.LoraConfig or a dict, got {type(config).__name__}")


def _matches(targets, name: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _layer_index_ok(config: LoraConfig, name: str) -> bool:
    wanted = config.layers_to_transform
    if wanted is None:
        return True
    wanted = [wanted] if isinstance(wanted, int) else list(wanted)
    patterns = config.layers_pattern or _COMMON_LAYERS
    patterns = [patterns] if isinstance(patterns, str) else patterns
    for pattern in patterns:
        match = re.match(rf".*\.{pattern}\.(\d+)\.", name)
        if match:
            return int(match.group(1)) in wanted
    return False


def _find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    targets = config.target_modules
    if targets is None:
        if config.target_parameters:
            return []
        raise LoraError(
            "LoraConfig.target_modules is required (a list of module-name suffixes, a regex or 'all-linear'), "
            "or target_parameters (parameter names)"
        )
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for name, module in model.named_modules():
        if not name or ".lora_adapters." in f".{name}." or ".lora_copies." in f".{name}.":
            continue
        if targets == "all-linear":
            hit = layer_type_of(type(module)) in ("linear", "conv1d") and module is not output
        else:
            hit = _matches(targets, name)
        if not hit or not _layer_index_ok(config, name):
            continue
        if config.exclude_modules and _matches(config.exclude_modules, name):
            continue
        if layer_type_of(type(module) if not isinstance(module, LoraLayer) else module._lora_base_class) not in LORA_LAYER_TYPES:
            raise LoraError(
                f"target_modules matches {name}, a {type(module).__name__}; LoRA applies to Linear, Conv2d, "
                "Conv1D and Embedding"
            )
        found.append((name, module))
    if not found and not config.target_parameters:
        raise LoraError(f"target_modules={targets!r} matches no module of {type(model).__name__}")
    return found


def _find_parameter_targets(model: nn.Module, config: LoraConfig, modules: set[str]) -> dict[str, tuple[nn.Module, list[str]]]:
    """``{module path: (module, [parameter names])}`` that ``target_parameters`` matches, by PEFT's rule
    (`param_layer.targeted_parameters`); a module that ``target_modules`` also matches is a `LoraError`, as in PEFT."""
    if not config.target_parameters:
        return {}
    found = {}
    for name, module in model.named_modules():
        if not name or ".lora_adapters." in f".{name}." or ".lora_copies." in f".{name}.":
            continue
        params = targeted_parameters(module, name, config.target_parameters)
        if not params:
            continue
        if name in modules:
            raise LoraError(f"{name} is matched by target_modules and its parameters {params} by target_parameters; target it one way")
        found[name] = (module, params)
    if not found:
        raise LoraError(f"target_parameters={config.target_parameters!r} matches no parameter of {type(model).__name__}")
    return found


def _initial_parameter_delta(module: nn.Module, config: LoraConfig, name: str, param: str) -> ParamDelta:
    """PEFT's ParamWrapper initialisation: ``lora_A`` ``[r * E, in]`` kaiming-uniform (a=sqrt(5)) or N(0, 1/r)
    ('gaussian'), ``lora_B`` ``[out, r * E]`` zeros (init False: kaiming-uniform, nn.Linear's default)."""
    layout = parameter_layout(module, param)
    if isinstance(layout, str):
        raise LoraError(f"target_parameters matches {name}.{param}: {layout}")
    experts, _, in_f, out_f = layout
    r = config.rank_for(f"{name}.{param}")
    dtype = getattr(module, param).dtype
    down, up = torch.empty(r * experts, in_f, dtype=dtype), torch.empty(out_f, r * experts, dtype=dtype)
    if config.init_lora_weights == "gaussian":
        nn.init.normal_(down, std=1 / r)
    else:
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))
    if config.init_lora_weights is False:
        nn.init.kaiming_uniform_(up, a=math.sqrt(5))
    else:
        nn.init.zeros_(up)
    return ParamDelta(down, up, module=name, parameter=param, config=config, keys=(f"{name}.{param}",))


def _find_saved_modules(model: nn.Module, config: LoraConfig) -> list[str]:
    names = config.modules_to_save or []
    found = [n for n, _ in model.named_modules() if n and saved_module_matches(names, n)]
    missing = [t for t in names if not any(saved_module_matches([t], n) for n in found)]
    if missing:
        raise LoraError(f"modules_to_save names {missing}, which match no module of {type(model).__name__}")
    return found


def _initial_delta(module: nn.Module, config: LoraConfig, name: str) -> LoraDelta:
    """PEFT's initialisation: A kaiming-uniform (a=sqrt(5)) and B zeros; 'gaussian': A ~ N(0, 1/r); False: both random."""
    kind = layer_type_of(type(module))
    weight = module.weight
    r, alpha = config.rank_for(name), config.alpha_for(name)
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32  # fp32 adapters on a quantized base
    out_f, in_f, *kernel = dense_weight_shape(module)
    down, up = torch.empty(r, in_f, *kernel, dtype=dtype), torch.empty(out_f, r, *[1 for _ in kernel], dtype=dtype)
    init = config.init_lora_weights
    if kind == "embedding":
        if init is False:
            nn.init.normal_(down)
            nn.init.normal_(up)
        else:
            nn.init.zeros_(down)
            nn.init.normal_(up)
    else:
        if init == "gaussian":
            nn.init.normal_(down, std=1 / r)
        else:
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(up, a=math.sqrt(5))
        else:
            nn.init.zeros_(up)
    magnitude = None
    if config.use_dora:
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        base = dense_base_weight(module).detach().float()
        combined = base.flatten(1) + scale * low_rank_product(up.float(), down.float()).flatten(1)
        magnitude = dora.weight_norm(combined).reshape(-1).to(dtype)  # DoRA starts at the base weight exactly
    bias = None
    if config.bias != "none" and getattr(module, "bias", None) is not None:
        bias = offload.real_tensor(module, "bias").detach().clone()  # starts equal to the base bias: the trainable delta starts at zero
    up_bias = None
    if config.lora_bias:  # PEFT's lora_B.bias: zeros, or with init False nn.Linear's default (uniform, bound 1/sqrt(r))
        if kind == "embedding":
            raise LoraError(f"lora_bias=True on {name}, an Embedding: PEFT defines no lora_B bias for embeddings")
        up_bias = torch.zeros(out_f, dtype=dtype)
        if init is False:
            nn.init.uniform_(up_bias, -1 / math.sqrt(r), 1 / math.sqrt(r))
    return LoraDelta(
        down, up, float(alpha), config.use_rslora, keys=(name,), magnitude=magnitude, dropout=config.lora_dropout, bias=bias,
        up_bias=up_bias,
    )


def _holds_submodule_tensors(module: nn.Module) -> bool:
    return any(child is not None and (child._parameters or child._modules) for child in module._modules.values())


def _set_trainable(record: AdapterRecord, trainable: bool) -> None:
    for _, _, module in record.layers:
        adapter = module.lora_adapters[record.name]
        if trainable:
            adapter.widen()  # an fp16 file in an fp32 model trains in fp32
        # An adapter without submodules holding tensors keeps them all in _parameters: read there, not through
        # the generator of parameters() (a load_adapter of 154 layers spent ~2 ms in it).
        params = adapter._parameters.values() if not _holds_submodule_tensors(adapter) else adapter.parameters()
        for p in params:
            if p is not None and p.requires_grad != trainable:
                p.requires_grad_(trainable)
    for _, _, module in record.copies:
        extras = module.lora_biases if isinstance(module, BiasLayer) else (
            module.lora_norms if isinstance(module, NormWeightLayer) else (
                module.lora_params if isinstance(module, ParamDiffLayer) else module.lora_copies)
        )
        for p in extras[record.name].parameters():
            p.requires_grad_(trainable)


def _config_to_save(record: AdapterRecord, model: nn.Module) -> LoraConfig:
    """The config `save_adapter` writes: the one the adapter came with, unless its rank, alpha or scaling
    rule no longer describe the live adapter (a hotswap replaced its tensors): then those fields are
    rebuilt from the live layers, so the saved folder loads back to the same outputs."""
    live = _config_from_record(record, model)
    here = model._lora_component() if isinstance(model, LoraModelMixin) else MODEL
    own = record.config_for(here)
    # A copy: the adapter may still be training, and its own config must not read inference_mode=True.
    config = copy.deepcopy(own) if own is not None else live
    current = True
    for component, path, module in record.layers:
        if component != here:
            continue
        adapter = module.lora_adapters[record.name]
        if isinstance(adapter, ParamAdapter):  # the config must name each parameter, with its rank and alpha
            if not _describes_parameters(config, module, path, adapter):
                current = False
                break
            continue
        if not hasattr(adapter, "down"):
            continue
        if (config.rank_for(path), config.alpha_for(path)) != (adapter.rank, adapter.alpha) or bool(config.use_rslora) != adapter.use_rslora:
            current = False
            break
    if not current:
        for name in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "target_modules", "target_parameters"):
            setattr(config, name, copy.deepcopy(getattr(live, name)))
        config.layers_to_transform = config.layers_pattern = config.exclude_modules = None
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config.inference_mode = True
    return config


def _describes_parameters(config: LoraConfig, module: nn.Module, path: str, adapter: ParamAdapter) -> bool:
    """Does ``config`` target exactly ``adapter``'s parameters of ``module`` (PEFT nests keys by that set), with
    their ranks, alphas and scaling rule? (Not so for an adapter of transformers 4's per-expert modules.)"""
    targeted = targeted_parameters(module, path, config.target_parameters or [])
    if targeted != list(adapter.parts):
        return False
    return all(
        (config.rank_for(f"{path}.{name}"), config.alpha_for(f"{path}.{name}"), bool(config.use_rslora)) == (part.r, part.alpha, part.use_rslora)
        for name, part in adapter.parts.items()
    )


def _config_from_record(record: AdapterRecord, model: nn.Module) -> LoraConfig:
    """A PEFT config that reproduces a loaded adapter's part in ``model``: the common rank/alpha, patterns
    for the rest."""
    here = model._lora_component() if isinstance(model, LoraModelMixin) else MODEL
    adapters, parameters = {}, []
    for component, path, module in record.layers:
        if component != here:
            continue
        adapter = module.lora_adapters[record.name]
        if isinstance(adapter, ParamAdapter):  # rank and alpha patterns of a parameter LoRA match "<module>.<parameter>"
            for param, part in adapter.parts.items():
                adapters[f"{path}.{param}"] = part
                parameters.append(f"{path}.{param}")
        else:
            adapters[path] = adapter
    config = LoraConfig.from_deltas(
        adapters,
        who=f"adapter '{record.name}'",
        modules_to_save=sorted(path for c, path, _ in record.copies if c == here) or None,
        base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
    )
    if parameters:
        config.target_modules = [t for t in config.target_modules if t not in parameters]
        config.target_parameters = sorted(parameters)
    config.lora_bias = any(getattr(a, "up_bias", None) is not None for a in adapters.values())
    return config
