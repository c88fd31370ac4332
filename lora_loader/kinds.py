"""Delta kinds beyond plain LoRA: LyCORIS LoCon with Tucker, LoHa, LoKr, full diffs, and Kohya DoRA.

Each kind is a rule that rebuilds a dense weight delta from a few named
factors, exactly as LyCORIS' forward pass does (``lycoris/functional``):

=============  ==========================================================  =========================
kind           factors (the file's suffixes)                                dense delta (before scale)
=============  ==========================================================  =========================
``lora``       ``lora_down.weight``, ``lora_up.weight``                     ``up @ down``
``locon``      ``lora_down.weight`` [r,in,1,1], ``lora_mid.weight``         Tucker: ``mid`` x ``up`` x ``down``
               [r,r,kh,kw], ``lora_up.weight`` [out,r,1,1]
``loha``       ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``   ``(w1a @ w1b) * (w2a @ w2b)``
               (Tucker: ``hada_t1``, ``hada_t2``)
``lokr``       ``lokr_w1`` or ``lokr_w1_a``/``_b``, ``lokr_w2`` or          ``kron(w1, w2)``
               ``lokr_w2_a``/``_b`` (Tucker: ``lokr_t2``)
``full``       ``diff`` (and ``diff_b`` for the bias)                       ``diff``
``norm``       ``w_norm``, ``b_norm`` on a LayerNorm / GroupNorm            ``w_norm``
=============  ==========================================================  =========================

Scale is ``alpha / rank`` (alpha absent or 0 means rank); LoKr with both halves
stored whole, full and norm diffs have scale 1, as LyCORIS defines them. A norm
diff changes the affine part of a norm: ``normalize(x) * w_norm + b_norm`` is
added to the output. A
``dora_scale`` beside any kind makes it DoRA: the merged weight's rows (or
columns, when ``dora_scale`` is ``[1, in, ...]``) are rescaled to
``dora_scale``, and blend weight ``m`` gives ``W + m * (W_dora - W)``, so
weight 0 is the base model exactly (LyCORIS' own multiplier leaves the
direction change in at 0; ComfyUI and A1111 interpolate as here).

Plain LoRA without ``dora_scale`` never comes here: `delta.LoraDelta` and its
fast paths handle it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# The suffixes each kind reads, beside the shared ``alpha`` and ``dora_scale``.
FACTORS = {
    "lora": ("lora_down.weight", "lora_up.weight"),
    "locon": ("lora_down.weight", "lora_mid.weight", "lora_up.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "full": ("diff", "diff_b"),
    "norm": ("w_norm", "b_norm"),
}
NAMES = {"lora": "LoRA", "locon": "LoCon (Tucker)", "loha": "LoHa", "lokr": "LoKr", "full": "full diff", "norm": "norm diff"}
# The factor that is a bias change, added to the module's output (not part of the dense weight delta).
BIAS_FACTOR = {"full": "diff_b", "norm": "b_norm"}


def kind_of_suffixes(suffixes: set[str]) -> str | None:
    """The kind a module's key suffixes describe, or None when they mix kinds or miss a factor."""
    factors = suffixes - {"alpha", "dora_scale"}
    if "lora_mid.weight" in factors:
        kind = "locon"
    elif factors and factors <= set(FACTORS["lora"]):
        kind = "lora"
    elif any(s.startswith("hada_") for s in factors):
        kind = "loha"
    elif any(s.startswith("lokr_") for s in factors):
        kind = "lokr"
    elif factors & {"diff", "diff_b"}:
        kind = "full"
    elif factors & {"w_norm", "b_norm"}:
        kind = "norm"
    else:
        return None
    if not factors <= set(FACTORS[kind]):
        return None
    return kind


def missing_factors(kind: str, factors: dict) -> list[str]:
    """The factors a module of this kind still needs (empty when complete)."""
    have = set(factors)
    if kind in ("lora", "locon"):
        need = set(FACTORS[kind])
    elif kind == "loha":
        need = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
        if have & {"hada_t1", "hada_t2"}:
            need |= {"hada_t1", "hada_t2"}
    elif kind == "lokr":
        need = set()
        if "lokr_w1" not in have:
            need |= {"lokr_w1_a", "lokr_w1_b"}
        if "lokr_w2" not in have:
            need |= {"lokr_w2_a", "lokr_w2_b"}
    else:  # full and norm diffs: the weight part, the bias part or both
        need = set()
    return sorted(need - have)


@dataclass
class WeightDelta:
    """A delta rebuilt densely from named factors (see the module docstring for the kinds).

    >>> d = WeightDelta("loha", {"hada_w1_a": torch.ones(6, 2), "hada_w1_b": torch.ones(2, 4),
    ...                          "hada_w2_a": torch.ones(6, 2), "hada_w2_b": torch.ones(2, 4)}, alpha=1.0)
    >>> d.rank, d.scale, tuple(d.dense().shape)
    (2, 0.5, (6, 4))
    """

    kind: str
    factors: dict[str, torch.Tensor]
    alpha: float | None = None
    keys: tuple[str, ...] = field(default_factory=tuple)
    dora_scale: torch.Tensor | None = None
    # Row ranges [start, stop) of the factors' dense product, concatenated: one part of a fused
    # projection (Flux's qkv, linear1) whose factors are shared with the other parts, as a fused
    # LoRA shares its A, or rows in another order (Flux's final modulation, (shift, scale) swapped).
    rows: tuple[tuple[int, int], ...] | None = None

    @property
    def rank(self) -> int:
        return factor_rank(self.kind, self.factors)

    @property
    def scale(self) -> float:
        return kind_scale(self.kind, self.factors, self.alpha)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.factors.get(BIAS_FACTOR.get(self.kind, ""))

    def tensors(self) -> list[torch.Tensor]:
        return list(self.factors.values()) + ([self.dora_scale] if self.dora_scale is not None else [])

    def is_all_zero(self) -> bool:
        # A DoRA scale is never "nothing": with a zero delta it still rescales the rows.
        return self.dora_scale is None and all(not bool(t.any()) for t in self.factors.values())

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """The unscaled dense weight delta (None for a bias-only full diff)."""
        return take_rows(dense(self.kind, {k: v.to(dtype) for k, v in self.factors.items()}), self.rows)

    def dense_shape(self) -> tuple[int, ...] | None:
        """The dense delta's shape, from the factor shapes alone (None when they do not chain)."""
        shape = dense_shape(self.kind, {k: tuple(v.shape) for k, v in self.factors.items()})
        if self.rows is None or shape is None:
            return shape
        if not all(0 <= start < stop <= shape[0] for start, stop in self.rows):
            return None
        return (sum(stop - start for start, stop in self.rows), *shape[1:])


def take_rows(tensor: torch.Tensor | None, rows: tuple[tuple[int, int], ...] | None) -> torch.Tensor | None:
    """``tensor``'s row ranges, concatenated (all of it when ``rows`` is None)."""
    if tensor is None or rows is None:
        return tensor
    if len(rows) == 1:
        return tensor[rows[0][0] : rows[0][1]]
    return torch.cat([tensor[start:stop] for start, stop in rows])


def factor_rank(kind: str, f: dict) -> int:
    if kind in ("lora", "locon"):
        return int(f["lora_down.weight"].shape[0])
    if kind == "loha":
        return int(f["hada_w1_b"].shape[0])
    if kind == "lokr":
        if "lokr_w1_b" in f:
            return int(f["lokr_w1_b"].shape[0])
        if "lokr_w2_b" in f:
            return int(f["lokr_w2_b"].shape[0])
        return 1
    return 1


def kind_scale(kind: str, f: dict, alpha: float | None) -> float:
    if kind in ("full", "norm") or (kind == "lokr" and "lokr_w1" in f and "lokr_w2" in f):
        return 1.0  # LyCORIS: nothing low-rank to normalise
    rank = factor_rank(kind, f)
    return float(rank if alpha in (None, 0) else alpha) / rank


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS' ``rebuild_tucker``: core ``t`` [r, r, k...] with modes ``wa`` [r, out] and ``wb`` [r, in]."""
    return torch.einsum("ij...,ip,jr->pr...", t, wa, wb)


def dense(kind: str, f: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Rebuild the unscaled dense delta of one kind from its factors (all in one dtype)."""
    if kind == "lora":
        down, up = f["lora_down.weight"], f["lora_up.weight"]
        product = up.flatten(1) @ down.flatten(1)
        return product.view(up.shape[0], *down.shape[1:]) if down.dim() > 2 else product
    if kind == "locon":
        down, mid, up = f["lora_down.weight"], f["lora_mid.weight"], f["lora_up.weight"]
        return torch.einsum("ij...,ip,jr->pr...", mid, up.flatten(1).T, down.flatten(1))
    if kind == "loha":
        if "hada_t1" in f:
            one = _tucker(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"])
            two = _tucker(f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"])
            return one * two
        return (f["hada_w1_a"] @ f["hada_w1_b"].flatten(1)) * (f["hada_w2_a"] @ f["hada_w2_b"].flatten(1))
    if kind == "lokr":
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
        elif "lokr_t2" in f:
            w2 = _tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
        else:
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"].flatten(1)
        # kron over [a, c] x [b, d*k*k] equals LyCORIS' kron over [a, c, 1, 1] x [b, d, k, k] once viewed
        # as [a*b, c*d, k, k]; contiguous, or torch.kron fails on a Tucker rebuild (ComfyUI's bug).
        return torch.kron(w1.contiguous(), w2.flatten(1).contiguous())
    if kind == "full":
        return f.get("diff")
    if kind == "norm":
        return f.get("w_norm")
    raise AssertionError(kind)


def dense_shape(kind: str, s: dict[str, tuple]) -> tuple[int, ...] | None:
    """The shape `dense` would return, or None when the factor shapes do not chain."""
    try:
        if kind == "lora":
            down, up = s["lora_down.weight"], s["lora_up.weight"]
            if up[1] != down[0] or any(k != 1 for k in up[2:]):
                return None
            return (up[0], *down[1:])
        if kind == "locon":
            down, mid, up = s["lora_down.weight"], s["lora_mid.weight"], s["lora_up.weight"]
            if len(mid) != 4 or up[1] != mid[0] or down[0] != mid[1] or any(k != 1 for k in (*down[2:], *up[2:])):
                return None
            return (up[0], down[1], *mid[2:])
        if kind == "loha":
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
        if kind == "lokr":
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
        if kind == "full":
            return s.get("diff")
        if kind == "norm":
            return s.get("w_norm")
    except (KeyError, IndexError):
        return None
    raise AssertionError(kind)


def dora_weight(combined: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """LyCORIS' weight decomposition: ``combined`` rescaled to ``dora_scale`` per output row
    (``dora_scale`` [out, 1, ...]) or per input column ([1, in, ...]); ``+ eps`` as LyCORIS."""
    eps = torch.finfo(combined.dtype).eps
    if dora_on_output(dora_scale, combined.shape):
        norm = combined.reshape(combined.shape[0], -1).norm(dim=1).view(-1, *[1] * (combined.dim() - 1))
        scale = dora_scale.reshape(norm.shape).to(combined.dtype)
    else:
        moved = combined.transpose(0, 1)
        norm = moved.reshape(moved.shape[0], -1).norm(dim=1).view(1, -1, *[1] * (combined.dim() - 2))
        scale = dora_scale.reshape(norm.shape).to(combined.dtype)
    return combined * (scale / (norm + eps))


def dora_on_output(dora_scale: torch.Tensor, weight_shape) -> bool:
    """True for LyCORIS' default ``wd_on_out`` layout ``[out, 1, ...]`` (also a 1-D ``[out]``)."""
    if dora_scale.dim() >= 2:
        return dora_scale.shape[0] == weight_shape[0] and (dora_scale.shape[1] == 1 or weight_shape[1] == 1)
    return dora_scale.numel() == weight_shape[0]


def dora_problem(dora_scale: torch.Tensor, weight_shape) -> str | None:
    out_axis = dora_scale.numel() == weight_shape[0] and (dora_scale.dim() < 2 or dora_scale.shape[1] == 1)
    in_axis = dora_scale.dim() >= 2 and dora_scale.shape[0] == 1 and dora_scale.numel() == weight_shape[1]
    if out_axis or in_axis:
        return None
    return f"dora_scale is {list(dora_scale.shape)}; expected [{weight_shape[0]}, 1, ...] or [1, {weight_shape[1]}, ...]"
