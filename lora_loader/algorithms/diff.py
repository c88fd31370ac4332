"""Full and norm diffs (LyCORIS): the delta itself, stored whole; scale 1 (nothing low-rank to normalise).

A full diff (``diff``, and ``diff_b`` for the bias) applies to any weight; a norm
diff (``w_norm``, ``b_norm``) to the affine part of a LayerNorm / GroupNorm, where
``normalize(x) * w_norm + b_norm`` is added to the output. Either may carry its
bias part alone.

>>> import torch
>>> FULL.dense({"diff": torch.ones(2, 3)}).shape, FULL.scale({"diff": torch.ones(2, 3)}, 4.0)
(torch.Size([2, 3]), 1.0)
"""

from __future__ import annotations

from .base import Algorithm


class WholeDiff(Algorithm):
    weight_key: str = ""

    def claims(self, factors):
        return bool(factors & set(self.factor_keys))

    def scale(self, f, alpha):
        return 1.0

    def dense(self, f, base_weight=None):
        return f.get(self.weight_key)

    def dense_shape(self, s):
        return s.get(self.weight_key)


class FullDiff(WholeDiff):
    kind = "full"
    title = "full diff"
    factor_keys = ("diff", "diff_b")
    weight_key, bias_factor = "diff", "diff_b"


class NormDiff(WholeDiff):
    kind = "norm"
    title = "norm diff"
    factor_keys = ("w_norm", "b_norm")
    weight_key, bias_factor = "w_norm", "b_norm"


FULL = FullDiff()
NORM = NormDiff()
