"""Plan, then apply: a load is a transaction.

`plan` matches every delta of a converted file to a live module and checks
every shape without touching the model; anything that does not fit is raised
(or, with ``strict=False``, skipped and reported) before a single module is
wrapped. `apply` then wraps and assigns, and rolls back everything it did if
anything fails midway.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import offload, widen
from .algorithms.dora import dora_problem
from .delta import FactorDelta, LoraDelta
from .errors import LoraError, LoraFormatError, LoraShapeError, LoraTargetError, LoraWarning
from .formats import ConvertedLora
from .formats.original_names import for_model
from .layers import (
    LORA_LAYER_TYPES,
    NORM_TYPES,
    BiasLayer,
    LoraAdapter,
    LoraLayer,
    NormWeightLayer,
    ParamDiffLayer,
    SavedCopyLayer,
    adapter_from_delta,
    bias_adapter,
    dense_weight_shape,
    make_saved_copy,
    norm_weight,
    layer_type,
    param_diff,
    unwrap,
    unwrap_bias,
    unwrap_norm,
    unwrap_param,
    unwrap_saved_copy,
    wrap,
    wrap_bias,
    wrap_norm,
    wrap_param,
    wrap_saved_copy,
)
from .names import ModuleIndex
from .param_layer import LoraParamMixin, ParamDelta, ParamGroup, param_adapter, renamed, resolve, restack_per_expert, wrap_params


@dataclass
class PlannedModule:
    component: str
    path: str
    module: nn.Module
    delta: LoraDelta
    # Flux Control LoRAs: (component root, config attribute, in_features) when the module is to be widened first.
    widen: tuple | None = None


@dataclass
class PlannedCopy:
    component: str
    path: str
    module: nn.Module
    tensors: dict  # parameter name -> tensor of the full copy (PEFT's modules_to_save)


@dataclass
class PlannedBias:
    component: str
    path: str
    module: nn.Module
    bias: torch.Tensor  # the adapter's full bias for a module without LoRA (PEFT's bias="all")


@dataclass
class PlannedNorm:
    component: str
    path: str
    module: nn.Module
    weight: torch.Tensor  # the adapter's full replacement of the module's weight (Flux Control LoRAs' norms)


@dataclass
class PlannedParam:
    component: str
    path: str  # the parameter's path (``blocks.0.scale_shift_table``)
    module: nn.Module  # the module that owns it
    param: str  # its name there
    diff: torch.Tensor  # a full diff of it (LightX2V's diff_m), added with the blend weight


# Why a key of a file is not applied. Callers test these codes, never the messages.
UNKNOWN_KEY = "unknown-key"  # no converter could use it (the converter says why)
INVALID_TENSOR = "invalid-tensor"  # a NaN, an integer factor, a rank 0: never skipped as "all zero"
NO_COMPONENT = "no-component"  # targets a component the model does not have
NO_MODULE = "no-module"  # names no module of its component
UNSUPPORTED_MODULE = "unsupported-module"  # a module no adapter applies to
DOES_NOT_FIT = "does-not-fit"  # shapes, or a part that clashes with another part of the file
BASE_WEIGHT_DIFFERS = "base-weight-differs"  # a saved base weight unlike the model's
NOTHING_TO_APPLY = "nothing-to-apply"  # an alpha with no LoRA pair
TARGET_CODES = frozenset({NO_COMPONENT, NO_MODULE, UNSUPPORTED_MODULE})


@dataclass
class Unapplied:
    key: str
    code: str  # one of the codes above
    why: str  # for people


@dataclass
class Plan:
    modules: list[PlannedModule] = field(default_factory=list)
    copies: list[PlannedCopy] = field(default_factory=list)
    biases: list[PlannedBias] = field(default_factory=list)
    norms: list[PlannedNorm] = field(default_factory=list)
    params: list[PlannedParam] = field(default_factory=list)
    unapplied: dict[str, Unapplied] = field(default_factory=dict)  # every key not applied, with its reason
    skipped: list[str] = field(default_factory=list)  # keys not applied (all-zero, or strict=False)


def _shape(t) -> list[int]:
    return list(t.shape)


def factor_delta_problem(delta, module: nn.Module) -> str | None:
    """Why a LyCORIS-kind delta cannot apply to ``module``: its dense shape must be the weight's."""
    weight_shape = dense_weight_shape(module)
    what = f"{type(module).__name__} with weight [out, in, ...] = {list(weight_shape)}"
    is_norm = layer_type(module) in NORM_TYPES
    if is_norm and delta.kind not in ("norm", "full"):
        return f"module is a {type(module).__name__}: only norm (w_norm/b_norm) and full (diff/diff_b) diffs apply to norms"
    if is_norm and delta.dora_scale is not None:
        return f"module is a {type(module).__name__}: dora_scale applies to weight matrices, not norms"
    if layer_type(module) in ("conv2d", "conv3d") and module.groups != 1:
        return f"Conv2d with groups={module.groups}; {delta.algorithm.title} supports groups=1 only"
    if delta.rows is not None and delta.algorithm.uses_base_weight:
        return (f"the {delta.algorithm.title} delta is made from the whole fused projection's weight, which this model "
                "splits into several modules (not supported)")
    shape = delta.dense_shape()
    if shape is None and (delta.kind != "full" or "diff" in delta.factors):
        factors = ", ".join(f"{k} {_shape(v)}" for k, v in delta.factors.items())
        return f"the {delta.algorithm.title} factors do not chain ({factors})"
    if shape is not None:
        # (out,): an algorithm that transforms the base weight's rows (OFT) fixes only their count
        rows_only = len(shape) == 1 and delta.algorithm.uses_base_weight
        same = shape[0] == weight_shape[0] if rows_only else tuple(shape) == weight_shape if len(shape) != 2 or len(weight_shape) < 2 else (
            shape[0] == weight_shape[0] and shape[1] == math.prod(weight_shape[1:])
        )
        if not same:
            return f"module is {what}: the {delta.algorithm.title} delta is {list(shape)}"
    bias = delta.factors.get("diff_b")
    if bias is not None:
        base_bias = getattr(module, "bias", None)
        if base_bias is None or tuple(base_bias.shape) != tuple(bias.shape):
            return f"module is {what}: diff_b is {_shape(bias)}, the module's bias is {None if base_bias is None else _shape(base_bias)}"
    if delta.dora_scale is not None:
        return dora_problem(delta.dora_scale, weight_shape)
    return None


def shape_problem(delta: LoraDelta, module: nn.Module) -> str | None:
    """Why ``delta`` cannot apply to ``module``, or None if it fits."""
    if not isinstance(delta, LoraDelta):
        return factor_delta_problem(delta, module)
    if layer_type(module) not in LORA_LAYER_TYPES:
        return f"module is a {type(module).__name__}: LoRA factors apply to Linear, Conv2d, Conv1D and Embedding"
    down, up = delta.down, delta.up
    kind = layer_type(module)
    weight_shape = dense_weight_shape(module)  # [out, in, ...] whatever the storage (transposed, quantized)
    if down.dim() not in (2, 4) or up.dim() not in (2, 4):
        return f"lora_down is {_shape(down)} and lora_up is {_shape(up)}; expected 2-D or 4-D tensors"
    rank = down.shape[0]
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        return f"lora_up is {_shape(up)}; expected a 1x1 kernel [out, r, 1, 1]"
    if kind in ("linear", "conv1d", "embedding"):
        out_f, in_f = weight_shape
        if kind == "linear":
            what = f"Linear {in_f}->{out_f}"
        elif kind == "conv1d":
            what = f"Conv1D {in_f}->{out_f}"
        else:  # [num_embeddings, dim]; down is looked up by token id
            what = f"Embedding {in_f}x{out_f}"
        expect_down, expect_up = f"[r, {in_f}]", f"[{out_f}, r]"
        fits = (
            (down.dim() == 2 or tuple(down.shape[2:]) == (1, 1))
            and down.shape[1] == in_f
            and up.shape[0] == out_f
            and up.shape[1] == rank
        )
    else:
        out_c, in_c, kh, kw = weight_shape
        if module.groups != 1:
            return f"Conv2d with groups={module.groups}; LoRA supports groups=1 only"
        expect_down, expect_up = f"[r, {in_c}, {kh}, {kw}]", f"[{out_c}, r, 1, 1]"
        down_ok = (down.dim() == 4 and tuple(down.shape[1:]) == (in_c, kh, kw)) or (
            down.dim() == 2 and (kh, kw) == (1, 1) and down.shape[1] == in_c
        )
        fits = down_ok and up.shape[0] == out_c and up.shape[1] == rank
        what = f"Conv2d {in_c}->{out_c} {kh}x{kw}"
    if fits and delta.bias is not None:
        base_bias = getattr(module, "bias", None)
        if base_bias is None:
            return f"module is {what} without a bias, but the adapter carries one ({_shape(delta.bias)})"
        if tuple(delta.bias.shape) != tuple(base_bias.shape):
            return f"module is {what}: the adapter's bias is {_shape(delta.bias)}, expected {_shape(base_bias)}"
    if fits and delta.up_bias is not None:
        out_features = weight_shape[0]
        if delta.up_bias.dim() != 1 or delta.up_bias.shape[0] != out_features:
            return f"module is {what}: lora_B.bias is {_shape(delta.up_bias)}, expected [{out_features}]"
        if delta.magnitude is not None:
            return f"module is {what}: DoRA with a lora_B.bias is not supported"
    if fits and delta.magnitude is not None:
        if kind == "conv2d":
            return f"module is {what}: DoRA (a magnitude vector) on Conv2d is not supported yet"
        out_features = weight_shape[0]
        if delta.magnitude.numel() != out_features:
            return f"module is {what}: DoRA magnitude is {_shape(delta.magnitude)}, expected [{out_features}]"
    if fits:
        return None
    return (
        f"module is {what}: lora_down is {_shape(down)}, expected {expect_down}; "
        f"lora_up is {_shape(up)}, expected {expect_up}"
    )


def _once_per_name(resolve_component: Callable[[str], str | None]) -> Callable[[str], str | None]:
    """``resolve_component`` asked once per symbolic name: a plan asks it for every part (a pipeline's answer
    looks its components up, a diffusers ``__getattr__`` per name), and nothing changes them while it plans."""
    answers: dict[str, str | None] = {}

    def resolve(symbolic: str) -> str | None:
        if symbolic not in answers:
            answers[symbolic] = resolve_component(symbolic)
        return answers[symbolic]

    return resolve


def plan(
    converted: ConvertedLora,
    components: dict[str, nn.Module],
    resolve_component: Callable[[str], str | None],
    source_name: str,
    tensors: dict,
    strict: bool = True,
) -> Plan:
    """Match and shape-check every delta; raise (or skip, if not strict) what does not fit. Touches nothing.

    One walk over the file's parts (LoRA deltas, then module copies, biases, norm weights and
    saved base weights); each part's handler plans it or refuses it with a reason code.
    """
    resolve_component = _once_per_name(resolve_component)
    # A file that several families read alike (names and widths) but map differently: the live model's family reads it.
    converted = for_model(converted, components, resolve_component)
    walk = _Walk(components, resolve_component, tensors)
    result = Plan()
    for key, why in converted.unknown.items():
        result.unapplied[key] = Unapplied(key, UNKNOWN_KEY, why)
    for key, why in converted.invalid.items():
        result.unapplied[key] = Unapplied(key, INVALID_TENSOR, why)
    shape_errors: list[str] = []
    # An adapter of transformers 4's per-expert modules on transformers 5's stacked experts: one delta per parameter.
    deltas = restack_per_expert(converted.deltas, walk.locate, components)
    parts = (  # (the file's parts, their handler, where what it plans goes)
        (deltas.items(), walk.lora_delta, result.modules),
        (converted.module_copies.items(), walk.module_copy, result.copies),
        (converted.module_biases.items(), walk.module_bias, result.biases),
        (converted.norm_weights.items(), walk.norm_weight, result.norms),
        (converted.base_weights.items(), walk.base_weight, None),
    )
    for items, handler, planned in parts:
        for target, part in items:
            outcome = handler(target, part)
            if isinstance(outcome, _Refusal):
                for key in outcome.keys:
                    result.unapplied[key] = Unapplied(key, outcome.code, outcome.why)
                if strict and outcome.error is not None:
                    shape_errors.append(outcome.error)
            elif isinstance(outcome, PlannedParam):  # a delta on a bare parameter, not a module
                result.params.append(outcome)
            elif outcome is not None:
                planned.append(outcome)
                walk.claimed[type(outcome)].add((outcome.component, outcome.path))
        if planned is result.modules:
            _refuse_twice_named(result.modules, source_name)
            _refuse_twice_named_params(result.params, source_name)
    if shape_errors:
        more = f" ({len(shape_errors) - 1} more modules do not fit)" if len(shape_errors) > 1 else ""
        raise LoraShapeError(
            f"{source_name}: {shape_errors[0]}{more}. Is this LoRA made for another base model "
            f"(e.g. SDXL vs SD 1.5)? Nothing was loaded."
        )
    for key in converted.ignored:
        result.unapplied[key] = Unapplied(key, NOTHING_TO_APPLY, "an alpha with no LoRA pair")
    _report_unapplied(result, converted, source_name, tensors, strict)
    return result


def _report_unapplied(result: Plan, converted: ConvertedLora, source_name: str, tensors: dict, strict: bool) -> None:
    """Raise for keys that would change the model and cannot be applied (unless not strict); warn about
    and record as skipped those that change nothing (all-zero tensors, alphas without a pair)."""
    zero, nonzero = [], []
    for u in result.unapplied.values():
        harmless = u.code == NOTHING_TO_APPLY or (u.code != INVALID_TENSOR and _is_zero(tensors.get(u.key)))
        (zero if harmless else nonzero).append(u)
    if nonzero and strict:
        lines = "\n".join(f"  {u.key}: {u.why}" for u in nonzero[:20])
        more = f"\n  ... and {len(nonzero) - 20} more" if len(nonzero) > 20 else ""
        error = LoraTargetError if all(u.code in TARGET_CODES for u in nonzero) else LoraFormatError
        raise error(
            f"{source_name}: {len(nonzero)} key(s) with non-zero tensors cannot be applied:\n{lines}{more}\n"
            "Nothing was loaded. Pass strict=False to load the rest and skip these."
        )
    if zero:
        warnings.warn(
            f"{source_name}: skipped {len(zero)} key(s) that change nothing and apply to nothing "
            "(all-zero tensors, alphas without a LoRA pair): " + ", ".join(u.key for u in zero[:20]),
            LoraWarning,
            stacklevel=4,
        )
        result.skipped.extend(u.key for u in zero)
    if nonzero:  # not strict
        warnings.warn(
            f"{source_name}: strict=False, skipped {len(nonzero)} key(s) that cannot be applied: "
            + "; ".join(f"{u.key} ({u.why})" for u in nonzero[:20]),
            LoraWarning,
            stacklevel=4,
        )
        result.skipped.extend(u.key for u in nonzero)
    if not result.modules and not result.copies and not result.biases and not result.norms and not result.params:
        raise LoraFormatError(
            f"{source_name}: no module of this model matched any LoRA in the file "
            f"(format detected: {converted.format}). Nothing was loaded."
        )


@dataclass
class _Refusal:
    """A part of the file that cannot be applied: its keys, the reason, and the error it is when strict."""

    keys: tuple[str, ...]
    code: str
    why: str
    error: str | None = None  # a strict load raises LoraShapeError with it; None: reported with the other keys


class _Walk:
    """The handlers of `plan`'s walk: each takes one part of the file and returns what to plan,
    a `_Refusal`, or None (nothing to do). Parts are walked in order, so a later part sees the
    modules the earlier ones claimed."""

    def __init__(self, components: dict[str, nn.Module], resolve_component: Callable, tensors: dict):
        self.components, self.resolve_component, self.tensors = components, resolve_component, tensors
        self.indexes: dict[str, ModuleIndex] = {}
        self.claimed: dict[type, set] = {PlannedModule: set(), PlannedCopy: set(), PlannedBias: set(), PlannedNorm: set()}
        self.param_groups: dict[tuple[str, str], ParamGroup] = {}  # (component, path) -> the parameter LoRAs planned there

    def locate(self, symbolic: str, name: str) -> tuple[str | None, str | None, nn.Module | None]:
        """(component, path, module) a part targets; path and module None when it names no module of the model."""
        component = self.resolve_component(symbolic)
        index = _index(self.indexes, self.components, component)
        path = _lookup(index, symbolic, name) if index else None
        return component, path, (index.modules[path] if path is not None else None)

    def _claimed_by(self, where, *kinds) -> bool:
        return any(where in self.claimed[kind] for kind in kinds)

    def lora_delta(self, target: tuple[str, str], delta) -> PlannedModule | _Refusal | None:
        symbolic, name = target
        component = self.resolve_component(symbolic)
        if component is None:
            why = f"targets component '{symbolic}', which is not in this model ({sorted(self.components)})"
            return _Refusal(delta.keys, NO_COMPONENT, why)
        if isinstance(delta, ParamDelta):
            name = delta.module
        _, path, module = self.locate(symbolic, name)
        if path is None and renamed(self.components[component], name) is not None:
            _, path, module = self.locate(symbolic, renamed(self.components[component], name))  # Mixtral's block_sparse_moe
        if path is None:
            owned = self.parameter(component, symbolic, name)
            if owned is not None:
                return _param_plan(component, name, *owned, delta)
            return _Refusal(delta.keys, NO_MODULE, f"targets no module of {component} (looked for '{name}')")
        if type(delta) is LoraDelta and layer_type(module) is None and _is_weight_lora(delta, module):
            # A router that was an nn.Linear (transformers 4) and reads its own weight now: the LoRA goes on that
            # parameter, as peft converts it (Mixtral's and Qwen3-MoE's "gate" -> "gate.weight").
            delta = ParamDelta(delta.down, delta.up, module=name, parameter="weight", keys=delta.keys, alpha=delta.alpha,
                               use_rslora=delta.use_rslora)
        if isinstance(delta, ParamDelta):
            resolved = resolve(delta, module, path)
            if isinstance(resolved, str):
                return _Refusal(delta.keys, DOES_NOT_FIT, f"does not fit {component}.{path}: {resolved}",
                                None if delta.is_all_zero() else f"'{delta.keys[0]}' does not fit {component}.{path}: {resolved}")
            if isinstance(resolved, ParamDelta):
                return self.parameter_delta(component, path, module, resolved)
            delta = resolved  # a target_modules LoRA of a config that also has target_parameters
        if isinstance(module, LoraParamMixin):
            why = f"{component}.{path} carries LoRAs on its parameters (target_parameters); a LoRA on the module cannot join them"
            return _Refusal(delta.keys, DOES_NOT_FIT, why, f"'{delta.keys[0]}' does not fit: {why}")
        if layer_type(module) is None:
            why = f"targets {component}.{path}, a {type(module).__name__}; LoRA applies to Linear, Conv2d, Conv1D and Embedding"
            return _Refusal(delta.keys, UNSUPPORTED_MODULE, why)
        delta, widening, problem = _fit_input_width(delta, self.components[component], path, module)
        if problem is None:
            problem = shape_problem(delta, module if widening is None else _widened_shape(module, widening[2]))
        if problem is not None:
            error = None if delta.is_all_zero() else f"'{delta.keys[0]}' does not fit {component}.{path}: {problem}"
            return _Refusal(delta.keys, DOES_NOT_FIT, f"does not fit {component}.{path}: {problem}", error)
        return PlannedModule(component, path, module, delta, widening)

    def parameter(self, component: str, symbolic: str, name: str) -> tuple[nn.Module, str] | None:
        """``(owner, parameter name)`` when ``name`` is the dotted path of a bare parameter of ``component``
        (Wan's ``blocks.0.scale_shift_table``, or ``scale_shift_table`` of the model itself), else None."""
        owner_path, _, param = name.rpartition(".")
        if owner_path:
            index = _index(self.indexes, self.components, component)
            path = _lookup(index, symbolic, owner_path)
            owner = index.modules[path] if path is not None else None
        else:
            owner = self.components[component]
        if owner is None or not isinstance(owner._parameters.get(param), torch.Tensor):
            return None
        # A layer's weight and bias take module deltas (diff, diff_b); one wrapping per module.
        if layer_type(owner) is not None or isinstance(owner, (LoraLayer, SavedCopyLayer, BiasLayer, NormWeightLayer)):
            return None
        return owner, param

    def parameter_delta(self, component: str, path: str, module: nn.Module, delta: ParamDelta) -> PlannedModule | _Refusal | None:
        """A resolved parameter LoRA joins its module's `ParamGroup`: the first plans the module, the others add to it."""
        if isinstance(module, LoraLayer) and not isinstance(module, LoraParamMixin):
            why = f"{component}.{path} carries a LoRA on the module; a LoRA on its parameter {delta.parameter} cannot join it"
            return _Refusal(delta.keys, DOES_NOT_FIT, why, f"'{delta.keys[0]}' does not fit: {why}")
        group = self.param_groups.get((component, path))
        if group is None:
            group = self.param_groups[(component, path)] = ParamGroup({delta.parameter: delta})
            return PlannedModule(component, path, module, group)
        if delta.parameter in group.parts:
            why = f"{component}.{path}.{delta.parameter} is named twice, by '{group.parts[delta.parameter].keys[0]}' and '{delta.keys[0]}'"
            return _Refusal(delta.keys, DOES_NOT_FIT, why, why)
        group.parts[delta.parameter] = delta
        return None

    def module_copy(self, target: tuple[str, str], params: dict[str, str]) -> PlannedCopy | _Refusal:
        component, path, module = self.locate(*target)
        keys = tuple(params.values())
        if path is None:
            return _Refusal(keys, NO_MODULE, f"a modules_to_save copy of '{target[1]}', which is no module of this model")
        problem = _copy_problem(module, params, self.tensors, self._claimed_by((component, path), PlannedModule))
        if problem is not None:
            return _Refusal(keys, DOES_NOT_FIT, f"does not fit {component}.{path}: {problem}", f"'{keys[0]}' does not fit {component}.{path}: {problem}")
        return PlannedCopy(component, path, module, {p: self.tensors[k] for p, k in params.items()})

    def module_bias(self, target: tuple[str, str], key: str) -> PlannedBias | _Refusal:
        component, path, module = self.locate(*target)
        if path is None:
            return _Refusal((key,), NO_MODULE, f"the bias of '{target[1]}', which is no module of this model")
        tensor, base_bias = self.tensors[key], getattr(module, "bias", None)
        if not isinstance(base_bias, torch.Tensor) or tuple(base_bias.shape) != tuple(tensor.shape):
            what = "has no bias" if not isinstance(base_bias, torch.Tensor) else f"has a bias of {_shape(base_bias)}"
            problem = f"{component}.{path} {what}; the adapter's is {_shape(tensor)}"
        elif self._claimed_by((component, path), PlannedModule, PlannedCopy) or isinstance(module, (LoraLayer, SavedCopyLayer)):
            problem = f"{component}.{path} carries LoRA or a full copy; its bias belongs with that"
        else:
            return PlannedBias(component, path, module, tensor)
        return _Refusal((key,), DOES_NOT_FIT, problem, f"'{key}' does not fit: {problem}")

    def norm_weight(self, target: tuple[str, str], key: str) -> PlannedNorm | _Refusal:
        component, path, module = self.locate(*target)
        if path is None:
            return _Refusal((key,), NO_MODULE, f"a norm weight for '{target[1]}', which is no module of this model")
        tensor = self.tensors[key]
        own = offload.real_tensor(module, "weight") if isinstance(getattr(module, "weight", None), torch.Tensor) else None
        if own is None:
            problem = f"{component}.{path} has no weight for the adapter's norm weight to replace (expected a norm with a weight)"
        elif tuple(own.shape) != tuple(tensor.shape):
            problem = f"the adapter's norm weight is {_shape(tensor)}, expected {_shape(own)} as {component}.{path}'s weight"
        elif self._claimed_by((component, path), PlannedModule, PlannedCopy) or isinstance(
            module, (LoraLayer, SavedCopyLayer, BiasLayer)
        ):
            problem = f"{component}.{path} carries LoRA, a full copy or a bias; a norm weight cannot replace its weight"
        else:
            return PlannedNorm(component, path, module, tensor)
        return _Refusal((key,), DOES_NOT_FIT, problem, f"'{key}' does not fit: {problem}")

    def base_weight(self, key: str, target: tuple[str, str, str]) -> _Refusal | None:
        """PEFT saves the unchanged base embedding beside its LoRA: nothing to apply when it equals the model's."""
        symbolic, name, param = target
        component, path, module = self.locate(symbolic, name)
        live = offload.real_tensor(module, param) if module is not None else None
        tensor = self.tensors[key]
        if live is None or tuple(live.shape) != tuple(tensor.shape):
            return _Refusal((key,), NO_MODULE, f"a base weight for '{name}', which does not match any weight of this model")
        if not torch.equal(tensor.to(device=live.device, dtype=live.dtype), live.detach()):
            why = (f"a base weight for {component}.{path} that differs from the model's own "
                   "(a resized vocabulary?); lora_loader never overwrites base weights")
            return _Refusal((key,), BASE_WEIGHT_DIFFERS, why)
        return None


def _param_plan(component: str, name: str, owner: nn.Module, param: str, delta) -> PlannedParam | _Refusal:
    """A delta on a bare parameter: only a full diff of it (``diff``, shaped as the parameter) applies."""
    own = offload.real_tensor(owner, param)
    diff = delta.factors.get("diff") if isinstance(delta, FactorDelta) and delta.kind == "full" else None
    if diff is None or set(delta.factors) != {"diff"} or delta.dora_scale is not None or delta.rows is not None:
        why = f"targets {component}.{name}, a parameter of a {type(owner).__name__}, not a module: only a full diff (diff, diff_m) applies to it"
        return _Refusal(delta.keys, UNSUPPORTED_MODULE, why)
    if tuple(diff.shape) != tuple(own.shape):
        problem = f"the diff is {_shape(diff)}, the parameter is {_shape(own)}"
        error = None if delta.is_all_zero() else f"'{delta.keys[0]}' does not fit {component}.{name}: {problem}"
        return _Refusal(delta.keys, DOES_NOT_FIT, f"does not fit {component}.{name}: {problem}", error)
    return PlannedParam(component, name, owner, param, diff)


def _refuse_twice_named_params(planned: list[PlannedParam], source_name: str) -> None:
    first: dict[tuple[int, str], PlannedParam] = {}
    for p in planned:
        seen = first.setdefault((id(p.module), p.param), p)
        if seen is not p:
            raise LoraFormatError(f"{source_name}: {p.component}.{p.path} is diffed twice, by two spellings of one parameter. "
                                  "Nothing was loaded.")

def _is_weight_lora(delta: LoraDelta, module: nn.Module) -> bool:
    """A plain LoRA pair whose product has the shape of ``module``'s own 2-D ``weight`` parameter."""
    weight = module._parameters.get("weight") if isinstance(module, nn.Module) else None
    if weight is None or weight.dim() != 2 or not weight.dtype.is_floating_point or isinstance(module, LoraLayer):
        return False
    plain = delta.magnitude is None and delta.bias is None and delta.up_bias is None
    return plain and delta.down.dim() == 2 and delta.up.dim() == 2 and delta.up.shape[0] == weight.shape[0] and delta.down.shape[1] == weight.shape[1]


def _fit_input_width(delta, root: nn.Module, path: str, module: nn.Module):
    """``(delta, widening, problem)``: a Flux Control LoRA's lora_A wider than the x_embedder plans a widening
    ``(root, config attribute, in_features)``; one narrower than an x_embedder widened so (or wide by nature, as
    FLUX.1-Fill's) gets zero columns appended, as diffusers does. Any other module keeps its width."""
    if not isinstance(delta, LoraDelta) or delta.down.dim() != 2:
        return delta, None, None
    attribute = widen.widenable(root, path, module)
    if attribute is None:
        return delta, None, None
    width, in_features = delta.down.shape[1], dense_weight_shape(module)[1]
    if width > in_features:
        problem = widen.widen_problem(module, path)
        return delta, (None if problem else (root, attribute, width)), problem
    if width < in_features:
        down = delta.down.new_zeros(delta.down.shape[0], in_features)
        down[:, :width] = delta.down
        return dataclasses.replace(delta, down=down), None, None
    return delta, None, None


def _widened_shape(module: nn.Module, in_features: int) -> nn.Module:
    """A weightless stand-in for ``module`` widened to ``in_features``, for the shape checks."""
    return nn.Linear(in_features, module.out_features, bias=module.bias is not None, device="meta")


def _refuse_twice_named(planned: list[PlannedModule], source_name: str) -> None:
    """Two deltas for one live module (a diffusers key and a Kohya key for the same layer): applying one
    would drop the other and pushing both would apply the adapter twice; either way the file is ambiguous."""
    first: dict[int, PlannedModule] = {}
    for p in planned:
        seen = first.setdefault(id(p.module), p)
        if seen is not p:
            raise LoraFormatError(
                f"{source_name}: {p.component}.{p.path} is named twice, by '{seen.delta.keys[0]}' and "
                f"'{p.delta.keys[0]}' (two spellings of one module); a file must give each module one LoRA. "
                "Nothing was loaded."
            )


def _lookup(index: ModuleIndex, symbolic: str, name: str) -> str | None:
    """The module ``name`` names; a component prefix the converter split off may be a real module name
    (GPT-2's ``transformer.h.0``), so try it joined back too."""
    path = index.lookup(name)
    if path is None and symbolic != "denoiser":
        path = index.lookup(f"{symbolic}.{name}")
    return path


def _index(indexes: dict, components: dict, component: str | None) -> ModuleIndex | None:
    if component is None:
        return None
    if component not in indexes:
        indexes[component] = ModuleIndex.cached(components[component])
    return indexes[component]


def _copy_problem(module: nn.Module, params: dict, tensors: dict, is_lora_target: bool) -> str | None:
    if is_lora_target or isinstance(module, LoraLayer):
        return "a module cannot both carry LoRA and be a modules_to_save copy"
    own = {n: t for n, t in module.state_dict().items()}
    for param, key in params.items():
        if param not in own:
            return f"the module has no tensor '{param}' (it has {sorted(own)})"
        if tuple(own[param].shape) != tuple(tensors[key].shape):
            return f"'{param}' is {list(tensors[key].shape)}, expected {list(own[param].shape)}"
    return None


def _is_zero(tensor) -> bool:
    return tensor is not None and tensor.is_floating_point() and tensor.numel() > 0 and not bool(tensor.any())


def apply(planned: Plan, adapter_name: str, copy: bool = True) -> tuple[list, list]:
    """Wrap and assign; on any failure undo every change and re-raise.

    Returns the (component, path, module) of the LoRA layers and of the modules_to_save copies.
    """
    newly_wrapped: list[nn.Module] = []
    added: list[nn.Module] = []
    copied: list[nn.Module] = []
    biased: list[nn.Module] = []
    normed: list[nn.Module] = []
    diffed: list[nn.Module] = []
    widened: list[nn.Module] = []
    try:
        for p in planned.modules:  # Flux Control LoRAs: a wider x_embedder first, then its adapter
            if p.widen is not None:
                root, attribute, in_features = p.widen
                p.module = widen.widen(root, p.path, p.module, in_features, attribute)
                widened.append(p.module)
        adapters: list[LoraAdapter] = [
            param_adapter(p.delta, p.module) if isinstance(p.delta, ParamGroup) else adapter_from_delta(p.delta, p.module, copy)
            for p in planned.modules
        ]
        copies = [make_saved_copy(c.module, c.tensors) for c in planned.copies]
        bias_adapters = [bias_adapter(b.module, b.bias) for b in planned.biases]
        norm_weights = [norm_weight(n.module, n.weight) for n in planned.norms]
        owners: dict[int, tuple[str, str, nn.Module, dict]] = {}  # one ParamDiff per module, with all its parameters
        for p in planned.params:
            owners.setdefault(id(p.module), (p.component, p.path, p.module, {}))[3][p.param] = p.diff
        param_diffs = [(c, path, m, param_diff(m, diffs)) for c, path, m, diffs in owners.values()]
        for p, adapter in zip(planned.modules, adapters):
            if not isinstance(p.module, LoraLayer):
                (wrap_params if isinstance(p.delta, ParamGroup) else wrap)(p.module)
                newly_wrapped.append(p.module)
            p.module.lora_adapters[adapter_name] = adapter
            added.append(p.module)
        for c, copy in zip(planned.copies, copies):
            if not isinstance(c.module, SavedCopyLayer):
                wrap_saved_copy(c.module)
                newly_wrapped.append(c.module)
            c.module.lora_copies[adapter_name] = copy
            copied.append(c.module)
        for b, adapter in zip(planned.biases, bias_adapters):
            if not isinstance(b.module, BiasLayer):
                wrap_bias(b.module)
                newly_wrapped.append(b.module)
            b.module.lora_biases[adapter_name] = adapter
            biased.append(b.module)
        for n, weight in zip(planned.norms, norm_weights):
            if not isinstance(n.module, NormWeightLayer):
                wrap_norm(n.module)
                newly_wrapped.append(n.module)
            n.module.lora_norms[adapter_name] = weight
            normed.append(n.module)
        for _, _, module, diff in param_diffs:
            if not isinstance(module, ParamDiffLayer):
                wrap_param(module)
                newly_wrapped.append(module)
            module.lora_params[adapter_name] = diff
            diffed.append(module)
    except BaseException as err:
        for module in added:
            if adapter_name in module.lora_adapters:
                del module.lora_adapters[adapter_name]
        for module in copied:
            if adapter_name in module.lora_copies:
                del module.lora_copies[adapter_name]
        for module in biased:
            if adapter_name in module.lora_biases:
                del module.lora_biases[adapter_name]
        for module in normed:
            if adapter_name in module.lora_norms:
                del module.lora_norms[adapter_name]
        for module in diffed:
            if adapter_name in module.lora_params:
                del module.lora_params[adapter_name]
        for module in newly_wrapped:
            unwrap(module)
            unwrap_saved_copy(module)
            unwrap_bias(module)
            unwrap_norm(module)
            unwrap_param(module)
        for module in reversed(widened):
            widen.restore(module, force=True)
        if isinstance(err, LoraError) or not isinstance(err, Exception):  # KeyboardInterrupt stays itself
            raise
        raise LoraError(f"loading adapter '{adapter_name}' failed and was rolled back: {type(err).__name__}: {err}") from err
    layers = [(p.component, p.path, p.module) for p in planned.modules]
    copies = [(c.component, c.path, c.module) for c in planned.copies]
    extras = [(b.component, b.path, b.module) for b in planned.biases] + [(n.component, n.path, n.module) for n in planned.norms]
    extras += [(component, path, module) for component, path, module, _ in param_diffs]
    return layers, copies + extras


def remove(adapter_name: str, modules) -> None:
    """Remove one adapter from these layers, copies and biases; a module left with none is unwrapped."""
    for module in modules:
        for kind, container, unwrap_kind in (
            (LoraLayer, "lora_adapters", unwrap),
            (SavedCopyLayer, "lora_copies", unwrap_saved_copy),
            (BiasLayer, "lora_biases", unwrap_bias),
            (NormWeightLayer, "lora_norms", unwrap_norm),
            (ParamDiffLayer, "lora_params", unwrap_param),
        ):
            if not isinstance(module, kind) or adapter_name not in getattr(module, container):
                continue
            module.drop_lora_adapter(adapter_name)  # the registry's push() refreshes what stays shown
            if len(getattr(module, container)) == 0:
                unwrap_kind(module)
                if kind is LoraLayer:
                    widen.restore(module)  # an x_embedder a Control LoRA widened: the original is back
