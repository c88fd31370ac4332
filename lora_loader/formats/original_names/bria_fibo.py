"""Bria Fibo 2 (``BriaFibo2Pipeline``, diffusers' ``BriaFibo2Transformer2DModel``): its module names, so a file in them is
read as itself and not as Z-Image's original names, and what tells ``lora-loader inspect`` the family.

diffusers' ``BriaFibo2LoraLoaderMixin`` converts nothing: every producer writes diffusers' names, which load by module
path. Fibo 2's DiT is Z-Image's (``layers.N.attention.to_q``, ``feed_forward.w1``, ``adaLN_modulation.0``,
``noise_refiner``), plus a Perceiver (``perceiver.layers.N.*``) and cross-attention in its injection blocks; its
top-level ``x_embedder`` / ``final_layer.*`` are the names Z-Image's checkpoint has where diffusers' Z-Image says
``all_x_embedder.2-1``. This table names Fibo 2's modules as themselves: a file that names the Perceiver or the
cross-attention is Fibo 2's by the names it knows; one that both tables know (``x_embedder`` beside Z-Image's block
names) reads as Z-Image's for a Z-Image model and as itself for a ``BriaFibo2Transformer2DModel`` (`model_classes`).
"""

from __future__ import annotations

from .engine import Blocks, Family


def _same(*dotted: str) -> dict:
    """``{Kohya-mangled name: the same dotted name}``."""
    return {name.replace(".", "_"): name for name in dotted}


_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "norm_q", "norm_k")
_BLOCK = _same(
    *(f"{attn}.{leaf}" for attn in ("attention", "cross_attention") for leaf in _ATTENTION),
    "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0", "attention_norm1", "attention_norm2",
    "ffn_norm1", "ffn_norm2", "cross_attn_norm1", "cross_attn_norm2",
)  # fmt: skip
_PERCEIVER_BLOCK = _same(
    *(f"{attn}.{leaf}" for attn in ("self_attention", "cross_attention") for leaf in _ATTENTION),
    "ffn.w1", "ffn.w2", "ffn.w3", "cross_attn_norm", "self_attn_norm", "ffn_norm",
)  # fmt: skip

BRIA_FIBO2 = Family(
    "Bria Fibo 2",
    hint="layers_*_attention_to_q, layers_*_cross_attention_to_q, perceiver_layers_*_..., x_embedder, final_layer_linear, ...",
    blocks=(
        Blocks("layers_{i}_", "layers.{i}.", _BLOCK),
        Blocks("noise_refiner_{i}_", "noise_refiner.{i}.", _BLOCK),
        Blocks("perceiver_layers_{i}_", "perceiver.layers.{i}.", _PERCEIVER_BLOCK),
    ),
    modules=_same("x_embedder", "t_embedder.mlp.0", "t_embedder.mlp.2", "final_layer.linear", "final_layer.adaLN_modulation.1",
                  "perceiver.norm_out"),  # fmt: skip
    keep_unknown=True,  # a name the table lacks is kept for the live model to resolve
    key="bria-fibo2",
    model_classes=("BriaFibo2Transformer2DModel",),
    # The Perceiver and the injection blocks' cross-attention: Z-Image has neither.
    detect=(r"^perceiver_(layers_\d+_|norm_out$)", r"^(layers|noise_refiner)_\d+_cross_attention_"),
    header_hints=("fibo",),
)  # fmt: skip
