"""Flux in Kohya / sd-scripts naming: Black Forest Labs' module names mapped to diffusers' Flux transformer.

sd-scripts trains Flux on BFL's own model, whose attention projections are fused:
``double_blocks_{i}_img_attn_qkv`` is diffusers' ``to_q``/``to_k``/``to_v`` stacked by
rows, and ``single_blocks_{i}_linear1`` is ``to_q``/``to_k``/``to_v``/``proj_mlp``
(``[d, d, d, 4d]``, Flux's MLP ratio 4). A LoRA on a fused projection is one
product ``B @ A`` over the fused output rows; here each diffusers module gets the
same ``A`` tensor (shared, not copied) and its own slice of ``B``'s rows, which
is that product restricted to its rows; a LyCORIS kind keeps its factors whole
and each part takes its rows of their dense product. The final layer's adaLN modulation is
``(shift, scale)`` in BFL's order and ``(scale, shift)`` in diffusers', so its
``B`` rows are swapped.
"""

from __future__ import annotations

import dataclasses
import itertools
import re

import torch

from ..delta import LoraDelta
from ..kinds import dora_on_output, take_rows

_DOUBLE = {
    "img_attn_proj": "attn.to_out.0",
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_mlp_0": "ff.net.0.proj",
    "img_mlp_2": "ff.net.2",
    "img_mod_lin": "norm1.linear",
    "txt_attn_proj": "attn.to_add_out",
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_mlp_0": "ff_context.net.0.proj",
    "txt_mlp_2": "ff_context.net.2",
    "txt_mod_lin": "norm1_context.linear",
}
_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": "proj_out",
    "modulation_lin": "norm.linear",
}
_GLOBAL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}
_BLOCK = re.compile(r"^(double|single)_blocks_(\d+)_(.+)$")


def is_flux(module_names) -> bool:
    """True when a Kohya file's UNet names are BFL Flux names (any double or single block)."""
    return any(_BLOCK.match(name) for name in module_names)


def targets(name: str) -> tuple[str, ...] | str | None:
    """Diffusers path(s) for a BFL module name (a tuple for a fused projection), or None."""
    match = _BLOCK.match(name)
    if match is None:
        return _GLOBAL.get(name)
    kind, index, rest = match.groups()
    table = _DOUBLE if kind == "double" else _SINGLE
    prefix = f"{'transformer_blocks' if kind == 'double' else 'single_transformer_blocks'}.{index}."
    target = table.get(rest)
    if target is None:
        return None
    return tuple(prefix + t for t in target) if isinstance(target, tuple) else prefix + target


def split_rows(name: str, rows: int, parts: int) -> list[int] | None:
    """Row counts of a fused projection's parts: equal thirds for qkv, ``[d, d, d, 4d]`` for linear1."""
    if parts == 4:
        if rows % 7:
            return None
        d = rows // 7
        return [d, d, d, 4 * d]
    if rows % parts:
        return None
    return [rows // parts] * parts


def convert_module(name: str, delta) -> tuple[list[tuple[str, object]], str | None]:
    """``([(diffusers path, delta)], None)`` for one BFL-named module, or ``([], why)``.

    A LoRA on a fused projection is split by rows of ``up`` (``down`` shared); any
    other kind keeps its factors whole, shared by the parts, and each part takes
    its row range of their dense product (a full diff is simply cut by rows, a
    DoRA scale by output rows). The final modulation's rows are swapped.
    """
    target = targets(name)
    if target is None:
        return [], f"'{name}' is no Flux module lora_loader knows (double_blocks_*, single_blocks_*, img_in, ...)"
    return split_module(name, delta, target, swap=name == "final_layer_adaLN_modulation_1")


def split_module(name: str, delta, target: tuple[str, ...] | str, swap: bool) -> tuple[list[tuple[str, object]], str | None]:
    """One original-checkpoint module onto diffusers' module(s) ``target`` (a tuple: a fused projection,
    split by `split_rows`), with its (shift, scale) output halves swapped when ``swap``. Flux and SD3 share it."""
    if isinstance(delta, LoraDelta):
        return _split_lora(name, target, delta, swap)
    if isinstance(target, str) and not swap:
        return [(target, delta)], None
    shape = delta.dense_shape()
    if shape is None:
        return [], f"its {delta.kind} factors do not multiply out to one weight"
    total = shape[0]
    if swap:
        paths, ranges = (target,), [((total // 2, total), (0, total // 2))]
    else:
        sizes = split_rows(name, total, len(target))
        if sizes is None:
            return [], f"its weight has {total} rows, which do not split into the {len(target)} fused projections"
        bounds = [0] + list(itertools.accumulate(sizes))
        paths, ranges = target, [((a, b),) for a, b in zip(bounds, bounds[1:])]
    dora = delta.dora_scale
    if dora is not None and not dora_on_output(dora, shape):
        return [], "a DoRA scale on the input axis of a fused projection spans all its parts and cannot be split"
    out = []
    for path, rows in zip(paths, ranges):
        part_dora = take_rows(dora, rows)
        if delta.kind == "full":  # diff and diff_b are row-indexed already: cut them, nothing to share
            factors = {k: take_rows(v, rows) for k, v in delta.factors.items()}
            out.append((path, dataclasses.replace(delta, factors=factors, dora_scale=part_dora)))
        else:
            out.append((path, dataclasses.replace(delta, rows=rows, dora_scale=part_dora)))
    return out, None


def _split_lora(name: str, target, delta: LoraDelta, swap: bool):
    up, up_bias = delta.up, delta.up_bias  # up_bias: lora_B.bias (Flux Control LoRAs), indexed by output row too
    if up_bias is not None and (up_bias.dim() != 1 or up_bias.shape[0] != up.shape[0]):
        return [], f"lora_B.bias is {list(up_bias.shape)}, expected one value per row of lora_B ([{up.shape[0]}])"
    if swap:
        shift, scale = up.chunk(2, dim=0)
        up = torch.cat([scale, shift], dim=0)
        if up_bias is not None:
            shift, scale = up_bias.chunk(2, dim=0)
            up_bias = torch.cat([scale, shift], dim=0)
    if isinstance(target, str):
        return [(target, LoraDelta(delta.down, up, delta.alpha, delta.use_rslora, keys=delta.keys, up_bias=up_bias))], None
    sizes = split_rows(name, up.shape[0], len(target))
    if sizes is None:
        return [], f"lora_up has {up.shape[0]} rows, which do not split into the {len(target)} fused projections"
    biases = up_bias.split(sizes, dim=0) if up_bias is not None else [None] * len(target)
    out = []
    for path, rows, bias in zip(target, up.split(sizes, dim=0), biases):
        out.append((path, LoraDelta(delta.down, rows, delta.alpha, delta.use_rslora, keys=delta.keys, up_bias=bias)))
    return out, None
