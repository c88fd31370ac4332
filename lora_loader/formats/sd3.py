"""SD3 in its original (Stability "MMDiT") module names, as sd-scripts and ComfyUI write them.

``joint_blocks_{i}_x_block_attn_qkv`` is diffusers' ``transformer_blocks.{i}.attn.to_q``/``to_k``/``to_v``
stacked by rows (``context_block`` the ``add_*_proj`` ones, ``attn2`` SD3.5's second attention),
``mlp_fc1``/``fc2`` the feed-forwards, ``adaLN_modulation_1`` the norms' linears. The last
block's context modulation and the final layer's have two halves, ``(shift, scale)`` in
Stability's order and ``(scale, shift)`` in diffusers'; they are recognised by their
shape (two rows per input feature, where the others have six), so a file that targets a
subset of blocks needs no block count. Fused projections are split as for Flux
(`flux.split_module`).
"""

from __future__ import annotations

import re

from ..delta import LoraDelta
from .flux import split_module

_BLOCK = re.compile(r"^joint_blocks_(\d+)_(x_block|context_block)_(.+)$")
_X = {
    "attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "attn_proj": "attn.to_out.0",
    "attn2_qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "attn2_proj": "attn2.to_out.0",
    "mlp_fc1": "ff.net.0.proj",
    "mlp_fc2": "ff.net.2",
    "adaLN_modulation_1": "norm1.linear",
}
_CONTEXT = {
    "attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "attn_proj": "attn.to_add_out",
    "mlp_fc1": "ff_context.net.0.proj",
    "mlp_fc2": "ff_context.net.2",
    "adaLN_modulation_1": "norm1_context.linear",
}
_GLOBAL = {
    "x_embedder_proj": "pos_embed.proj",
    "context_embedder": "context_embedder",
    "t_embedder_mlp_0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder_mlp_2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder_mlp_0": "time_text_embed.text_embedder.linear_1",
    "y_embedder_mlp_2": "time_text_embed.text_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}


def is_sd3(module_names) -> bool:
    """True when a Kohya file's UNet names are SD3's original names (any joint block)."""
    return any(_BLOCK.match(name) for name in module_names)


def targets(name: str) -> tuple[str, ...] | str | None:
    match = _BLOCK.match(name)
    if match is None:
        return _GLOBAL.get(name)
    index, stream, rest = match.groups()
    target = (_X if stream == "x_block" else _CONTEXT).get(rest)
    if target is None:
        return None
    prefix = f"transformer_blocks.{index}."
    return tuple(prefix + t for t in target) if isinstance(target, tuple) else prefix + target


def _two_halves(delta) -> bool:
    """A modulation with (shift, scale) only: two output rows per input feature."""
    if isinstance(delta, LoraDelta):
        rows, features = delta.up.shape[0], delta.down.shape[1]
    else:
        shape = delta.dense_shape()
        if shape is None:
            return False
        rows, features = shape[0], shape[1]
    return rows == 2 * features


def convert_module(name: str, delta) -> tuple[list[tuple[str, object]], str | None]:
    """``([(diffusers path, delta)], None)`` for one SD3-named module, or ``([], why)``."""
    target = targets(name)
    if target is None:
        return [], f"'{name}' is no SD3 module lora_loader knows (joint_blocks_*_x_block_*, context_embedder, ...)"
    swap = name.endswith("adaLN_modulation_1") and (name.startswith("final_layer") or "context_block" in name) and _two_halves(delta)
    return split_module(name, delta, target, swap=swap)
