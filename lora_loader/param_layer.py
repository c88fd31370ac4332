"""LoRA on an ``nn.Parameter`` (PEFT's ``target_parameters``): MoE expert stacks and any other weight a
module reads itself rather than through an ``nn.Linear``.

transformers 5 keeps the experts of Qwen3-MoE, Mixtral, gpt-oss, ... as stacked parameters of one module
(``mlp.experts.gate_up_proj`` ``[experts, ., .]``). PEFT 0.21 adapts such a parameter with a
``ParamWrapper``: while the module runs, the parameter reads ``W + scale * delta`` (a parametrization).
The same here, without a wrapper module: the module's class is swapped for a subclass (as every layer
of `layers`), its forward puts the adapted tensor in the parameter's place for the call, and puts the
parameter back after, so ``state_dict()`` and the parameter object stay the base model's.

PEFT's math, per targeted parameter ``W`` with ``lora_A`` ``[r * E, in]`` and ``lora_B`` ``[out, r * E]``
(``E`` experts; ``E = 1`` for a 2-D ``W``):

- 2-D ``W`` ``[out, in]``: ``delta = B @ A``;
- 3-D ``W`` ``[E, d1, d2]``: ``A_e = A.view(E, r, in)[e]`` and ``B_e = B.view(out, r, E)[:, :, e]``; the module
  stores ``[E, out, in]`` (``in = d2``: PEFT's default) and ``delta_e = B_e @ A_e``, or, when it says
  ``is_transposed`` (gpt-oss: ``[E, in, out]``), ``delta_e = (B_e @ A_e)^T``;
- ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), ``r`` and ``alpha`` by PEFT's pattern rules on
  ``"<module>.<parameter>"``.

PEFT names the tensors by position, not by parameter: the parameters of one module that
``target_parameters`` matches are wrapped in their registration order, each wrapping the last, so the
``k``-th of ``n`` (from 0) has ``n - 1 - k`` times ``base_layer.`` in its keys
(``experts.base_layer.lora_A.weight`` is ``gate_up_proj`` when both it and ``down_proj`` are targeted).
`ParamDelta` keeps that depth from the file; the planner, which sees the module, names the parameter.

A mixed batch (``adapter_names=`` per row) runs the module once per adapter on that adapter's rows
(every tensor argument whose first dimension is the rows'), which PEFT does not offer for parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import offload
from .delta import LoraDelta
from .errors import LoraError
from .layers import (
    CALL_SCALE, MIXED_BATCH, AdapterDict, LoraLayer, _Blended, _init_blend, _swap_in, _with_mode, rows_by_adapter,
)

BASE_LAYER = ".base_layer"


@dataclass
class ParamDelta:
    """One parameter's LoRA as a file has it: PEFT's ``lora_A`` / ``lora_B`` (``[r * E, in]``, ``[out, r * E]``).

    ``module`` is the module's path as the file spells it; ``parameter`` the parameter's name, or None
    until the planner resolves it from ``nesting`` (how many ``base_layer.`` the keys had) and
    ``patterns`` (the config's ``target_parameters``). ``experts`` and ``transposed`` come from the
    parameter's shape and its module's ``is_transposed`` once resolved (`resolved`).

    >>> d = ParamDelta(torch.ones(8, 6), torch.ones(5, 8), module="mlp.experts", parameter="down_proj", experts=4, alpha=4.0)
    >>> d.rank, d.scale
    (2, 2.0)
    """

    down: torch.Tensor
    up: torch.Tensor
    module: str = ""
    nesting: int = 0
    patterns: tuple[str, ...] = ()
    config: Any = None  # the adapter's LoraConfig: rank / alpha patterns are keyed on "<module>.<parameter>"
    keys: tuple[str, ...] = field(default_factory=tuple)
    parameter: str | None = None
    experts: int = 1
    transposed: bool = False
    stacked: bool = False  # a 3-D parameter (stacked experts), batched over its first dimension
    alpha: float | None = None
    use_rslora: bool = False
    up_bias: torch.Tensor | None = None  # PEFT's ParamWrapper has none; a file with one is refused at plan

    kind = "param"
    magnitude = None  # no DoRA on parameters (PEFT refuses it)
    bias = None
    dropout = 0.0

    @property
    def rank(self) -> int:
        if self.parameter is None and self.config is not None:  # not resolved yet (the experts are unknown)
            return int(self.config.r)
        return max(1, int(self.down.shape[0]) // max(1, self.experts))

    @property
    def scale(self) -> float:
        alpha = float(self.rank if self.alpha is None else self.alpha)
        return alpha / math.sqrt(self.rank) if self.use_rslora else alpha / self.rank

    @property
    def path(self) -> str:
        """``"<module>.<parameter>"``, the name PEFT's rank and alpha patterns match."""
        return f"{self.module}.{self.parameter}"

    def tensors(self) -> list[torch.Tensor]:
        return [self.down, self.up] + ([self.up_bias] if self.up_bias is not None else [])

    def is_all_zero(self) -> bool:
        return all(not bool(t.any()) for t in self.tensors())


@dataclass
class ParamGroup:
    """The parameter LoRAs of one module in one adapter: ``{parameter: ParamDelta}`` (what the planner
    plans for a module, and what a loaded `ParamAdapter` gives back for saving)."""

    parts: dict[str, ParamDelta] = field(default_factory=dict)

    kind = "param"
    magnitude = None
    bias = None
    up_bias = None

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for d in self.parts.values() for k in d.keys)

    @property
    def rank(self) -> int:
        return max(d.rank for d in self.parts.values())

    def is_all_zero(self) -> bool:
        return all(d.is_all_zero() for d in self.parts.values())

    def tensors(self) -> list[torch.Tensor]:
        return [t for d in self.parts.values() for t in d.tensors()]

    def nested(self, order: list[str]) -> list[tuple[int, ParamDelta]]:
        """``[(nesting, delta)]`` as PEFT writes them: ``order`` is the module's parameters in registration order."""
        named = [name for name in order if name in self.parts]
        return [(len(named) - 1 - i, self.parts[name]) for i, name in enumerate(named)]


def could_target_parameters(stem: str, patterns) -> bool:
    """Could the keys of module ``stem`` (PEFT's, with its ``.base_layer`` nesting) be a parameter's LoRA
    under ``target_parameters=patterns``? The planner decides with the module in hand.

    >>> could_target_parameters("model.layers.0.mlp.experts", ["mlp.experts.gate_up_proj"])
    True
    >>> could_target_parameters("model.layers.0.self_attn.q_proj", ["mlp.experts.gate_up_proj"])
    False
    """
    if stem.endswith(BASE_LAYER):
        return True
    for pattern in patterns or ():
        module, _, _ = pattern.rpartition(".")
        if not module or stem == module or stem.endswith("." + module):
            return True
    return False


def split_nesting(stem: str) -> tuple[str, int]:
    """``("m.experts", 2)`` for ``"m.experts.base_layer.base_layer"``."""
    nesting = 0
    while stem.endswith(BASE_LAYER):
        stem, nesting = stem[: -len(BASE_LAYER)], nesting + 1
    return stem, nesting


def targeted_parameters(module: nn.Module, path: str, patterns) -> list[str]:
    """The parameters of ``module`` itself (not its children's) that PEFT's ``target_parameters`` rule
    matches, in registration order: ``"<path>.<name>"`` is a pattern or ends with ``"." + pattern``.

    >>> targeted_parameters(torch.nn.Linear(2, 3), "mlp.up", ["up.weight"])
    ['weight']
    """
    patterns = list(patterns or ())
    out = []
    for name, _ in module.named_parameters(recurse=False):
        key = f"{path}.{name}" if path else name
        if key in patterns or any(key.endswith("." + p) for p in patterns):
            out.append(name)
    return out


def parameter_layout(module: nn.Module, name: str) -> tuple[int, bool, int, int] | str:
    """``(experts, transposed, in, out)`` of parameter ``name`` as PEFT's ParamWrapper reads it, or why not."""
    tensor = offload.real_tensor(module, name)
    shape = tuple(tensor.shape)
    if not tensor.dtype.is_floating_point:
        return f"{name} is a {tensor.dtype} tensor; LoRA adapts floating-point parameters"
    if len(shape) == 2:
        return 1, False, shape[1], shape[0]
    if len(shape) == 3:
        transposed = bool(getattr(module, "is_transposed", False))
        experts, d1, d2 = shape
        return (experts, True, d1, d2) if transposed else (experts, False, d2, d1)
    return f"{name} is {list(shape)}; a LoRA on a parameter takes a 2-D or 3-D (stacked experts) one"


def resolve(delta: ParamDelta, module: nn.Module, path: str):
    """``delta`` with its parameter named and its layout read from ``module`` (live path ``path``), or a
    plain module LoRA (a `LoraDelta`, when ``module`` has no targeted parameter and the keys had no
    nesting: a ``target_modules`` LoRA of the same config), or a string saying why it cannot apply."""
    config = delta.config
    if delta.parameter is None:
        targeted = targeted_parameters(module, path, delta.patterns)
        if not targeted:
            if delta.nesting == 0:
                alpha = config.alpha_for(delta.module) if config is not None else delta.alpha
                return LoraDelta(
                    delta.down, delta.up, alpha, bool(getattr(config, "use_rslora", False)), keys=delta.keys,
                    dropout=float(getattr(config, "lora_dropout", 0.0) or 0.0), up_bias=delta.up_bias,
                )
            return (f"its keys are nested {delta.nesting} 'base_layer' deep, as PEFT nests LoRAs on parameters, but no "
                    f"parameter of {path} ({type(module).__name__}) matches target_parameters={list(delta.patterns)}")
        index = len(targeted) - 1 - delta.nesting
        if index < 0:
            return (f"its keys are nested {delta.nesting} 'base_layer' deep, but target_parameters matches only "
                    f"{targeted} of {path}")
        delta = dataclasses.replace(delta, parameter=targeted[index])
    if delta.parameter not in dict(module.named_parameters(recurse=False)):
        return f"{path} ({type(module).__name__}) has no parameter '{delta.parameter}'"
    if delta.up_bias is not None:
        return "a lora_B.bias on a parameter LoRA, which PEFT's target_parameters does not define"
    layout = parameter_layout(module, delta.parameter)
    if isinstance(layout, str):
        return layout
    experts, transposed, in_f, out_f = layout
    down, up = delta.down, delta.up
    rows = down.shape[0] if down.dim() == 2 else 0
    # The rank the config gives (PEFT's rank_pattern on "<module>.<parameter>"): r * E rows could also read as
    # another rank on another number of experts.
    rank = config.rank_for(f"{delta.module}.{delta.parameter}") if config is not None else None
    r = "r" if rank is None else str(rank)
    if (down.dim() != 2 or up.dim() != 2 or rows == 0 or rows % experts or down.shape[1] != in_f or up.shape != (out_f, rows)
            or (rank is not None and rows != rank * experts)):
        return (f"{delta.parameter} is {list(offload.real_tensor(module, delta.parameter).shape)}: expected lora_A "
                f"[{r} * {experts}, {in_f}] and lora_B [{out_f}, {r} * {experts}], got {list(down.shape)} and {list(up.shape)}")
    alpha, rslora = delta.alpha, delta.use_rslora
    if config is not None:
        alpha, rslora = config.alpha_for(f"{delta.module}.{delta.parameter}"), bool(config.use_rslora)
    stacked = offload.real_tensor(module, delta.parameter).dim() == 3
    return dataclasses.replace(delta, experts=experts, transposed=transposed, stacked=stacked, alpha=alpha, use_rslora=rslora)


# -- the live adapter --------------------------------------------------------------------------------------------


class ParamLora(nn.Module):
    """One parameter's factors in one adapter (``down`` = PEFT's ``lora_A``, ``up`` = ``lora_B``)."""

    def __init__(self, delta: ParamDelta, dtype: torch.dtype, device):
        super().__init__()
        self._parameters["down"] = nn.Parameter(delta.down.to(device=device, dtype=dtype, copy=True), requires_grad=False)
        self._parameters["up"] = nn.Parameter(delta.up.to(device=device, dtype=dtype, copy=True), requires_grad=False)
        alpha = float(delta.rank if delta.alpha is None else delta.alpha)
        self.__dict__.update(parameter=delta.parameter, experts=delta.experts, transposed=delta.transposed, stacked=delta.stacked,
                             r=delta.rank, alpha=alpha, use_rslora=bool(delta.use_rslora), scale=delta.scale)

    @property
    def rank(self) -> int:
        return self.r

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lhs, rhs)`` with ``delta = lhs @ rhs`` in the parameter's own layout (batched over experts)."""
        down, up = self.down.to(dtype), self.up.to(dtype)
        if not self.stacked:
            return up, down
        e = self.experts
        a = down.reshape(e, -1, down.shape[-1])  # [E, r, in]
        b = up.reshape(up.shape[0], -1, e).permute(2, 0, 1)  # [E, out, r]
        return (a.transpose(1, 2), b.transpose(1, 2)) if self.transposed else (b, a)

    def delta(self, dtype: torch.dtype) -> torch.Tensor:
        """The unscaled change of the parameter, in its shape."""
        lhs, rhs = self.factors(dtype)
        return lhs @ rhs

    def to_delta(self, module: str) -> ParamDelta:
        return ParamDelta(self.down.detach(), self.up.detach(), module=module, parameter=self.parameter, experts=self.experts,
                          transposed=self.transposed, stacked=self.stacked, alpha=self.alpha, use_rslora=self.use_rslora)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        return

    def _load_from_state_dict(self, *args, **kwargs):
        return

    def extra_repr(self) -> str:
        return f"{self.parameter}: rank={self.r}, experts={self.experts}, alpha={self.alpha:g}, scale={self.scale:g}"


class ParamAdapter(_Blended, nn.Module):
    """One adapter's LoRAs on the parameters of one module: ``parts[parameter]``, in registration order.

    Its ``scale`` is 1: each part keeps its own (rank and alpha patterns apply per parameter), so the
    registry's ``weighted_scale`` is the blend weight itself.
    """

    magnitude = None
    bias_delta = None
    up_bias = None
    use_rslora = False
    dropout_p = 0.0

    def __init__(self, parts: list[ParamLora], dtype: torch.dtype, device):
        super().__init__()
        holder = AdapterDict()
        for part in parts:
            holder[part.parameter] = part
        self._modules["parts"] = holder
        self.__dict__.update(scale=1.0, r=max(p.r for p in parts), alpha=float(max(p.r for p in parts)))
        _init_blend(self, dtype, device)

    def widen(self) -> None:
        return  # the factors are stored in the parameter's dtype already

    def set_scaling(self, *args, **kwargs) -> None:
        raise LoraError("a LoRA on nn.Parameters (target_parameters) cannot be hotswapped")

    def to_group(self, module: str) -> ParamGroup:
        return ParamGroup({name: part.to_delta(module) for name, part in self.parts.items()})

    def to_delta(self, base_bias=None):
        raise LoraError(
            f"a LoRA on nn.Parameters ({', '.join(self.parts)}; PEFT's target_parameters) has no single lora_down/lora_up "
            "pair: weighted merges and Kohya files do not take it; save it with save_adapter or format='peft'/'diffusers'"
        )

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        return

    def _load_from_state_dict(self, *args, **kwargs):
        return

    def extra_repr(self) -> str:
        return f"parameters={list(self.parts)}"


def param_adapter(group: ParamGroup, module: nn.Module) -> ParamAdapter:
    """The adapter for ``group`` on ``module``, its parts in the module's registration order, each in its
    parameter's dtype and on its device."""
    parts = []
    device = None
    dtype = None
    for name, _ in module.named_parameters(recurse=False):
        delta = group.parts.get(name)
        if delta is None:
            continue
        own = offload.real_tensor(module, name)
        dtype = own.dtype
        device = offload.compute_device(module, own) or torch.device("cpu")
        parts.append(ParamLora(delta, own.dtype, device))
    adapter = ParamAdapter(parts, dtype, device)
    return _with_mode(adapter, module)


# -- the layer ---------------------------------------------------------------------------------------------------


class LoraParamMixin(LoraLayer):
    """Placed in front of a module's class whose parameters carry LoRAs (never instantiated directly).

    While the module runs, each adapted parameter reads ``W + sum_i w_i * s_i * delta_i`` over the shown
    adapters; the parameter itself is never written (fusing swaps whole tensors, see `ParamFusion`).
    """

    def forward(self, *args, **kwargs):
        rows = MIXED_BATCH.get()
        if rows is not None:
            return self._lora_param_rows(rows, args, kwargs)
        active = self._lora_active
        scale = CALL_SCALE.get()
        if not active or scale == 0:
            return super(LoraLayer, self).forward(*args, **kwargs)
        with self._lora_params_shown(active, scale):
            return super(LoraLayer, self).forward(*args, **kwargs)

    @contextlib.contextmanager
    def _lora_params_shown(self, active, scale=None):
        params = self._parameters
        adapted: dict[str, torch.Tensor] = {}
        for adapter, factor in active:
            for name, part in adapter.parts.items():
                base = adapted.get(name)
                if base is None:
                    base = params[name]
                    if part.down.device != base.device:
                        adapter.to(base.device)
                lhs, rhs = part.factors(base.dtype)
                rhs = rhs * (factor * (part.scale if scale is None else part.scale * scale))  # the small factor scaled
                # W + lhs @ rhs in one op: no change-sized tensor besides the result (PEFT folds it the same way)
                adapted[name] = torch.baddbmm(base, lhs, rhs) if part.stacked else torch.addmm(base, lhs, rhs)
        own = {name: params[name] for name in adapted}
        params.update(adapted)
        try:
            yield
        finally:
            params.update(own)

    def _lora_param_rows(self, names: list[str], args, kwargs):
        """A mixed batch: the base output for every row, then each adapter's rows computed again with it
        (every tensor argument and output with one entry per row is cut to those rows; a tuple output, as a
        router's ``(logits, scores, indices)``, entry by entry)."""
        x = next((a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a) and a.dim() > 0), None)
        out = super(LoraLayer, self).forward(*args, **kwargs)
        if x is None:
            return out
        n = x.shape[0]
        groups = rows_by_adapter(names, n, x.device, self.lora_adapters)

        def per_row(value) -> bool:
            return torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n

        outputs = list(out) if isinstance(out, tuple) else [out]
        if groups and not any(per_row(o) for o in outputs):
            raise LoraError(
                f"a mixed batch (adapter_names=) through {type(self).__name__}, whose LoRA is on its parameters, needs an "
                f"output with one row per input row; got {type(out).__name__}"
            )
        for name, index in groups.items():
            adapter = self.lora_adapters[name]
            with self._lora_params_shown([(adapter, 1.0)]):
                part = super(LoraLayer, self).forward(
                    *[a[index] if per_row(a) else a for a in args], **{k: v[index] if per_row(v) else v for k, v in kwargs.items()}
                )
            parts = list(part) if isinstance(part, tuple) else [part]
            outputs = [o.index_copy(0, index, p.to(o.dtype)) if per_row(o) else o for o, p in zip(outputs, parts)]
        return tuple(outputs) if isinstance(out, tuple) else outputs[0]


_param_classes: dict[type, type] = {}


def wrap_params(module: nn.Module) -> None:
    """Make ``module`` a parameter-LoRA layer in place (no-op if it already is one); `layers.unwrap` undoes it."""
    if not isinstance(module, LoraParamMixin):
        _swap_in(module, LoraParamMixin, _param_classes, "LoraParams", "lora_adapters", {"_lora_active": [], "_lora_concat": None})


# -- fusing ------------------------------------------------------------------------------------------------------


def fused_tensors(module: nn.Module, adapters) -> dict[str, torch.Tensor]:
    """``{parameter: W + sum w * s * delta}`` (fp32 sums, stored in the parameter's dtype) for ``[(adapter, w)]``."""
    out: dict[str, torch.Tensor] = {}
    for adapter, w in adapters:
        for name, part in adapter.parts.items():
            own = module._parameters[name].data
            acc = out.get(name)
            if acc is None:
                acc = own.float().clone()
            acc += (w * part.scale) * part.delta(torch.float32).to(acc.device)
            out[name] = acc
    return {name: t.to(module._parameters[name].dtype) for name, t in out.items()}


@dataclass
class ParamFusion:
    """A fused parameter-LoRA layer's original and fused tensors, per parameter, and which it shows."""

    base: dict
    fused: dict
    shown_fused: bool = False

    def show(self, module: nn.Module, fused: bool) -> None:
        for name, tensor in (self.fused if fused else self.base).items():
            module._parameters[name].data = tensor
        self.shown_fused = fused

    def follow_conversion(self, module: nn.Module, fn) -> None:
        """After ``.to()`` / ``.half()``: convert the tensors kept aside too (see `fuse.Fusion`)."""
        with torch.no_grad():
            kept, shown = (self.base, self.fused) if self.shown_fused else (self.fused, self.base)
            for name in list(kept):
                kept[name] = fn(kept[name])
                shown[name] = module._parameters[name].data


def fuse_params(module: LoraParamMixin, adapters) -> None:
    fused = fused_tensors(module, adapters)
    base = {name: module._parameters[name].data for name in fused}
    fusion = ParamFusion(base, fused)
    module.set_lora_fusion(fusion)
    fusion.show(module, True)


def fuse_problem(module: nn.Module) -> str | None:
    if any(offload.is_offloaded(module, name) for name, _ in module.named_parameters(recurse=False)):
        return "its parameters are offloaded by accelerate; fusing a LoRA on parameters needs them in memory"
    return None


# -- adapters trained on transformers 4's per-expert modules, for transformers 5's stacked experts ------------------


@dataclass
class _ExpertStack:
    """One of transformers' checkpoint conversions that stacks per-expert Linear weights into a parameter:
    ``sources[k]`` (a regex of the old module path, expert index captured) goes to slot ``k`` of ``parameter``
    (slots concatenated along the rows), under the module ``target`` names."""

    sources: list
    target: str  # the stacked parameter's module path tail, e.g. ".experts" or "mlp.experts"
    parameter: str


def _conversion_rules(root: nn.Module):
    """``(renames, stacks)`` from transformers' checkpoint conversion mapping of ``root``'s model type (the
    one ``from_pretrained`` applies to transformers 4 checkpoints, and peft to their adapters): renames as
    ``(regex, replacement)``, stacks as `_ExpertStack`. Empty when transformers has none."""
    model_type = getattr(getattr(root, "config", None), "model_type", None)
    if model_type is None:
        return [], []
    if model_type not in _RULES:
        _RULES[model_type] = _read_conversion_rules(model_type)
    return _RULES[model_type]


_RULES: dict[str, tuple[list, list]] = {}


def _read_conversion_rules(model_type: str):
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        mapping = get_checkpoint_conversion_mapping(model_type) or []
    except Exception:  # an older or newer transformers without it: no conversion
        return [], []
    renames, stacks = [], []
    for conversion in mapping:
        sources, targets = list(conversion.source_patterns), list(conversion.target_patterns)
        kind = type(conversion).__name__
        if kind == "WeightRenaming" and len(sources) == len(targets) == 1:
            renames.append((sources[0], targets[0]))
            continue
        ops = [type(op).__name__ for op in getattr(conversion, "operations", [])]
        if kind != "WeightConverter" or len(targets) != 1 or ops not in (["MergeModulelist"], ["MergeModulelist", "Concatenate"]):
            continue
        if [getattr(op, "dim", None) for op in conversion.operations] not in ([0], [0, 1]):
            continue
        if not all(s.endswith(".weight") and s.count("*") == 1 for s in sources):
            continue
        target, _, parameter = targets[0].rpartition(".")
        regexes = [re.escape(s[: -len(".weight")]).replace(r"\*", r"(\d+)") + "$" for s in sources]
        stacks.append(_ExpertStack(regexes, target, parameter))
    return renames, stacks


def renamed(root: nn.Module, name: str) -> str | None:
    """``name`` after transformers' checkpoint renamings for ``root`` (Mixtral's ``block_sparse_moe`` -> ``mlp``), or None."""
    renames, _ = _conversion_rules(root)
    text = f".{name}."
    for source, target in renames:
        text = re.sub(source, target, text)
    text = text.strip(".")
    return text if text != name else None


def restack_per_expert(deltas: dict, locate, roots: dict) -> dict:
    """``deltas`` with LoRAs of transformers 4's per-expert modules (``mlp.experts.3.gate_proj``, Mixtral's
    ``block_sparse_moe.experts.3.w1``) on a model whose experts are stacked parameters (transformers 5) put
    together into one `ParamDelta` per stacked parameter, as peft converts such adapters: per expert ``e``,
    ``lora_A`` rows are the slots' ``A`` stacked (gate, then up), ``lora_B`` their ``B`` block-diagonal;
    experts or slots the file lacks are zeros. Every other delta stays as it is.

    ``locate(symbolic, name) -> (component, path, module)``; ``roots``: component -> its model.
    """
    groups: dict = {}  # (symbolic, experts name, parameter) -> {(expert, slot): (key, delta)}
    info: dict = {}
    for key, delta in deltas.items():
        symbolic, name = key
        if type(delta) is not LoraDelta or delta.magnitude is not None or delta.bias is not None or delta.up_bias is not None:
            continue
        component, path, _ = locate(symbolic, name)
        if component is None or path is not None:
            continue
        root = roots.get(component)
        if root is None:
            continue
        name = renamed(root, name) or name
        for stack in _conversion_rules(root)[1]:
            for slot, regex in enumerate(stack.sources):
                match = re.search(regex, name)
                if match is None:
                    continue
                experts_name = (name[: match.start()] + stack.target).strip(".")
                _, experts_path, module = locate(symbolic, experts_name)
                if module is None or not isinstance(getattr(module, stack.parameter, None), torch.Tensor):
                    continue
                if bool(getattr(module, "is_transposed", False)) or not getattr(module, "is_concatenated", True):
                    continue  # transformers 4 never had per-expert modules for these layouts
                group = (symbolic, experts_name, stack.parameter)
                groups.setdefault(group, {})[(int(match.group(1)), slot)] = (key, delta)
                info[group] = (module, len(stack.sources))
                break
            else:
                continue
            break
    if not groups:
        return deltas
    out = dict(deltas)
    for (symbolic, experts_name, parameter), parts in groups.items():
        module, slots = info[(symbolic, experts_name, parameter)]
        for key, _ in parts.values():
            out.pop(key, None)
        out[(symbolic, f"{experts_name}.{parameter}")] = _stacked(parts, module, parameter, slots, experts_name)
    return out


def _stacked(parts: dict, module: nn.Module, parameter: str, slots: int, experts_name: str) -> ParamDelta:
    experts = int(offload.real_tensor(module, parameter).shape[0])
    ranks = [max((d.rank for (e, s), (_, d) in parts.items() if s == slot), default=0) for slot in range(slots)]
    scales = {d.scale for _, d in parts.values()}
    uniform = len(scales) == 1 and len({d.rank for _, d in parts.values()}) == 1 and len(parts) == experts * slots
    rank = sum(ranks)
    sample = next(iter(parts.values()))[1]
    dtype, device = sample.down.dtype, sample.down.device
    ins = {d.down.shape[1] for _, d in parts.values()}
    outs = [max((d.up.shape[0] for (e, s), (_, d) in parts.items() if s == slot), default=0) for slot in range(slots)]
    if len(ins) != 1 or any(o == 0 for o in outs):  # parts that do not chain: the planner reports the first's shapes
        return ParamDelta(sample.down, sample.up, module=experts_name, parameter=parameter,
                          keys=tuple(k for _, d in parts.values() for k in d.keys))
    in_f = ins.pop()
    down = torch.zeros(experts, rank, in_f, dtype=dtype, device=device)
    up = torch.zeros(sum(outs), rank, experts, dtype=dtype, device=device)
    for (e, slot), (_, d) in parts.items():
        if e >= experts:
            continue
        r0, o0 = sum(ranks[:slot]), sum(outs[:slot])
        factor = 1.0 if uniform else d.scale
        down[e, r0 : r0 + d.rank] = d.down.to(dtype)
        up[o0 : o0 + d.up.shape[0], r0 : r0 + d.rank, e] = d.up.to(dtype) * factor
    keys = tuple(k for _, (_, d) in sorted(parts.items(), key=lambda kv: kv[0]) for k in d.keys)
    alpha = (scales.pop() if uniform else 1.0) * rank
    return ParamDelta(down.reshape(experts * rank, in_f), up.reshape(sum(outs), rank * experts), module=experts_name,
                      parameter=parameter, keys=keys, alpha=alpha)
