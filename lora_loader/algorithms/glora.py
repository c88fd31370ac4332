"""GLoRA (LyCORIS): ``W + s (W A + B)``, both ``A`` and ``B`` low-rank; the delta reads the base weight.

Keys as LyCORIS' ``GLoRAModule`` saves them: ``a1.weight`` [in, r], ``a2.weight`` [r, in]
(``A = a1 @ a2``, applied to W's input axis), ``b1.weight`` [out, r], ``b2.weight``
[r, in, kh, kw] (``B = b1 @ b2``; with ``bm.weight`` [r, r, kh, kw] a Tucker core
between them); convolutions keep 1x1 axes on ``a1``, ``a2``, ``b1``. Scale
``alpha / r``, r = ``a2``'s rows. LyCORIS 1.x wrote the pairs the other way round
(``a1`` [r, in], ``a2`` [in, r], ``b1`` [r, in], ``b2`` [out, r]: ``W a2 a1 + b2 b1``),
read as ComfyUI reads it.

>>> import torch
>>> f = {"a1.weight": torch.zeros(4, 2), "a2.weight": torch.zeros(2, 4),
...      "b1.weight": torch.ones(3, 2), "b2.weight": torch.ones(2, 4)}
>>> GLORA.rank(f), GLORA.dense_shape({k: tuple(v.shape) for k, v in f.items()}), GLORA.dense(f, torch.ones(3, 4))[0, 0].item()
(2, (3, 4), 2.0)
"""

from __future__ import annotations

import math

import torch

from ..errors import LoraError
from .base import Algorithm, tucker

A1, A2, B1, B2, BM = "a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight"


def _flat(s: tuple) -> tuple[int, int]:
    return (s[0], math.prod(s[1:]))


def _is_old(s: dict) -> bool:
    """LyCORIS 1.x's order (ComfyUI's test): only when the new order does not chain."""
    a1, a2, b1, b2 = (_flat(s[k]) for k in (A1, A2, B1, B2))
    new = b2[0] == b1[1] == a1[1] == a2[0]
    return not new and b2[1] == b1[0] == a1[0] == a2[1] and BM not in s


class Glora(Algorithm):
    kind = "glora"
    title = "GLoRA"
    factor_keys = (A1, A2, B1, B2, BM)
    required_keys = (A1, A2, B1, B2)
    uses_base_weight = True

    def claims(self, factors):
        return bool(set(factors) & {A1, A2, B1, B2})

    def rank(self, f):
        if _is_old({k: tuple(v.shape) for k, v in f.items()}):
            return int(f[A1].shape[0])
        return int(f[A2].shape[0])

    def dense(self, f, base_weight=None):
        if base_weight is None:
            raise LoraError("a GLoRA delta multiplies the layer's own weight: it has no dense form without that "
                            "weight (as a merge of adapters or a join of a fused projection's parts would need)")
        a1, a2, b1, b2 = (f[k].flatten(1) for k in (A1, A2, B1, B2))
        w = base_weight.to(a1.dtype)
        if _is_old({k: tuple(v.shape) for k, v in f.items()}):
            return (b2 @ b1).reshape(w.shape) + (w.flatten(1) @ a2 @ a1).reshape(w.shape)
        if BM in f:
            wb = tucker(f[BM], b1.T, b2)
        else:
            wb = (b1 @ b2).reshape(w.shape)
        wa = torch.einsum("oi...,ij->oj...", torch.einsum("oi...,ij->oj...", w, a1), a2)
        return wb.reshape(w.shape) + wa

    def dense_shape(self, s):
        if _is_old(s):
            a1, a2, b1, b2 = (_flat(s[k]) for k in (A1, A2, B1, B2))
            return (b2[0], b1[1]) if a2[0] == a1[1] == b1[1] else None
        a1, a2, b1 = (_flat(s[k]) for k in (A1, A2, B1))
        b2 = s[B2]
        if not (a1[1] == a2[0] and a1[0] == a2[1] == b2[1]):
            return None
        if BM in s:
            bm = s[BM]
            if len(bm) < 2 or bm[0] != b1[1] or bm[1] != b2[0] or math.prod(b2[2:]) != 1:
                return None
            return (b1[0], b2[1], *bm[2:])
        if b1[1] != b2[0]:
            return None
        return (b1[0], math.prod(b2[1:]))


GLORA = Glora()
