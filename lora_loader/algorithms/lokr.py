"""LoKr (LyCORIS): a Kronecker product ``kron(w1, w2)``, each half stored whole or as a low-rank pair.

``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``; ``lokr_w2`` or ``lokr_w2_a @ lokr_w2_b``
(Tucker: with a ``lokr_t2`` core). Scale ``alpha / rank`` with rank the inner
size of the low-rank pair; with both halves whole there is nothing low-rank to
normalise and the scale is 1, as LyCORIS defines it.

>>> import torch
>>> f = {"lokr_w1": torch.ones(2, 2), "lokr_w2": torch.ones(3, 4)}
>>> LOKR.scale(f, 4.0), tuple(LOKR.dense(f).shape)
(1.0, (6, 8))
"""

from __future__ import annotations

import math

import torch

from .base import Algorithm, tucker


class Lokr(Algorithm):
    kind = "lokr"
    title = "LoKr"
    factor_keys = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def claims(self, factors):
        return any(s.startswith("lokr_") for s in factors)

    def missing(self, have):
        need = set()
        if "lokr_w1" not in have:
            need |= {"lokr_w1_a", "lokr_w1_b"}
        if "lokr_w2" not in have:
            need |= {"lokr_w2_a", "lokr_w2_b"}
        return sorted(need - have)

    def rank(self, f):
        if "lokr_w1_b" in f:
            return int(f["lokr_w1_b"].shape[0])
        if "lokr_w2_b" in f:
            return int(f["lokr_w2_b"].shape[0])
        return 1

    def scale(self, f, alpha):
        if "lokr_w1" in f and "lokr_w2" in f:
            return 1.0
        return super().scale(f, alpha)

    def dense(self, f, base_weight=None):
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
        elif "lokr_t2" in f:
            w2 = tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
        else:
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"].flatten(1)
        # kron over [a, c] x [b, d*k*k] equals LyCORIS' kron over [a, c, 1, 1] x [b, d, k, k] once viewed
        # as [a*b, c*d, k, k]; contiguous, or torch.kron fails on a Tucker rebuild (ComfyUI's bug).
        return torch.kron(w1.contiguous(), w2.flatten(1).contiguous())

    def dense_shape(self, s):
        if "lokr_w1" in s:
            w1 = s["lokr_w1"]
        elif s["lokr_w1_a"][1] == s["lokr_w1_b"][0]:
            w1 = (s["lokr_w1_a"][0], s["lokr_w1_b"][1])
        else:
            return None
        if "lokr_w2" in s:
            w2 = (s["lokr_w2"][0], math.prod(s["lokr_w2"][1:]))
        elif "lokr_t2" in s:
            t, a, b = s["lokr_t2"], s["lokr_w2_a"], s["lokr_w2_b"]
            if t[0] != a[0] or t[1] != b[0]:
                return None
            w2 = (a[1], b[1] * math.prod(t[2:]))
        elif s["lokr_w2_a"][1] == s["lokr_w2_b"][0]:
            w2 = (s["lokr_w2_a"][0], math.prod(s["lokr_w2_b"][1:]))
        else:
            return None
        if len(w1) != 2:
            return None
        return (w1[0] * w2[0], w1[1] * w2[1])


LOKR = Lokr()
