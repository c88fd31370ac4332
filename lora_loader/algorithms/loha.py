"""LoHa (LyCORIS): the Hadamard product of two low-rank products, ``(w1a @ w1b) * (w2a @ w2b)``.

With Tucker cores (``hada_t1``, ``hada_t2``) each product is rebuilt as LyCORIS'
``rebuild_tucker`` does. Scale ``alpha / rank``, rank being ``hada_w1_b``'s rows.

>>> import torch
>>> f = {k: torch.ones(2, 4) if k.endswith("_b") else torch.ones(6, 2) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
>>> LOHA.rank(f), LOHA.scale(f, 1.0), tuple(LOHA.dense(f).shape)
(2, 0.5, (6, 4))
"""

from __future__ import annotations

import math

from .base import Algorithm, tucker


class Loha(Algorithm):
    kind = "loha"
    title = "LoHa"
    factor_keys = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    required_keys = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def claims(self, factors):
        return any(s.startswith("hada_") for s in factors)

    def missing(self, have):
        need = set(self.required_keys)
        if have & {"hada_t1", "hada_t2"}:
            need |= {"hada_t1", "hada_t2"}
        return sorted(need - have)

    def rank(self, f):
        return int(f["hada_w1_b"].shape[0])

    def dense(self, f, base_weight=None):
        if "hada_t1" in f:
            return tucker(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"]) * tucker(f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"])
        return (f["hada_w1_a"] @ f["hada_w1_b"].flatten(1)) * (f["hada_w2_a"] @ f["hada_w2_b"].flatten(1))

    def dense_shape(self, s):
        if "hada_t1" in s:
            shapes = []
            for t, a, b in (("hada_t1", "hada_w1_a", "hada_w1_b"), ("hada_t2", "hada_w2_a", "hada_w2_b")):
                if s[t][0] != s[a][0] or s[t][1] != s[b][0]:
                    return None
                shapes.append((s[a][1], s[b][1], *s[t][2:]))
            return shapes[0] if shapes[0] == shapes[1] else None
        one, two = (s["hada_w1_a"], s["hada_w1_b"]), (s["hada_w2_a"], s["hada_w2_b"])
        if one[0][1] != one[1][0] or two[0][1] != two[1][0]:
            return None
        a = (one[0][0], math.prod(one[1][1:]))
        return a if a == (two[0][0], math.prod(two[1][1:])) else None


LOHA = Loha()
