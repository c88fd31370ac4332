"""Adapter algorithms, one module each, found by kind.

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
``oft``        ``oft_blocks`` [n,b,b] (OFT) or [m,n,b,b] (BOFT), ``rescale``,  ``R W - W`` (base weight)
               ``alpha`` (the constraint, not a scale)
``glora``      ``a1.weight``, ``a2.weight``, ``b1.weight``, ``b2.weight``    ``W a1 a2 + b1 b2`` (base weight)
               (Tucker: ``bm.weight``)
=============  ==========================================================  =========================

DoRA (`dora`) is a variant of any of them. A new algorithm is one module
declaring an `Algorithm` and one entry in `ALGORITHMS`.

>>> algorithm_of_suffixes({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}).title
'LoHa'
"""

from __future__ import annotations

from .base import Algorithm
from .diff import FULL, NORM
from .glora import GLORA
from .lokr import LOKR
from .loha import LOHA
from .lora import LOCON, LORA
from .oft import OFT

# In the order a module's suffixes are tried: LoCon's lora_mid before plain LoRA's pair.
ALGORITHMS: dict[str, Algorithm] = {a.kind: a for a in (LOCON, LORA, LOHA, LOKR, FULL, NORM, OFT, GLORA)}
# Suffixes any algorithm's module may carry beside its factors.
SHARED_KEYS = ("alpha", "dora_scale")


def algorithm(kind: str) -> Algorithm:
    """The algorithm of ``kind`` ("lora", "locon", "loha", "lokr", "full", "norm", "oft", "glora")."""
    return ALGORITHMS[kind]


def algorithm_of_suffixes(suffixes: set[str]) -> Algorithm | None:
    """The algorithm a module's key suffixes describe, or None when they mix algorithms or match none."""
    factors = set(suffixes) - set(SHARED_KEYS)
    for candidate in ALGORITHMS.values():
        if candidate.claims(factors):
            return candidate if factors <= set(candidate.factor_keys) else None
    return None


def all_factor_keys() -> set[str]:
    """Every factor suffix some algorithm reads."""
    return {key for a in ALGORITHMS.values() for key in a.factor_keys}
