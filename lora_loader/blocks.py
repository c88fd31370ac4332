"""Block weights: UNet blocks as diffusers defines them, DiT blocks by exact module path.

``{"down": 0.2, "mid": 1.0, "up": {"block_1": [0.0, 1.0, 0.5]}}`` is expanded,
like diffusers' ``_maybe_expand_lora_scales``, into one weight per transformer
(``down_blocks.1.attentions.0``, ``mid_block.attentions.0``, ...). Only blocks
with attentions are addressable; a list gives one weight per transformer
(``layers_per_block`` in down blocks, one more in up blocks); parts not named
are 1.0.

A layer then takes its weight as diffusers' ``get_module_weight`` gives it:
the transformer it lives in, else ``{p0}.{p1}.attentions.{p3}`` of its path (so
resnet j and the samplers of a block follow that block's transformer j / 0),
else 1.0. Unlike diffusers, layers outside any block (``conv_in``,
``time_embedding.*``) get 1.0 instead of an IndexError.

A DiT transformer (SD3, Flux) has no down/mid/up blocks; its dict names module
paths, ``{"transformer_blocks.1": 0.25, "single_transformer_blocks": 0.5}``.
diffusers matches those keys as substrings, so ``transformer_blocks.1`` also
hits ``single_transformer_blocks.1`` and ``transformer_blocks.10``; here a key
covers a layer only when it is the layer's path or a dotted prefix of it, the
longest such key wins, and a key that names no module is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import LoraError


@dataclass(frozen=True)
class BlockWeights:
    """One adapter's UNet weights per transformer, keyed by ``down_blocks.i.attentions.j``."""

    per_transformer: dict[str, float]

    def weight_for(self, path: str) -> float:
        parts = path.split(".")
        for cut in (3, 4):  # mid_block.attentions.0 | down_blocks.1.attentions.0
            key = ".".join(parts[:cut])
            if key in self.per_transformer:
                return self.per_transformer[key]
        if len(parts) >= 4:
            return self.per_transformer.get(f"{parts[0]}.{parts[1]}.attentions.{parts[3]}", 1.0)
        return 1.0


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LoraError(f"block weight {where} must be a number, got {value!r}")
    return float(value)


def expand_block_weights(unet: nn.Module, spec: dict) -> BlockWeights:
    """Expand a ``{"down": ..., "mid": ..., "up": ...}`` dict against this UNet's blocks.

    >>> from diffusers import UNet2DConditionModel
    >>> unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=2,
    ...     cross_attention_dim=8, attention_head_dim=2, sample_size=8,
    ...     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    >>> expand_block_weights(unet, {"down": 0.5, "up": {"block_1": [0.0, 1.0]}}).per_transformer
    {'down_blocks.0.attentions.0': 0.5, 'mid_block.attentions.0': 1.0, 'up_blocks.1.attentions.0': 0.0, 'up_blocks.1.attentions.1': 1.0}
    """
    unknown = set(spec) - {"down", "mid", "up"}
    if unknown:
        raise LoraError(f"UNet block weights take the keys 'down', 'mid', 'up'; got {sorted(unknown)}")
    if not hasattr(unet, "down_blocks") or not hasattr(unet, "up_blocks"):
        raise LoraError(f"block weights need a UNet with down/up blocks; {type(unet).__name__} has none")
    per_transformer: dict[str, float] = {}
    for side, blocks in (("down", unet.down_blocks), ("up", unet.up_blocks)):
        with_attn = {i: len(b.attentions) for i, b in enumerate(blocks) if getattr(b, "attentions", None) is not None}
        value = spec.get(side, 1.0)
        if not isinstance(value, dict):
            value = {f"block_{i}": value for i in with_attn}
        bad = set(value) - {f"block_{i}" for i in with_attn}
        if bad:
            raise LoraError(
                f"'{side}' block weights name {sorted(bad)}, but this UNet's {side} blocks with attentions are "
                f"{[f'block_{i}' for i in with_attn]}"
            )
        for i, count in with_attn.items():
            weights = value.get(f"block_{i}", 1.0)
            if not isinstance(weights, list):
                weights = [weights] * count
            elif len(weights) == 1:
                weights = weights * count
            elif len(weights) != count:
                raise LoraError(f"expected {count} weights for {side}.block_{i} (one per transformer), got {len(weights)}")
            for j, w in enumerate(weights):
                per_transformer[f"{side}_blocks.{i}.attentions.{j}"] = _number(w, f"{side}.block_{i}[{j}]")
    mid = spec.get("mid", 1.0)
    if isinstance(mid, list):
        if len(mid) != 1:
            raise LoraError(f"expected 1 weight for 'mid', got {len(mid)}")
        mid = mid[0]
    per_transformer["mid_block.attentions.0"] = _number(mid, "mid")
    order = sorted(per_transformer, key=lambda k: (not k.startswith("down"), not k.startswith("mid"), k))
    return BlockWeights({k: per_transformer[k] for k in order})


@dataclass(frozen=True)
class PathWeights:
    """One adapter's weights by module path (DiT blocks): the longest dotted prefix of a layer's path wins."""

    per_path: dict[str, float]

    def weight_for(self, path: str) -> float:
        while path:
            if path in self.per_path:
                return self.per_path[path]
            path = path.rpartition(".")[0]
        return 1.0


def expand_path_weights(model: nn.Module, spec: dict) -> PathWeights:
    """Check a ``{module path: weight}`` dict against a DiT's modules.

    >>> from torch import nn
    >>> dit = nn.Module()
    >>> dit.transformer_blocks = nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])
    >>> dit.single_transformer_blocks = nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])
    >>> w = expand_path_weights(dit, {"transformer_blocks.1": 0.25, "single_transformer_blocks": 0.5})
    >>> w.weight_for("transformer_blocks.1"), w.weight_for("single_transformer_blocks.1"), w.weight_for("transformer_blocks.0")
    (0.25, 0.5, 1.0)
    """
    names = {name for name, _ in model.named_modules() if name}
    unknown = [key for key in spec if key not in names]
    if unknown:
        blocks = sorted({name.rsplit(".", 1)[0] + ".N" for name in names if name.count(".") == 1 and name.split(".")[1].isdigit()})
        raise LoraError(
            f"block weights name {unknown}, which are not module paths of this {type(model).__name__}; "
            f"use paths such as {blocks[:4]} with N a block index (a whole group by its name, e.g. 'transformer_blocks')"
        )
    return PathWeights({key: _number(value, repr(key)) for key, value in spec.items()})
