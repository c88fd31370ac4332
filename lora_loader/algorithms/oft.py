"""OFT and BOFT (LyCORIS ``diag-oft`` / ``boft``): the base weight's output rows rotated, ``R W - W``.

One kind for both, told apart by the rank of ``oft_blocks`` as LyCORIS' and
ComfyUI's loaders do:

- OFT: ``oft_blocks`` [n, b, b]; ``R`` is block diagonal, block ``k`` the Cayley
  transform ``(I + Q)(I - Q)^-1`` of ``Q = B - B^T``; the new weight's rows of
  block ``k`` are ``R_k^T W_k``.
- BOFT: ``oft_blocks`` [m, n, b, b]: ``m`` butterfly stages of such blocks, stage
  ``i`` mixing rows ``2^i b / 2`` apart.

``rescale`` [out, 1, ...] (optional) multiplies the rotated rows. The ``alpha``
key is no scale but the constraint: ``||Q||`` is capped at ``alpha * out`` (0:
uncapped), so it is kept among the factors (`alpha_in_factors`) and written
back as it was; the scale is 1. The delta depends on the base weight
(`uses_base_weight`), so blending at ``w`` gives ``W + w (R W - W)``.

>>> import torch
>>> f = {"oft_blocks": torch.zeros(2, 3, 3)}
>>> w = torch.randn(6, 4)
>>> OFT.scale(f, None), OFT.dense_shape({"oft_blocks": (2, 3, 3)}), bool(OFT.dense(f, w).abs().max() == 0)
(1.0, (6,), True)
"""

from __future__ import annotations

import math

import torch

from ..errors import LoraError
from .base import Algorithm


def cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """``(I + Q)(I - Q)^-1`` per block, ``Q = B - B^T`` scaled down to norm ``constraint`` when above it (LyCORIS' ``get_r``)."""
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = torch.norm(q) + 1e-8
        if norm > constraint:
            q = q * constraint / norm
    return (eye + q) @ (eye - q).float().inverse().to(q.dtype)


class Oft(Algorithm):
    kind = "oft"
    title = "OFT / BOFT"
    factor_keys = ("oft_blocks", "rescale", "alpha")
    required_keys = ("oft_blocks",)
    uses_base_weight = True
    alpha_in_factors = True

    def claims(self, factors):
        return "oft_blocks" in factors

    def rank(self, f):
        return int(f["oft_blocks"].shape[-3])  # the block count: sd-scripts' network_dim, LyCORIS' "equivalent lora_dim"

    def scale(self, factors, alpha):
        return 1.0

    def constraint(self, f, out: int) -> float:
        alpha = f.get("alpha")
        return 0.0 if alpha is None else float(alpha.detach().float().reshape(-1)[0]) * out

    def dense(self, f, base_weight=None):
        if base_weight is None:
            raise LoraError("an OFT / BOFT delta is a rotation of the layer's own weight: it has no dense form without that "
                            "weight (as a merge of adapters or a join of a fused projection's parts would need)")
        blocks, rescale = f["oft_blocks"], f.get("rescale")
        w = base_weight.to(blocks.dtype)
        out, *rest = w.shape
        r = cayley(blocks, self.constraint(f, out))
        if blocks.dim() == 3:  # OFT: rows of block k become R_k^T W_k
            n, b, _ = blocks.shape
            new = torch.einsum("knm,kn...->km...", r, w.reshape(n, b, *rest)).reshape(w.shape)
        else:  # BOFT: LyCORIS' butterfly, stage i grouping rows 2^i * b/2 apart
            m, _, b, _ = blocks.shape
            new = w
            for i in range(m):
                k = 2**i * (b // 2)
                new = new.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
                new = torch.einsum("bij,bj...->bi...", r[i], new)
                new = new.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
        if rescale is not None:
            new = new * rescale.to(new.dtype).reshape(out, *([1] * len(rest)))
        return new - w

    def dense_shape(self, s):
        blocks = s["oft_blocks"]
        if len(blocks) not in (3, 4) or blocks[-1] != blocks[-2]:
            return None
        n, b = blocks[-3], blocks[-1]
        out = n * b
        if len(blocks) == 4 and blocks[0] > 1 and (b % 2 or n % 2 ** (blocks[0] - 1)):
            return None  # the butterfly's strides do not divide the rows
        rescale = s.get("rescale")
        if rescale is not None and (not rescale or rescale[0] != out or math.prod(rescale) != out):
            return None
        if "alpha" in s and math.prod(s["alpha"]) != 1:
            return None
        return (out,)


OFT = Oft()
