"""Hotswap: replace a loaded adapter's tensors in place, so a torch.compile'd model does not recompile.

`prepare_hotswap` zero-pads every adapter to a declared maximum rank once,
before compiling. A swap then copies the new factors into the leading rows
and columns, zeroes the rest (and the layers the new file does not target),
and updates the scale tensors in place: shapes, tensor identities and the
graph stay the same. Ranks and per-module alphas may differ between swaps.
"""

from __future__ import annotations

import torch

from .errors import LoraError
from .delta import FactorDelta
from .layers import FactorAdapter, LoraAdapter
from .param_layer import ParamAdapter, ParamGroup


def pad_adapter(adapter: LoraAdapter, max_rank: int) -> None:
    """Zero-pad ``down`` rows and ``up`` columns to ``max_rank`` (the adapter's rank ``r`` is kept).

    The factors are widened to the compute dtype too, so any later file swaps in without rounding.
    """
    adapter.widen()
    rank = adapter.down.shape[0]
    if rank > max_rank:
        raise LoraError(f"an adapter has rank {rank}, above max_rank={max_rank}")
    if rank == max_rank:
        return
    with torch.no_grad():
        down = adapter.down.new_zeros((max_rank, *adapter.down.shape[1:]))
        up = adapter.up.new_zeros((adapter.up.shape[0], max_rank, *adapter.up.shape[2:]))
        down[:rank] = adapter.down
        up[:, :rank] = adapter.up
    adapter.down = torch.nn.Parameter(down, requires_grad=adapter.down.requires_grad)
    adapter.up = torch.nn.Parameter(up, requires_grad=adapter.up.requires_grad)


def check(adapter, delta, source_name: str) -> None:
    """Raise before anything changes when ``delta`` (None: the layer is not in the new file) cannot swap in.

    Every refusal `swap_in` and `silence` could meet is raised here, so that a swap that passed
    the check of every layer writes all of them and one that did not writes none.
    """
    if isinstance(adapter, ParamAdapter) or isinstance(delta, ParamGroup):
        raise LoraError(f"{source_name}: hotswap of a LoRA on parameters (target_parameters) is not supported")
    if not isinstance(adapter, FactorAdapter):
        if isinstance(delta, FactorDelta):
            raise LoraError(f"{source_name}: hotswap of a LoRA adapter needs a LoRA file (got {delta.kind})")
        if adapter.magnitude is not None or (delta is not None and (delta.magnitude is not None or delta.bias is not None)):
            raise LoraError(f"{source_name}: hotswap of DoRA adapters or adapter biases is not supported")
        if adapter.bias_delta is not None:
            raise LoraError(f"{source_name}: hotswap of an adapter with a bias is not supported")
        if delta is not None and delta.rank > adapter.down.shape[0]:
            raise LoraError(
                f"{source_name}: the new adapter has rank {delta.rank} where the loaded one has room for "
                f"{adapter.down.shape[0]}; call lora_loader.prepare_hotswap(model, max_rank={delta.rank}) before compiling"
            )
        return
    if delta is None:
        raise LoraError(f"{source_name}: hotswap of a {adapter.kind} adapter must target the same layers as the loaded one")
    have = adapter.factors()
    new = dict(delta.factors) if isinstance(delta, FactorDelta) else {}
    if not isinstance(delta, FactorDelta) or delta.kind != adapter.kind or set(new) != set(have) or any(
        tuple(new[k].shape) != tuple(have[k].shape) for k in have
    ) or (delta.dora_scale is None) != (adapter.dora_scale is None) or delta.rows != adapter.rows:
        got = delta.kind if isinstance(delta, FactorDelta) else "lora"
        raise LoraError(
            f"{source_name}: hotswap of a {adapter.kind} adapter needs a {adapter.kind} file with the same factor "
            f"shapes (got {got}: {sorted((k, list(v.shape)) for k, v in new.items())})"
        )


def swap_in_kind(adapter: FactorAdapter, delta) -> None:
    """A LyCORIS kind: copy the new factors (same names and shapes, see `check`) in place."""
    check(adapter, delta, "hotswap")
    have = adapter.factors()
    new = delta.factors
    with torch.no_grad():
        for k, tensor in have.items():
            tensor.copy_(new[k])
        if adapter.dora_scale is not None:
            adapter.dora_scale.copy_(delta.dora_scale)
    adapter.set_scaling(delta.rank, float(delta.rank if delta.alpha in (None, 0) else delta.alpha), delta.scale)


def swap_in(adapter: LoraAdapter, delta) -> None:
    """Copy ``delta`` into ``adapter``'s (possibly padded) tensors in place."""
    if isinstance(adapter, FactorAdapter):
        return swap_in_kind(adapter, delta)
    if isinstance(delta, FactorDelta):
        raise LoraError(f"hotswap of a LoRA adapter needs a LoRA file (got {delta.kind})")
    capacity = adapter.down.shape[0]
    if delta.rank > capacity:
        raise LoraError(
            f"the new adapter has rank {delta.rank} where the loaded one has room for {capacity}; "
            f"call lora_loader.prepare_hotswap(model, max_rank={delta.rank}) before compiling"
        )
    if delta.magnitude is not None or adapter.magnitude is not None or delta.bias is not None or (
        delta.up_bias is not None or adapter.up_bias is not None
    ):
        raise LoraError("hotswap of DoRA adapters or adapter biases is not supported")
    if adapter.down.dtype != delta.down.dtype:
        adapter.widen()  # an fp16-stored adapter would round another dtype's values
    down = delta.down.reshape(delta.rank, *adapter.down.shape[1:])
    up = delta.up.reshape(adapter.up.shape[0], delta.rank, *adapter.up.shape[2:])
    with torch.no_grad():
        adapter.down.zero_()
        adapter.up.zero_()
        adapter.down[: delta.rank].copy_(down)
        adapter.up[:, : delta.rank].copy_(up)
    adapter.set_scaling(delta.rank, float(delta.rank if delta.alpha is None else delta.alpha), delta.scale, delta.use_rslora)


def silence(adapter: LoraAdapter) -> None:
    """A layer the new adapter does not target: keep it, contributing nothing."""
    if isinstance(adapter, FactorAdapter):
        raise LoraError("hotswap of a LyCORIS-kind adapter must target the same layers as the loaded one")
    with torch.no_grad():
        adapter.up.zero_()
