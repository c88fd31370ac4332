"""LoRA layers: a wrapped module stays the same object, now a subclass of its own class.

Wrapping swaps ``module.__class__`` for a subclass that adds the adapters
(as loralib's layers subclass the layer they adapt). The module keeps its
identity, its parameters and its ``state_dict`` keys (``to_q.weight`` stays
``to_q.weight``), and code that reads ``attn.to_q.weight`` or checks
``isinstance(m, nn.Linear)`` keeps working. Unwrapping restores the class and
removes every attribute wrapping added, so the module is structurally the
original again.

The forward is ``base(x) + sum_i s_i * up_i(down_i(x))``, where
``s_i = weight_i * scale_i`` is adapter i's ``weighted_scale`` (blend weight times
its alpha / rank). Each piece of state has one writer: the
adapter registry decides what each layer shows and hands it to this module's
`show_active` / `show_nothing` (all layers in one loop) and each adapter's
`set_blend_weight`; nothing else writes them. With several plain adapters active and no gradients needed,
the down's and the factor-folded up's are concatenated once, so k adapters
cost two matmuls instead of 2k.

Kinds: ``nn.Linear``, ``nn.Conv2d`` (kxk down, 1x1 up), transformers'
``Conv1D`` (weight stored ``[in, out]``) and ``nn.Embedding`` (down is
``[r, num_embeddings]``, looked up like the embedding). DoRA adapters (a
``magnitude`` vector) follow PEFT's formula; with blend weight ``w`` the
output is ``base + w * (dora(x) - base)``, so weight 0 switches DoRA off.
"""

from __future__ import annotations

import contextvars

import numpy
import torch
import torch.nn.functional as F
from torch import nn

from . import offload, quantized
from .algorithms import algorithm
from .algorithms import dora as dora_math
from .algorithms.lora import low_rank_product
from .delta import FactorDelta, LoraDelta, take_rows
from .errors import LoraError

# Per-row adapter names of the batch being computed (mixed-batch inference), or None.
MIXED_BATCH: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("lora_loader_mixed_batch", default=None)
BASE = "__base__"
# A per-call multiplier on every unfused adapter (diffusers' cross_attention_kwargs={"scale": s}), or None.
CALL_SCALE: contextvars.ContextVar[float | None] = contextvars.ContextVar("lora_loader_call_scale", default=None)


class _Blended:
    """What every adapter kind shares: its rank, compute dtype, and the blend state's one writer."""

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._buffers["weighted_scale"].dtype

    @property
    def rank(self) -> int:
        return self.r

    # Whether `_write_scale` may write ``weighted_scale``'s memory directly on the CPU (see there); an
    # adapter kind whose forward keeps the factor for a backward without `scale_for_graph` leaves it False.
    _direct_scale_write = False

    def set_blend_weight(self, weight: float) -> bool:
        """The blend weight the registry gives this adapter on its layer, and ``weighted_scale = weight * scale``
        (a 0-d tensor updated in place, so a torch.compile'd model sees the same graph when the blend
        or a hotswapped alpha changes it). Written only when the weight changes. True when the scale
        written is another tensor than at the last write (a ``.to()`` replaced it): a layer may still
        show the old one, so the registry pushes its lists again."""
        if self.blend_weight != weight:
            self.__dict__["blend_weight"] = weight
            return _write_scale(self, weight * self.scale)
        return False


def _init_blend(adapter: nn.Module, dtype: torch.dtype, device) -> None:
    adapter.__dict__["blend_weight"] = float("nan")  # set by the registry when the adapter is shown
    adapter._buffers["weighted_scale"] = torch.zeros((), dtype=dtype, device=device)
    adapter._non_persistent_buffers_set.add("weighted_scale")


def _refresh_weighted_scale(adapter: nn.Module) -> None:
    weight = adapter.blend_weight
    if weight == weight:  # not NaN: the adapter has been shown
        _write_scale(adapter, weight * adapter.scale)


# dtypes whose CPU scalar numpy writes exactly as ``fill_`` does (float64 -> float32 -> float16, each
# rounded to nearest even); bfloat16 has no numpy dtype and is filled by torch.
_NUMPY_ROUNDING = {torch.float32: float, torch.float64: float, torch.float16: numpy.float32}


def _write_scale(adapter: nn.Module, value: float) -> bool:
    """``adapter.weighted_scale = value``, in place (True: see `set_blend_weight`). On the CPU through a numpy view of its one value:
    a ``set_adapters`` writes one scalar per adapter and layer, and a ``fill_`` costs a torch dispatch
    (~3 us, most of a 264-layer switch) where the view's store costs ~0.1 us. Its version counter does
    not move: the concatenation cache keys on the blend weight and scale, and a forward that keeps the
    factor for a backward keeps a copy (`scale_for_graph`), so neither sees the write late."""
    buffer = adapter._buffers["weighted_scale"]
    # Kept with the buffer and its address: a `.to()` replaces the buffer, and a deepcopy or unpickling
    # copies this entry with a new buffer at another address; either makes a new view.
    view = adapter.__dict__.get("_scale_view")
    replaced = view is not None and view[0] is not buffer
    if view is None or replaced or view[1] != buffer.data_ptr():
        view = adapter.__dict__["_scale_view"] = _scale_view(adapter, buffer)
    if view[2] is None:
        buffer.fill_(value)
    else:
        view[2][()] = view[3](value)
    return replaced


def _scale_view(adapter: nn.Module, buffer: torch.Tensor) -> tuple:
    """``(buffer, its address, a numpy view of it or None, the rounding to store through it)``."""
    rounding = _NUMPY_ROUNDING.get(buffer.dtype)
    if not adapter._direct_scale_write or buffer.device.type != "cpu" or rounding is None:
        return (buffer, buffer.data_ptr(), None, None)
    return (buffer, buffer.data_ptr(), buffer.detach().numpy(), rounding)


def scale_for_graph(factor):
    """``factor`` as a forward that autograd records may keep: a copy of a 0-d ``weighted_scale``, whose
    memory `_write_scale` may overwrite before the backward (a float, as a mixed batch passes, as it is)."""
    return factor.clone() if isinstance(factor, torch.Tensor) and torch.is_grad_enabled() else factor


class LoraAdapter(_Blended, nn.Module):
    """One adapter's factors on one layer (``down``, ``up``), its scale, dropout and DoRA magnitude."""

    _direct_scale_write = True

    def __init__(
        self,
        down: torch.Tensor,
        up: torch.Tensor,
        scale: float,
        alpha: float,
        magnitude: torch.Tensor | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        bias_delta: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
        up_bias: torch.Tensor | None = None,
    ):
        super().__init__()
        # Written straight into nn.Module's dicts: a load builds hundreds of adapters, and
        # nn.Module.__setattr__ costs more than the rest of the construction together.
        params = self._parameters
        params["down"] = nn.Parameter(down, requires_grad=False)
        params["up"] = nn.Parameter(up, requires_grad=False)
        params["magnitude"] = None if magnitude is None else nn.Parameter(magnitude, requires_grad=False)
        # PEFT's bias="lora_only": the adapter's bias minus the base bias, added with the blend weight,
        # so the base bias itself is never overwritten.
        params["bias_delta"] = None if bias_delta is None else nn.Parameter(bias_delta, requires_grad=False)
        # PEFT's lora_bias=True: lora_B's own bias, part of the LoRA's output (scaled and weighted with it).
        params["up_bias"] = None if up_bias is None else nn.Parameter(up_bias, requires_grad=False)
        if dropout > 0:
            self._modules["dropout"] = nn.Dropout(dropout)
        else:
            self.__dict__["dropout"] = _no_dropout
        # down/up may be stored narrower than the layer computes in (an fp16 file in an fp32 model
        # keeps its fp16 tensors, cast exactly at use): `factor` has the compute dtype.
        compute_dtype = down.dtype if compute_dtype is None else compute_dtype
        self.__dict__.update(
            scale=float(scale),
            alpha=float(alpha),
            use_rslora=use_rslora,
            r=int(down.shape[0]),  # the adapter's rank; down/up may be zero-padded beyond it for hotswap
        )
        _init_blend(self, compute_dtype, down.device)

    def widen(self) -> None:
        """Store down/up in the compute dtype (before training them, or copying other tensors into them)."""
        dtype = self.compute_dtype
        for name in ("down", "up"):
            p = self._parameters[name]
            if p.dtype != dtype:
                self._parameters[name] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)

    def set_scaling(self, rank: int, alpha: float, scale: float, use_rslora: bool = False) -> None:
        """A hotswap's new rank and alpha: the scale, and the factor that follows from it."""
        self.__dict__.update(r=int(rank), alpha=float(alpha), scale=float(scale), use_rslora=use_rslora)
        _refresh_weighted_scale(self)

    @property
    def dropout_p(self) -> float:
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0

    # Adapters are not part of the model's state_dict: `unet.state_dict()` stays the base model's,
    # so save_pretrained, load_state_dict(strict=True) and copies such as ControlNetModel.from_unet
    # work while adapters are loaded. Adapters are saved with save_lora_weights / save_adapter.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        return

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        return

    def to_delta(self, base_bias: torch.Tensor | None = None) -> LoraDelta:
        magnitude = None if self.magnitude is None else self.magnitude.detach()
        down, up = self.down.detach()[: self.r], self.up.detach()[:, : self.r]
        bias = None
        if self.bias_delta is not None:
            bias = self.bias_delta.detach() + (0 if base_bias is None else base_bias.detach().to(self.bias_delta))
        up_bias = None if self.up_bias is None else self.up_bias.detach()
        return LoraDelta(
            down, up, self.alpha, self.use_rslora, magnitude=magnitude, dropout=self.dropout_p, bias=bias, up_bias=up_bias
        )

    def extra_repr(self) -> str:
        dora = ", dora" if self.magnitude is not None else ""
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}{dora}"


def _no_dropout(x: torch.Tensor) -> torch.Tensor:
    return x


class FactorAdapter(_Blended, nn.Module):
    """One adapter of an algorithm other than plain LoRA (LoCon-Tucker, LoHa, LoKr, full and norm diffs)
    or a Kohya DoRA, on one layer.

    The factors are kept as the file has them (parameters named after their keys,
    ``.`` as ``_``); `dense` rebuilds the unscaled delta in the base weight's
    ``[out, in, ...]`` layout with the algorithm's rule (`algorithms`).
    """

    magnitude = None  # PEFT's DoRA vector: `LoraAdapter` only; this kind's DoRA is `dora_scale`
    up_bias = None  # PEFT's lora_B.bias: `LoraAdapter` only
    _direct_scale_write = True

    def __init__(self, delta: FactorDelta, weight_shape: torch.Size, compute_dtype: torch.dtype, device):
        super().__init__()
        params = self._parameters
        names = {}
        bias_factor = delta.algorithm.bias_factor

        def placed(tensor):
            return nn.Parameter(tensor.to(device=device, dtype=compute_dtype, copy=True), requires_grad=False)

        for suffix, tensor in delta.factors.items():
            if suffix != bias_factor:
                names[suffix] = name = suffix.replace(".", "_")
                params[name] = placed(tensor)
        bias = delta.factors.get(bias_factor) if bias_factor else None
        params["bias_delta"] = None if bias is None else placed(bias)
        params["dora_scale"] = None if delta.dora_scale is None else placed(delta.dora_scale)
        self.__dict__.update(
            kind=delta.kind,
            algorithm=delta.algorithm,
            _names=names,
            weight_shape=tuple(weight_shape),
            scale=float(delta.scale),
            alpha=float(delta.rank if delta.alpha in (None, 0) else delta.alpha),
            r=delta.rank,
            use_rslora=False,
            dropout=_no_dropout,
            dropout_p=0.0,
            rows=delta.rows,
        )
        _init_blend(self, compute_dtype, device)

    def set_scaling(self, rank: int, alpha: float, scale: float) -> None:
        """A hotswap's new rank and alpha: the scale, and the factor that follows from it."""
        self.__dict__.update(r=int(rank), alpha=float(alpha), scale=float(scale))
        _refresh_weighted_scale(self)

    def factors(self) -> dict[str, torch.Tensor]:
        """``{file suffix: tensor}`` (the bias factor ``diff_b`` / ``b_norm`` included)."""
        out = {suffix: self._parameters[name] for suffix, name in self._names.items()}
        if self.bias_delta is not None:
            out[self.algorithm.bias_factor] = self.bias_delta
        return out

    def widen(self) -> None:
        return  # factors are stored in the compute dtype already

    def dense(self, dtype: torch.dtype, layer: nn.Module | None = None) -> torch.Tensor | None:
        """The unscaled delta in the base weight's ``[out, in, ...]`` layout (None for a bias-only diff).
        ``layer``: the module it adapts, whose weight an algorithm that `uses_base_weight` reads."""
        factors = {s: _in(self._parameters[n], dtype) for s, n in self._names.items()}
        base = dense_base_weight(layer).detach().to(dtype) if self.algorithm.uses_base_weight and layer is not None else None
        delta = take_rows(self.algorithm.dense(factors, base), self.rows)
        return None if delta is None else delta.reshape(self.weight_shape)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        return

    def _load_from_state_dict(self, *args, **kwargs):
        return

    def to_delta(self, base_bias: torch.Tensor | None = None) -> FactorDelta:
        factors = {s: t.detach() for s, t in self.factors().items()}
        dora = None if self.dora_scale is None else self.dora_scale.detach()
        alpha = None if self.kind in ("full", "norm") or self.algorithm.alpha_in_factors else self.alpha
        return FactorDelta(self.kind, factors, alpha, dora_scale=dora, rows=self.rows)

    def extra_repr(self) -> str:
        dora = ", dora" if self.dora_scale is not None else ""
        return f"kind={self.kind}, rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}{dora}"


def _in(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype`` (a no-op when it already is)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class AdapterDict(nn.ModuleDict):
    """A ModuleDict that takes any adapter name, also those that are nn.Module attributes ("train", "to").

    Adapters are only ever reached with ``[name]``, never as attributes, so the
    attribute clash nn.Module guards against cannot happen here.

    Its adapters are not listed by ``named_children``: accelerate's offloading
    (``cpu_offload``, ``device_map`` with offload, diffusers' sequential offload)
    hooks every child that holds tensors and turns them into meta tensors, to be
    reloaded from a weights map built from the model's ``state_dict``, where adapters
    are not; they would be lost. ``named_modules``, ``parameters`` (optimizers, DDP),
    ``.to()``, ``train()``/``eval()`` and ``apply`` still reach them.
    """

    def named_children(self):
        return iter(())

    def _apply(self, fn, recurse=True):
        if recurse:
            for module in self._modules.values():
                module._apply(fn)
        return super()._apply(fn, recurse=False)

    def train(self, mode: bool = True):
        self.training = mode
        for module in self._modules.values():
            module.train(mode)
        return self

    def apply(self, fn):
        for module in self._modules.values():
            module.apply(fn)
        fn(self)
        return self

    def __setitem__(self, name: str, module: nn.Module) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise KeyError(f"adapter name must be a non-empty string without '.', got {name!r}")
        self._modules[name] = module


def rows_by_adapter(names: list[str], batch: int, device, present) -> dict[str, torch.Tensor]:
    """A mixed batch's ``{adapter name: row indices}`` for the names in ``present`` (a layer's container).

    ``names`` has one entry per input row; a batch of more rows repeats each entry
    (generate() expands rows with repeat_interleave for num_beams, num_return_sequences).
    """
    repeat = batch // len(names)
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(n for n in names for _ in range(repeat)):
        if name in present:
            groups.setdefault(name, []).append(row)
    return {name: torch.tensor(rows, device=device) for name, rows in groups.items()}


class LoraGate:
    """Whether the adapters the layers of one component show run: ``disable_lora`` turns one flag off
    and ``enable_lora`` on, so neither touches a layer (their cost does not grow with the layers or
    the adapters loaded). The registry keeps one per component and hands it to the layers it shows
    adapters on (`show_active`); a layer shown otherwise has `ALWAYS_ON`."""

    __slots__ = ("on",)

    def __init__(self, on: bool = True):
        self.on = on

    def __repr__(self) -> str:
        return f"LoraGate(on={self.on})"


ALWAYS_ON = LoraGate()


class LoraLayer:
    """Mixin placed in front of the wrapped module's class. Never instantiated directly.

    What the layer shows is its own state, written only through `show_active` / `show_nothing`
    (the registry's push), `set_lora_active`, `drop_lora_adapter` and `drop_lora_cache`; whether it
    runs, by its component's `LoraGate`.
    """

    lora_adapters: AdapterDict
    _lora_base_class: type
    # (adapter, weighted_scale) pairs: the adapter's 0-d ``blend weight * scale``; empty means "base only".
    _lora_active: list[tuple[LoraAdapter, torch.Tensor]]
    _lora_concat: tuple | None
    _lora_gate: LoraGate = ALWAYS_ON  # its component's gate once the registry shows adapters on it

    def set_lora_active(self, active: list[tuple[LoraAdapter, torch.Tensor]]) -> None:
        """Show these ``(adapter, adapter.weighted_scale)`` pairs, in order (`show_active` for many layers)."""
        show_active({self: active})

    def drop_lora_cache(self) -> None:
        """Forget the concatenated factors (an adapter's tensors were replaced or moved)."""
        self.__dict__["_lora_concat"] = None

    def drop_lora_adapter(self, name: str) -> None:
        """Remove adapter ``name`` from this layer and from what it shows."""
        adapter = self.lora_adapters[name]
        del self.lora_adapters[name]
        if any(a is adapter for a, _ in self._lora_active):
            self.__dict__["_lora_active"] = [(a, f) for a, f in self._lora_active if a is not adapter]
            self.drop_lora_cache()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x)`` plus the shown adapters' change. One result, computed the cheapest way that applies:

        - a mixed batch (``adapter_names=`` per row): each row group with its own adapter;
        - no graph to keep (inference) and plain LoRA only: added into ``base(x)`` in place;
        - otherwise the change as a tensor (training, DoRA, biases, other algorithms).

        Two or more plain LoRAs run as one concatenated pair of matmuls in either of the last two.
        """
        out = super().forward(x, *args, **kwargs)
        rows = MIXED_BATCH.get()
        if rows is not None:
            return self._lora_mixed_batch(x, out, rows)
        active = self._lora_active
        scale = CALL_SCALE.get()
        if not active or scale == 0 or not self._lora_gate.on:
            return out
        if any(factor.device != out.device for _, factor in active):
            active = self._lora_follow(out.device)
        if not out.requires_grad and out.dtype == active[0][0].compute_dtype and out.is_contiguous():
            if self._lora_add_into(x, out, active, scale):
                return out
        delta = self._lora_delta(x, out, active)
        return out + (delta if scale is None else delta * scale).to(out.dtype)

    def _apply(self, fn, recurse=True):
        # `.to()`, `.half()`, `.cuda()`: a fused layer keeps its other weight outside its parameters.
        result = super()._apply(fn, recurse)
        fusion = self.__dict__.get("_lora_fusion")
        if fusion is not None:
            fusion.follow_conversion(self, fn)
        active = self.__dict__.get("_lora_active")
        if active and recurse:
            # The adapters' scales are new tensors now: the shown pairs take them, in the same list (the
            # registry keeps it too), so a switch that only writes scales reaches what this layer computes with.
            active[:] = [(adapter, adapter._buffers["weighted_scale"]) for adapter, _ in active]
            self.__dict__["_lora_concat"] = None
        return result

    def set_lora_fusion(self, fusion) -> None:
        """Keep (or, with None, forget) the `fuse.Fusion` of this layer: the tensors unfuse restores."""
        if fusion is None:
            self.__dict__.pop("_lora_fusion", None)
        else:
            self.__dict__["_lora_fusion"] = fusion

    def _lora_follow(self, device: torch.device) -> list:
        """Move the active adapters to ``device``, where the base layer just computed: a layer offloaded by
        accelerate computes on its hook's execution device, also when it was hooked after the adapters loaded."""
        moved = []
        for adapter, _ in self._lora_active:
            adapter.to(device)
            moved.append((adapter, adapter._buffers["weighted_scale"]))
        self.set_lora_active(moved)
        self.drop_lora_cache()
        return moved

    def _lora_add_into(self, x: torch.Tensor, out: torch.Tensor, active, scale: float | None) -> bool:
        """Add plain LoRA adapters into ``out`` in place (no autograd graph holds it): the factor
        scales the rank-r intermediate, and the up-projection accumulates straight into the
        output, so no output-sized delta is allocated. False (nothing done) for DoRA or biases."""
        for adapter, _ in active:
            if not is_plain_lora(adapter) or adapter.bias_delta is not None or adapter.up_bias is not None:
                return False
        dtype = out.dtype
        h = x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x
        if len(active) > 1 and self._lora_can_concatenate(active):
            down, up = self._concatenated(active, dtype)
            mid = self._lora_down(h, down)
            self._lora_up_into(mid if scale is None else mid * scale, up, out)
            return True
        for adapter, factor in active:
            mid = self._lora_down(adapter.dropout(h), _in(adapter.down, dtype))
            if mid.requires_grad:  # trainable factors: autograd keeps the scale, as it is now (`scale_for_graph`)
                factor = factor.clone()
            self._lora_up_into(mid * (factor if scale is None else factor * scale), _in(adapter.up, dtype), out)
        return True

    def _lora_up_into(self, mid: torch.Tensor, up: torch.Tensor, out: torch.Tensor) -> None:
        out.add_(self._lora_up(mid, up))

    # -- the delta for a list of (adapter, factor) ------------------------------------------------------
    def _lora_delta(self, x: torch.Tensor, out: torch.Tensor, active, blended: bool = True) -> torch.Tensor:
        """The output change of ``active`` (adapter, factor) pairs. ``blended``: at each adapter's blend
        weight (its factor); False: at weight 1 (a mixed batch's rows), the factor being the adapter's scale."""
        dtype = active[0][0].compute_dtype
        h = x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x
        plain = [(a, f) for a, f in active if is_plain_lora(a)]
        delta = None
        if len(plain) > 1 and self._lora_can_concatenate(plain):
            down, up = self._concatenated(plain, dtype)
            delta = self._lora_up(self._lora_down(h, down), up)
        else:
            for adapter, factor in plain:
                down, up = _in(adapter.down, dtype), _in(adapter.up, dtype)
                d = self._lora_up(self._lora_down(adapter.dropout(h), down), up) * scale_for_graph(factor)
                delta = d if delta is None else delta + d
        for adapter, factor in active:
            factor = scale_for_graph(factor) if (type(adapter) is FactorAdapter or adapter.up_bias is not None) else factor
            weight = adapter.blend_weight if blended else 1.0
            d = None
            if type(adapter) is FactorAdapter:
                d = self._factor_delta_out(h, out, adapter, factor, weight)
            elif adapter.magnitude is not None:
                d = self._dora_delta(h, out, adapter, weight)
            if d is not None:
                delta = d if delta is None else delta + d
            if adapter.bias_delta is not None:
                delta = delta + self._lora_bias_shape(adapter.bias_delta) * weight
            if adapter.up_bias is not None:  # lora_B.bias: scaled like the LoRA's product, as PEFT computes it
                delta = delta + self._lora_bias_shape(_in(adapter.up_bias, dtype)) * factor
        return delta

    def _lora_bias_shape(self, bias: torch.Tensor) -> torch.Tensor:
        return bias

    def _lora_can_concatenate(self, plain) -> bool:
        if self.training and any(a.dropout_p > 0 for a, _ in plain):
            return False
        return not (torch.is_grad_enabled() and any(a.down.requires_grad or a.up.requires_grad for a, _ in plain))

    def _concatenated(self, active, dtype):
        # Keyed on the adapter and factor objects themselves (compared by identity: no id() reuse
        # after a delete), their in-place version counters, device and dtype, so a blend change,
        # a `.to()` or an optimizer step invalidates the cache without any hook.
        # The blend weight and scale too: `_write_scale` writes a CPU factor without moving its version.
        key = tuple(
            (a, f, getattr(f, "_version", None), a.blend_weight, a.scale, a.down._version, a.up._version, a.down.device,
             a.down.dtype, dtype)
            for a, f in active
        )
        cached = self._lora_concat
        if cached is None or cached[0] != key:
            with torch.no_grad():
                down = torch.cat([_in(a.down, dtype) for a, _ in active], dim=0)
                up = torch.cat([_in(a.up, dtype) * factor for a, factor in active], dim=1)
            cached = (key, down, up)
            self.__dict__["_lora_concat"] = cached
        return cached[1], cached[2]

    def _dora_delta(self, h, out, adapter: LoraAdapter, weight: float) -> torch.Tensor:
        """``weight * (dora(x) - base(x))`` with PEFT's DoRA: ``m / ||W + s B A||`` rescales the rows."""
        dtype = adapter.compute_dtype
        base_weight = dense_base_weight(self).to(dtype)
        down, up = _in(adapter.down, dtype), _in(adapter.up, dtype)
        combined = base_weight + adapter.scale * low_rank_product(up, down).reshape(base_weight.shape)
        mag_scale = dora_math.magnitude_scale(combined.detach(), adapter.magnitude).reshape(-1)
        x_in = adapter.dropout(h)
        if isinstance(adapter.dropout, nn.Dropout) and self.training:
            base_no_bias = F.linear(x_in, base_weight)
        else:
            bias = getattr(self, "bias", None)
            base_no_bias = out.to(h.dtype) if bias is None else out.to(h.dtype) - bias.to(h.dtype)
        lora_out = self._lora_up(self._lora_down(x_in, down), up)
        return weight * ((mag_scale - 1) * base_no_bias + mag_scale * lora_out * adapter.scale)

    def _factor_delta_out(self, h, out, adapter: FactorAdapter, factor, weight: float) -> torch.Tensor:
        """The output change of a `FactorAdapter`: ``factor * op(x, dense)``, or with ``dora_scale``
        ``weight * op(x, W_dora - W)``. Its bias is added by the caller."""
        dtype = adapter.compute_dtype
        dense = adapter.dense(dtype, self)
        if adapter.dora_scale is None:
            if dense is None:
                return torch.zeros((), dtype=dtype, device=out.device)
            return self._dense_op(h, dense) * factor
        base = dense_base_weight(self).to(dtype)
        combined = base if dense is None else base + adapter.scale * dense
        change = dora_math.lycoris_weight(combined, adapter.dora_scale) - base
        return self._dense_op(h, change) * weight

    def _dense_op(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(h, weight.flatten(1))

    # -- mixed batches: a different adapter per row ------------------------------------------------------
    def _lora_mixed_batch(self, x: torch.Tensor, out: torch.Tensor, names: list[str]) -> torch.Tensor:
        for name, index in rows_by_adapter(names, x.shape[0], out.device, self.lora_adapters).items():
            adapter = self.lora_adapters[name]
            delta = self._lora_delta(x[index], out[index], [(adapter, adapter.scale)], blended=False)
            out = out.index_add(0, index, delta.to(out.dtype))
        return out


def show_active(lists: dict[nn.Module, list], gate: LoraGate | None = None) -> None:
    """Set what each of these LoRA layers shows: ``{layer: [(adapter, adapter.weighted_scale), ...]}``,
    and with ``gate`` (the registry's, for the layers' component) the gate that says whether it runs.

    The one writer of a layer's shown list, for one layer (`LoraLayer.set_lora_active`) or for all
    the layers a blend change touches at once (the registry's push: one loop, no call per layer,
    which is most of a push's cost). A concatenation of two or more is kept: it is checked against
    the adapters and their scales' values before each use.
    """
    for module, active in lists.items():
        state = module.__dict__
        state["_lora_active"] = active
        if len(active) < 2:
            state["_lora_concat"] = None
        if gate is not None:
            state["_lora_gate"] = gate


def honours_gate(module: nn.Module) -> bool:
    """Whether this layer's forward reads its `LoraGate` (`LoraLayer`'s does); another kind (LoRA on
    parameters) stops running its adapters only when it shows none."""
    return type(module).forward is LoraLayer.forward


def show_nothing(layers, unless_in: dict) -> None:
    """Clear what each of ``layers`` shows, except those ``unless_in`` holds (one pass: a disable clears them all).
    A layer unwrapped since has no list any more and is left alone."""
    for module in layers:
        if module not in unless_in:
            state = module.__dict__
            if state.get("_lora_active"):
                state["_lora_active"] = []
                state["_lora_concat"] = None


def is_plain_lora(adapter) -> bool:
    """A LoRA pair without DoRA: what the concatenated and in-place fast paths compute."""
    return type(adapter) is LoraAdapter and adapter.magnitude is None


class LoraLinearMixin(LoraLayer):
    def _lora_down(self, x, down):
        return F.linear(x, down)

    def _lora_up(self, h, up):
        return F.linear(h, up)


    def _lora_up_into(self, mid, up, out):
        out.view(-1, out.shape[-1]).addmm_(mid.reshape(-1, mid.shape[-1]), up.T)


class LoraConv1DMixin(LoraLinearMixin):
    """transformers' Conv1D (GPT-2): ``y = x @ W + b`` with ``W`` stored ``[in, out]`` (PEFT's fan_in_fan_out)."""


class LoraConv2dMixin(LoraLayer):
    def _lora_down(self, x, down):
        # The base conv's stride, padding (mode included) and dilation; groups is 1 (checked at plan).
        return self._conv_forward(x, down, None)

    def _lora_up(self, h, up):
        return F.conv2d(h, up)

    def _lora_bias_shape(self, bias):
        return bias.view(-1, 1, 1)

    def _dense_op(self, h, weight):
        return self._conv_forward(h, weight, None)


class LoraConv3dMixin(LoraLayer):
    """``nn.Conv3d`` (a video DiT's patch embedding): full diffs and the other LyCORIS kinds, applied as one
    dense weight through the base conv; LoRA factors do not apply (no trainer writes them for it)."""

    def _lora_bias_shape(self, bias):
        return bias.view(-1, 1, 1, 1)

    def _dense_op(self, h, weight):
        return self._conv_forward(h, weight, None)


class LoraNormMixin(LoraLayer):
    """LayerNorm / GroupNorm / RMSNorm: only norm and full diffs apply; their change is ``normalize(x) * dw + db``
    (an RMSNorm has no bias)."""

    def _dense_op(self, h, weight):
        if isinstance(self, nn.GroupNorm):
            normalized = F.group_norm(h, self.num_groups, None, None, self.eps)
            return normalized * weight.view(-1, *[1] * (h.dim() - 2))
        if isinstance(self, nn.RMSNorm):
            return F.rms_norm(h, self.normalized_shape, None, self.eps) * weight
        return F.layer_norm(h, self.normalized_shape, None, None, self.eps) * weight

    def _lora_bias_shape(self, bias):
        return bias.view(-1, 1, 1) if isinstance(self, nn.GroupNorm) else bias


class LoraEmbeddingMixin(LoraLayer):
    """``nn.Embedding``: down ``[r, num_embeddings]`` is looked up by token id, up ``[dim, r]`` maps to the embedding."""

    def _lora_down(self, x, down):
        return F.embedding(x, down.T, padding_idx=None, max_norm=self.max_norm, norm_type=self.norm_type,
                           scale_grad_by_freq=self.scale_grad_by_freq, sparse=self.sparse)

    def _lora_up(self, h, up):
        return F.linear(h, up)

    def _lora_up_into(self, mid, up, out):
        out.view(-1, out.shape[-1]).addmm_(mid.reshape(-1, mid.shape[-1]), up.T)

    def _dense_op(self, h, weight):
        return F.embedding(h, weight.T, padding_idx=None, max_norm=self.max_norm, norm_type=self.norm_type,
                           scale_grad_by_freq=self.scale_grad_by_freq, sparse=self.sparse)


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a runtime dependency
        return None
    return Conv1D


_layer_types: dict[type, str | None] = {}


def layer_type_of(module_type: type) -> str | None:
    """The layer type of a module class: ``"linear"``, ``"conv2d"``, ``"conv1d"`` (transformers' Conv1D),
    ``"embedding"``, ``"layernorm"``, ``"groupnorm"``, ``"rmsnorm"``, ``"conv3d"``, or None. (An adapter's
    algorithm is its ``kind``.)"""
    if module_type in _layer_types:
        return _layer_types[module_type]
    conv1d = _conv1d_class()
    found = None
    for base, name in ((nn.Conv2d, "conv2d"), (nn.Linear, "linear"), (conv1d, "conv1d"), (nn.Embedding, "embedding"),
                       (nn.LayerNorm, "layernorm"), (nn.GroupNorm, "groupnorm"), (nn.RMSNorm, "rmsnorm"),
                       (nn.Conv3d, "conv3d")):
        if base is not None and issubclass(module_type, base):
            found = name
            break
    _layer_types[module_type] = found
    return found


def layer_type(module: nn.Module) -> str | None:
    """The layer type of a (possibly wrapped) module, or None for modules no adapter applies to."""
    found = layer_type_of(module.__dict__.get("_lora_base_class") or type(module))
    if found in NORM_TYPES and getattr(module, "weight", None) is None:
        return None  # a norm without affine parameters has nothing a diff could change
    return found


_MIXINS = {
    "conv2d": LoraConv2dMixin, "linear": LoraLinearMixin, "conv1d": LoraConv1DMixin, "embedding": LoraEmbeddingMixin,
    "layernorm": LoraNormMixin, "groupnorm": LoraNormMixin, "rmsnorm": LoraNormMixin, "conv3d": LoraConv3dMixin,
}  # fmt: skip
# Layer types that take LoRA factors; norms take only norm and full diffs, a Conv3d the LyCORIS kinds.
LORA_LAYER_TYPES = ("linear", "conv2d", "conv1d", "embedding")
NORM_TYPES = ("layernorm", "groupnorm", "rmsnorm")
_wrapped_classes: dict[type, type] = {}


def _swap_in(module: nn.Module, mixin: type, cache: dict, prefix: str, container: str, state: dict) -> None:
    """Make ``module`` an instance of ``(mixin, its class)`` and give it ``container`` plus ``state``."""
    base_class = type(module)
    cls = cache.get(base_class)
    if cls is None:
        cls = type(f"{prefix}{base_class.__name__}", (mixin, base_class), {"__module__": __name__})
        cache[base_class] = cls
    module.__class__ = cls
    offload.rebind_hooked_forward(module, base_class)
    # Plain attributes and a submodule, written without nn.Module.__setattr__'s checks (a load wraps hundreds).
    module.__dict__["_lora_base_class"] = base_class
    module.__dict__.update(state)
    module._modules[container] = AdapterDict() if container != "lora_copies" else _CopyDict()


def _swap_out(module: nn.Module, container: str, state: tuple[str, ...]) -> None:
    """Undo `_swap_in`: the original class, and none of the attributes it added."""
    base_class = module._lora_base_class
    del module._modules[container]
    for name in ("_lora_base_class", "_lora_gate", *state):
        module.__dict__.pop(name, None)
    wrapped_class = type(module)
    module.__class__ = base_class
    offload.rebind_hooked_forward(module, wrapped_class)


def wrap(module: nn.Module) -> None:
    """Turn ``module`` into a LoRA layer in place (no-op if it already is one)."""
    if not isinstance(module, LoraLayer):
        mixin = _MIXINS[layer_type_of(type(module))]
        _swap_in(module, mixin, _wrapped_classes, "Lora", "lora_adapters", {"_lora_active": [], "_lora_concat": None})


def unwrap(module: nn.Module) -> None:
    """Restore the module's original class and drop everything `wrap` added."""
    if isinstance(module, LoraLayer):
        _swap_out(module, "lora_adapters", ("_lora_active", "_lora_concat"))


# Narrower float dtypes whose every value the wider one holds exactly: factors stored in them
# compute exactly as if they had been converted at load, at a fraction of the memory.
_EXACT_IN = {torch.float32: (torch.float16, torch.bfloat16)}


def storage_dtype(file_dtype: torch.dtype, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype an adapter keeps a file's factors in: the file's own when it converts exactly."""
    return file_dtype if file_dtype in _EXACT_IN.get(compute_dtype, ()) else compute_dtype


def _placed(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype, copy: bool) -> torch.Tensor:
    """``tensor`` contiguous on ``device`` in ``dtype``; the same tensor when it already is and ``copy`` is False."""
    if not copy and tensor.dtype == dtype and tensor.device == device and tensor.is_contiguous():
        return tensor
    return tensor.to(device=device, dtype=dtype, copy=copy).contiguous()


def adapter_from_delta(delta: LoraDelta, module: nn.Module, copy: bool = True) -> LoraAdapter:
    """Build the adapter for ``module`` on its device (shapes checked by the planner).

    The factors stay in the file's dtype when the layer's dtype holds it exactly
    (an fp16 file in an fp32 model: the outputs are those of converting at load,
    the memory half). ``copy=False`` lets the adapter keep the file's tensors
    when nothing needs converting, so loading a file costs its size once, not twice.
    """
    weight = module.weight
    kind = layer_type(module)
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    # Offloaded by accelerate: the layer computes on its hook's execution device. A config-only
    # skeleton (e.g. for converting a file) computes nowhere; the adapter keeps the file's values on the CPU.
    device = offload.compute_device(module, weight) or torch.device("cpu")
    if not isinstance(delta, LoraDelta):  # a LyCORIS kind or a Kohya DoRA
        return _with_mode(FactorAdapter(delta, dense_weight_shape(module), dtype, device), module)
    down, up = delta.down, delta.up
    if kind == "conv2d":
        if down.dim() == 2:
            down = down.reshape(down.shape[0], -1, *module.kernel_size)
        if up.dim() == 2:
            up = up.reshape(up.shape[0], up.shape[1], 1, 1)
    else:
        if down.dim() != 2:
            down = down.reshape(down.shape[0], -1)
        if up.dim() != 2:
            up = up.reshape(up.shape[0], -1)
    kept = storage_dtype(down.dtype, dtype) if down.dtype == up.dtype else dtype
    down, up = _placed(down, device, kept, copy), _placed(up, device, kept, copy)
    magnitude = None
    if delta.magnitude is not None:
        magnitude = delta.magnitude.reshape(-1).to(device=device, dtype=dtype, copy=True)
    alpha = float(delta.rank if delta.alpha is None else delta.alpha)
    bias_delta = None
    if delta.bias is not None:
        bias_delta = (delta.bias.to(device=device, dtype=torch.float32) - offload.real_tensor(module, "bias").detach().float().to(device)).to(dtype)
    dropout = 0.0 if kind == "embedding" else delta.dropout  # token ids take no dropout, as in PEFT
    up_bias = None if delta.up_bias is None else delta.up_bias.reshape(-1).to(device=device, dtype=dtype, copy=True)
    adapter = LoraAdapter(down, up, delta.scale, alpha, magnitude, dropout, delta.use_rslora, bias_delta, dtype, up_bias)
    return _with_mode(adapter, module)


def dense_weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The module's weight shape as ``[out, in, ...]`` (Conv1D and Embedding store theirs transposed)."""
    if quantized.is_quantized(module):  # bitsandbytes packs the weight; the layer keeps its true shape
        return (module.out_features, module.in_features)
    shape = tuple(module.weight.shape)
    return (shape[1], shape[0]) if layer_type(module) in ("conv1d", "embedding") else shape


def dense_base_weight(module: nn.Module) -> torch.Tensor:
    """The module's base weight as ``[out, in, ...]``: Conv1D's and Embedding's transposed storage undone
    (DoRA on an embedding normalises per embedding dimension, as PEFT's DoraEmbeddingLayer), a bitsandbytes
    weight dequantized."""
    if quantized.is_quantized(module):
        return quantized.dequantized_weight(module)
    weight = offload.real_tensor(module, "weight")
    return weight.T if layer_type(module) in ("conv1d", "embedding") else weight


def _with_mode(adapter: nn.Module, module: nn.Module) -> nn.Module:
    if not module.training:  # dropout follows the model's train/eval mode from the start (new modules train)
        adapter.__dict__["training"] = False
        if "dropout" in adapter._modules:
            adapter._modules["dropout"].training = False
    return adapter


class SavedCopyLayer:
    """PEFT's ``modules_to_save``: per adapter a full copy of the module, used instead of it while active.

    Like a LoRA layer, this is a class swap on the module itself; the copies sit
    in ``lora_copies`` and stay out of the state_dict.
    """

    lora_copies: AdapterDict
    _lora_base_class: type
    _lora_copy: nn.Module | None

    def set_lora_copy(self, copy: nn.Module | None) -> None:
        # A plain attribute: nn.Module.__setattr__ would register the copy as a submodule, putting it
        # into the model's state_dict and in reach of accelerate's hooks. It lives in lora_copies.
        self.__dict__["_lora_copy"] = copy

    def drop_lora_adapter(self, name: str) -> None:
        """Remove adapter ``name``'s copy; the module computes itself until the registry shows another."""
        del self.lora_copies[name]
        self.set_lora_copy(None)

    def forward(self, x, *args, **kwargs):
        names = MIXED_BATCH.get()
        if names is None:
            copy = self._lora_copy
            return super().forward(x, *args, **kwargs) if copy is None else copy(x, *args, **kwargs)
        out = super().forward(x, *args, **kwargs)
        for name, index in rows_by_adapter(names, x.shape[0], out.device, self.lora_copies).items():
            out = out.index_copy(0, index, self.lora_copies[name](x[index], *args, **kwargs).to(out.dtype))
        return out


_copy_classes: dict[type, type] = {}


def wrap_saved_copy(module: nn.Module) -> None:
    if not isinstance(module, SavedCopyLayer):
        _swap_in(module, SavedCopyLayer, _copy_classes, "Saved", "lora_copies", {"_lora_copy": None})


def unwrap_saved_copy(module: nn.Module) -> None:
    if isinstance(module, SavedCopyLayer):
        _swap_out(module, "lora_copies", ("_lora_copy",))


def _drop_copy_keys(module, incompatible_keys) -> None:
    # load_state_dict recursed into the copies and called their weights missing; they are not the model's.
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if ".lora_copies." not in k]


class _CopyDict(AdapterDict):
    """Holds the copies; like adapters, they stay out of the model's state_dict."""

    def __init__(self):
        super().__init__()
        self.register_load_state_dict_post_hook(_drop_copy_keys)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        return

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        # Copies are not part of the model's state_dict: skip the recursion into them.
        return {} if destination is None else destination

    def _load_from_state_dict(self, *args, **kwargs):
        return


# What accelerate's add_hook_to_module puts on a module: a copy must not run (or deep-copy) its hook.
_HOOK_ATTRIBUTES = ("_hf_hook", "_old_forward", "forward")


def make_saved_copy(module: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A plain copy of ``module`` (without our wrapping or accelerate's hooks) with ``tensors`` assigned.

    A module offloaded by accelerate holds meta tensors: the copy takes the values from the
    hook's weights map instead (``tensors`` may then be meta too, as ``state_dict()`` gives
    them), on the device where the module computes, and runs there inside the module's hook.
    """
    import copy as copy_module

    saved = module._modules.pop("lora_copies", None) if isinstance(module, SavedCopyLayer) else None
    hooked = {
        sub: {k: sub.__dict__.pop(k) for k in _HOOK_ATTRIBUTES if k in sub.__dict__}
        for sub in module.modules()
        if "_hf_hook" in sub.__dict__
    }
    try:
        clone = copy_module.deepcopy(module)
    finally:
        for sub, attributes in hooked.items():
            sub.__dict__.update(attributes)
        if saved is not None:
            module._modules["lora_copies"] = saved
    if isinstance(clone, SavedCopyLayer):
        clone.__class__ = clone._lora_base_class
        for name in ("_lora_base_class", "_lora_copy"):
            clone.__dict__.pop(name, None)
    with torch.no_grad():
        originals = dict(module.named_modules())
        for sub_name, sub in clone.named_modules():
            for holder in (sub._parameters, sub._buffers):
                for name, tensor in holder.items():
                    if tensor is not None and tensor.is_meta:  # offloaded: the real values are in the hook's map
                        real = offload.real_tensor(originals[sub_name], name)
                        device = offload.compute_device(originals[sub_name], tensor) or real.device
                        value = real.detach().to(device, copy=True)
                        holder[name] = nn.Parameter(value, requires_grad=False) if holder is sub._parameters else value
        own = dict(clone.named_parameters())
        own.update(dict(clone.named_buffers()))
        for name, tensor in tensors.items():
            if not tensor.is_meta:
                own[name].copy_(tensor.to(own[name].dtype))
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


class BiasAdapter(nn.Module):
    """PEFT's bias="all" on a module without LoRA: the adapter's bias minus the base bias."""

    def __init__(self, delta: torch.Tensor):
        super().__init__()
        self.delta = nn.Parameter(delta, requires_grad=False)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        return

    def _load_from_state_dict(self, *args, **kwargs):
        return


class BiasLayer:
    """A module (a norm, a Linear without LoRA, ...) whose output gets ``sum_i w_i * bias_delta_i`` added."""

    lora_biases: AdapterDict
    _lora_base_class: type
    _lora_bias_active: list[tuple[BiasAdapter, float]]

    def set_lora_bias_active(self, active: list[tuple[BiasAdapter, float]]) -> None:
        self.__dict__["_lora_bias_active"] = active

    def drop_lora_adapter(self, name: str) -> None:
        """Remove adapter ``name``'s bias delta, from what the module shows too."""
        removed = self.lora_biases[name]
        del self.lora_biases[name]
        self.set_lora_bias_active([(a, w) for a, w in self._lora_bias_active if a is not removed])

    def _lora_shaped(self, delta: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # Channels are dim 1 of a conv / group-norm output, the last dim of everything else.
        if out.dim() > 2 and isinstance(self, (nn.Conv2d, nn.GroupNorm, nn.BatchNorm2d)):
            return delta.view(-1, *([1] * (out.dim() - 2)))
        return delta

    def forward(self, x, *args, **kwargs):
        out = super().forward(x, *args, **kwargs)
        names = MIXED_BATCH.get()
        if names is not None:
            for name, index in rows_by_adapter(names, out.shape[0], out.device, self.lora_biases).items():
                shaped = self._lora_shaped(self.lora_biases[name].delta, out).to(out.dtype)
                out = out.index_add(0, index, shaped.expand_as(out[index]).contiguous())
            return out
        scale = CALL_SCALE.get()
        for adapter, weight in self._lora_bias_active:
            w = weight if scale is None else weight * scale
            out = out + w * self._lora_shaped(adapter.delta, out).to(out.dtype)
        return out


_bias_classes: dict[type, type] = {}


def wrap_bias(module: nn.Module) -> None:
    if not isinstance(module, BiasLayer):
        _swap_in(module, BiasLayer, _bias_classes, "Biased", "lora_biases", {"_lora_bias_active": []})


def unwrap_bias(module: nn.Module) -> None:
    if isinstance(module, BiasLayer):
        _swap_out(module, "lora_biases", ("_lora_bias_active",))


def bias_adapter(module: nn.Module, bias: torch.Tensor) -> BiasAdapter:
    base = offload.real_tensor(module, "bias").detach()  # an offloaded module's bias is in its hook's weights map
    device = offload.compute_device(module, module.bias) or base.device
    return BiasAdapter((bias.to(device=device, dtype=torch.float32) - base.float().to(device)).to(base.dtype))


class ParamDiff(nn.Module):
    """One adapter's full diff of a module's own parameters, each under the parameter's name (LightX2V's
    ``diff_m``: the diff of a Wan block's ``modulation``, diffusers' ``scale_shift_table``)."""

    def __init__(self, diffs: dict[str, torch.Tensor]):
        super().__init__()
        for name, tensor in diffs.items():
            self._parameters[name] = nn.Parameter(tensor, requires_grad=False)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        return

    def _load_from_state_dict(self, *args, **kwargs):
        return


class ParamDiffLayer:
    """A module (a Wan transformer block, the transformer itself) that computes with ``p + sum_i w_i * diff_i``
    for its own parameters ``p`` that adapters diff, while they are active: the sum is put in place of the
    parameter for the forward and the parameter is put back after it, so ``state_dict()`` stays the base
    model's and disabling gives the base outputs exactly. Not fused: it keeps running after `fuse_lora`.
    """

    lora_params: AdapterDict
    _lora_base_class: type
    _lora_param_active: list[tuple[ParamDiff, float]]

    def set_lora_param_active(self, active: list[tuple[ParamDiff, float]]) -> None:
        self.__dict__["_lora_param_active"] = active

    def drop_lora_adapter(self, name: str) -> None:
        """Remove adapter ``name``'s diffs, from what the module shows too."""
        removed = self.lora_params[name]
        del self.lora_params[name]
        self.set_lora_param_active([(d, w) for d, w in self._lora_param_active if d is not removed])

    def forward(self, *args, **kwargs):
        names = MIXED_BATCH.get()
        if names is not None:
            mixed = sorted(set(names) & set(self.lora_params))
            if mixed:
                raise LoraError(f"adapters {mixed} diff parameters of a {type(self).__name__} (e.g. diff_m): "
                                "a mixed batch (one adapter per row) cannot apply those; run them in separate batches")
            return super().forward(*args, **kwargs)
        active = self._lora_param_active
        scale = CALL_SCALE.get()
        if not active or scale == 0:
            return super().forward(*args, **kwargs)
        params = self._parameters
        own = {}
        for diff, weight in active:
            w = weight if scale is None else weight * scale
            for name, tensor in diff._parameters.items():
                if name not in own:
                    own[name] = params[name]
                current = params[name]
                params[name] = current + w * tensor.to(device=current.device, dtype=current.dtype)
        try:
            return super().forward(*args, **kwargs)
        finally:
            params.update(own)


_param_classes: dict[type, type] = {}


def wrap_param(module: nn.Module) -> None:
    # The owner may be a whole model (Wan's head modulation is the transformer's own scale_shift_table): its
    # class keeps its name (the config records it) and, for an attached model, still compares equal to the
    # class it attaches to (diffusers' from_pipe keeps a component by its class).
    if not isinstance(module, ParamDiffLayer):
        base = type(module)
        _swap_in(module, ParamDiffLayer, _param_classes, "", "lora_params", {"_lora_param_active": []})
        type(module)._lora_attached_to = base.__dict__.get("_lora_attached_to", base)


def unwrap_param(module: nn.Module) -> None:
    if isinstance(module, ParamDiffLayer):
        _swap_out(module, "lora_params", ("_lora_param_active",))


def param_diff(module: nn.Module, diffs: dict[str, torch.Tensor]) -> ParamDiff:
    """The diffs in each parameter's own dtype, where the module computes."""
    placed = {}
    for name, tensor in diffs.items():
        own = offload.real_tensor(module, name)
        device = offload.compute_device(module, module._parameters[name]) or own.device
        placed[name] = tensor.to(device=device, dtype=own.dtype, copy=True)
    return ParamDiff(placed)


class NormWeight(nn.Module):
    """One adapter's full replacement of a module's ``weight`` (a Flux Control LoRA's norm scales)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        return

    def _load_from_state_dict(self, *args, **kwargs):
        return


class NormWeightLayer:
    """A module (Flux's RMSNorm ``norm_q``, ...) that computes with an adapter's weight instead of its own
    while that adapter is active: diffusers loads a Control LoRA's norm scales over the model's. Its own
    weight is never written, so ``state_dict()`` stays the base model's and disabling gives it back exactly.
    """

    lora_norms: AdapterDict
    _lora_base_class: type
    _lora_norm: nn.Parameter | None  # the weight shown, or None: the module's own

    def set_lora_norm(self, weight: nn.Parameter | None) -> None:
        self.__dict__["_lora_norm"] = weight

    def drop_lora_adapter(self, name: str) -> None:
        """Remove adapter ``name``'s norm weight; the module's own weight is shown if that one was."""
        removed = self.lora_norms[name]
        del self.lora_norms[name]
        if self._lora_norm is removed.weight:
            self.set_lora_norm(None)

    def _lora_forward_with(self, weight, x, *args, **kwargs):
        params = self._parameters
        own = params["weight"]
        params["weight"] = weight
        try:
            return super().forward(x, *args, **kwargs)
        finally:
            params["weight"] = own

    def forward(self, x, *args, **kwargs):
        names = MIXED_BATCH.get()
        if names is not None:
            out = super().forward(x, *args, **kwargs)
            for name, index in rows_by_adapter(names, x.shape[0], out.device, self.lora_norms).items():
                rows = self._lora_forward_with(self.lora_norms[name].weight, x[index], *args, **kwargs)
                out = out.index_copy(0, index, rows.to(out.dtype))
            return out
        shown = self._lora_norm
        if shown is None:
            return super().forward(x, *args, **kwargs)
        return self._lora_forward_with(shown, x, *args, **kwargs)


_norm_classes: dict[type, type] = {}


def wrap_norm(module: nn.Module) -> None:
    if not isinstance(module, NormWeightLayer):
        _swap_in(module, NormWeightLayer, _norm_classes, "Replaced", "lora_norms", {"_lora_norm": None})


def unwrap_norm(module: nn.Module) -> None:
    if isinstance(module, NormWeightLayer):
        _swap_out(module, "lora_norms", ("_lora_norm",))


def norm_weight(module: nn.Module, weight: torch.Tensor) -> NormWeight:
    """The replacement in the module's own dtype, where it computes (as diffusers' load_state_dict copies it)."""
    own = offload.real_tensor(module, "weight")
    device = offload.compute_device(module, module.weight) or own.device
    return NormWeight(weight.to(device=device, dtype=own.dtype, copy=True))
