"""The way back: an adapter's deltas on diffusers' module paths, written in a family's original names.

What sd-scripts, musubi-tuner and ComfyUI read for a DiT is its original checkpoint's names
(``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_blocks_0_self_attn_q``), where a fused
projection is one module. `to_original` renames every delta by the family's table
(`Family.original_name`) and joins the parts of a fused projection into one delta over its rows:

- parts that share one ``lora_down`` and one scale (what loading a fused file gives) join as
  that ``lora_down`` and the ``lora_up`` rows stacked: the file they came from, back;
- otherwise the ``lora_down`` tensors stack and the ``lora_up`` tensors (each times its scale)
  sit on the block diagonal, alpha = the joined rank (scale 1): the same product, exactly;
  a part without a LoRA gets zero rows (its width from ``out_rows``);
- LyCORIS parts that are rows of one set of shared factors are that set again; any other
  LyCORIS parts are written as the full diff of the fused module (their dense rows, stacked).

A (shift, scale) modulation swaps its halves back. Anything the table cannot name, or join
exactly, is a `LoraError`: a file in original names with one module in another spelling would
not load where it is going.

>>> import torch
>>> from lora_loader.delta import LoraDelta
>>> from lora_loader.formats.original_names import FLUX
>>> down = torch.ones(2, 4)
>>> parts = {f"transformer_blocks.0.attn.to_{c}": LoraDelta(down, torch.full((4, 2), i + 1.0), 2.0)
...          for i, c in enumerate("qkv")}
>>> written = to_original(FLUX, parts, out_rows=lambda path: 4)
>>> delta = written["double_blocks_0_img_attn_qkv"]
>>> tuple(delta.down.shape), tuple(delta.up.shape), delta.up[:, 0].tolist()
((2, 4), (12, 2), [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0])
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ...delta import FactorDelta, LoraDelta
from ...errors import LoraError
from .engine import ALWAYS, IF_TWO_HALVES, Family, _two_halves


def to_original(family: Family, deltas: dict[str, object], out_rows: Callable[[str], int | None]) -> dict[str, object]:
    """``{original name (Kohya-mangled): delta}`` for ``{diffusers path: delta}`` (see the module docstring).

    ``out_rows(path)`` is the output width of a diffusers module (for a fused part with no LoRA).
    """
    groups: dict[str, dict[int, tuple[str, object]]] = {}
    for path, delta in deltas.items():
        found = family.original_name(path)
        if found is None:
            raise LoraError(
                f"transformer.{path} has no name in {family.name}'s original checkpoint ({family.hint}); "
                "save this adapter with format='diffusers' or 'peft'"
            )
        name, part = found
        groups.setdefault(name, {})[part] = (path, delta)
    out = {}
    for name, parts in groups.items():
        target = family.targets(name)
        if not target.fused:
            path, delta = parts[0]
            swap = target.swap == ALWAYS or (target.swap == IF_TWO_HALVES and _two_halves(delta))
            out[name] = _swapped_back(delta, path) if swap else delta
            continue
        widths = []
        for index, path in enumerate(target.paths):
            rows = _rows_of(parts[index][1]) if index in parts else out_rows(path)
            if rows is None:
                raise LoraError(f"transformer.{path}: its output width is unknown, so {name} cannot be written whole")
            widths.append(rows)
        if target.sizes(sum(widths)) != widths:
            raise LoraError(f"{name}: its parts' widths {widths} are not the split of {family.name}'s fused projection")
        present = [parts.get(i, (p, None))[1] for i, p in enumerate(target.paths)]
        out[name] = _joined(name, present, widths)
    return out


def _rows_of(delta) -> int | None:
    if isinstance(delta, LoraDelta):
        return int(delta.up.shape[0])
    shape = delta.dense_shape()
    return None if shape is None else int(shape[0])


def _swapped_back(delta, path: str):
    """A modulation's (scale, shift) rows in diffusers' order back to the original (shift, scale)."""
    if isinstance(delta, LoraDelta):
        fields = {n: _swap(getattr(delta, n)) for n in ("up", "up_bias", "magnitude", "bias") if getattr(delta, n) is not None}
        return dataclasses.replace(delta, **fields)
    if delta.kind == "full":
        return dataclasses.replace(delta, factors={k: _swap(v) for k, v in delta.factors.items()}, dora_scale=_swap(delta.dora_scale))
    shape = delta.dense_shape()
    half = shape[0] // 2
    rows = _shift_rows(delta.rows, half, shape[0])
    whole = delta.algorithm.dense_shape({k: tuple(v.shape) for k, v in delta.factors.items()})
    if rows == ((0, whole[0]),):
        rows = None  # the factors' own row order: the file's module, whole
    if delta.dora_scale is not None and delta.dora_scale.shape[0] == shape[0]:
        return dataclasses.replace(delta, rows=rows, dora_scale=_swap(delta.dora_scale))
    if delta.dora_scale is not None:
        raise LoraError(f"transformer.{path}: a DoRA scale on the input axis of a swapped modulation cannot be written back")
    return dataclasses.replace(delta, rows=rows)


def _shift_rows(rows, half: int, total: int):
    """The row ranges that read the halves of ``rows``' selection in the other order."""
    if rows is None:
        return ((half, total), (0, half))
    flat = [r for start, stop in rows for r in range(start, stop)]
    reordered = flat[half:] + flat[:half]
    ranges, start = [], reordered[0]
    for previous, current in zip(reordered, reordered[1:] + [None]):
        if current != previous + 1:
            ranges.append((start, previous + 1))
            start = current
    return tuple(ranges)


def _swap(tensor):
    if tensor is None:
        return None
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _joined(name: str, parts: list, widths: list[int]):
    """One delta over a fused projection's rows from its parts' deltas (None: that part has no LoRA)."""
    present = [d for d in parts if d is not None]
    if all(isinstance(d, LoraDelta) for d in present):
        return _joined_lora(name, parts, widths)
    shared = _shared_factors(parts)
    if shared is not None:
        return shared
    return _joined_dense(name, parts, widths)


def _joined_lora(name: str, parts: list[LoraDelta | None], widths: list[int]) -> LoraDelta:
    present = [d for d in parts if d is not None]
    first = present[0]
    if any(d.down.dim() != 2 for d in present):
        raise LoraError(f"{name}: a fused projection's parts must be linear LoRAs")
    if any(d.bias is not None or d.magnitude is not None for d in present):
        raise LoraError(f"{name}: DoRA or a trained bias on part of a fused projection has no name in the original checkpoint")
    keys = tuple(k for d in present for k in d.keys)
    same = len(present) == len(parts) and all(
        d.down.shape == first.down.shape and torch.equal(d.down, first.down) and d.scale == first.scale
        and d.use_rslora == first.use_rslora and (d.up_bias is None) == (first.up_bias is None) for d in present
    )
    if same:  # one lora_down, one scale: the fused file it was loaded from
        up_bias = torch.cat([d.up_bias for d in present]) if first.up_bias is not None else None
        return LoraDelta(first.down, torch.cat([d.up for d in present]), first.alpha, first.use_rslora, keys=keys, up_bias=up_bias)
    rank = sum(d.rank for d in present)
    dtype = first.up.dtype
    up = torch.zeros(sum(widths), rank, dtype=dtype)
    up_bias = torch.zeros(sum(widths), dtype=dtype) if any(d.up_bias is not None for d in present) else None
    row = col = 0
    for delta, width in zip(parts, widths):
        if delta is not None:
            up[row : row + width, col : col + delta.rank] = (delta.up.float() * delta.scale).to(dtype)
            if delta.up_bias is not None:
                up_bias[row : row + width] = (delta.up_bias.float() * delta.scale).to(dtype)
            col += delta.rank
        row += width
    down = torch.cat([d.down.to(dtype) for d in present])
    return LoraDelta(down, up, float(rank), keys=keys, up_bias=up_bias)


def _shared_factors(parts: list) -> FactorDelta | None:
    """The LyCORIS delta whose rows the parts are, when they are all its rows in order; else None."""
    if any(not isinstance(d, FactorDelta) or d.rows is None for d in parts):
        return None
    first = parts[0]
    same = all(
        d.kind == first.kind and d.alpha == first.alpha and d.factors.keys() == first.factors.keys()
        and all(torch.equal(d.factors[k], first.factors[k]) for k in first.factors) for d in parts
    )
    if not same:
        return None
    rows = [r for d in parts for r in d.rows]
    whole = first.algorithm.dense_shape({k: tuple(v.shape) for k, v in first.factors.items()})
    if whole is None or rows[0][0] != 0 or any(a[1] != b[0] for a, b in zip(rows, rows[1:])) or rows[-1][1] != whole[0]:
        return None
    dora = [d.dora_scale for d in parts]
    if any(t is not None for t in dora):
        if any(t is None for t in dora):
            return None
        dora_scale = torch.cat(dora) if dora[0].shape[0] != 1 else dora[0]
    else:
        dora_scale = None
    keys = tuple(dict.fromkeys(k for d in parts for k in d.keys))
    return FactorDelta(first.kind, dict(first.factors), first.alpha, keys=keys, dora_scale=dora_scale)


def _joined_dense(name: str, parts: list, widths: list[int]) -> FactorDelta:
    """Parts that share nothing: the fused module's full diff, each part's scaled dense rows (zeros for none)."""
    if any(getattr(d, "dora_scale", None) is not None for d in parts):
        raise LoraError(f"{name}: DoRA parts of a fused projection that share no factors cannot be joined into one module")
    blocks, bias_blocks, features = [], [], None
    for delta, width in zip(parts, widths):
        if delta is None:
            blocks.append(None)
            bias_blocks.append(None)
            continue
        dense = _dense_scaled(delta)
        features = dense.shape[1:] if dense is not None else features
        blocks.append(dense)
        bias_blocks.append(_bias_scaled(delta))
    if features is None:
        raise LoraError(f"{name}: its parts change no weight")
    diff = torch.cat([b if b is not None else torch.zeros(w, *features) for b, w in zip(blocks, widths)])
    factors = {"diff": diff}
    if any(b is not None for b in bias_blocks):
        factors["diff_b"] = torch.cat([b if b is not None else torch.zeros(w) for b, w in zip(bias_blocks, widths)])
    keys = tuple(k for d in parts if d is not None for k in d.keys)
    return FactorDelta("full", factors, None, keys=keys)


def _dense_scaled(delta) -> torch.Tensor | None:
    if isinstance(delta, LoraDelta):
        if delta.magnitude is not None or delta.bias is not None:
            raise LoraError("DoRA or a trained bias on part of a fused projection has no name in the original checkpoint")
        return delta.up.float() @ delta.down.float() * delta.scale
    dense = delta.dense(torch.float32)
    return None if dense is None else dense * delta.scale


def _bias_scaled(delta) -> torch.Tensor | None:
    if isinstance(delta, LoraDelta):
        return None if delta.up_bias is None else delta.up_bias.float() * delta.scale
    bias = delta.bias
    return None if bias is None else bias.float()
