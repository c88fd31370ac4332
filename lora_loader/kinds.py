"""Transitional re-exports for the converters while `formats/` moves to `algorithms` and `delta` (issue 18)."""

from __future__ import annotations

from .algorithms import ALGORITHMS, algorithm, algorithm_of_suffixes
from .algorithms.dora import dora_on_output, dora_problem
from .algorithms.dora import lycoris_weight as dora_weight
from .delta import FactorDelta as WeightDelta
from .delta import take_rows

FACTORS = {kind: a.factor_keys for kind, a in ALGORITHMS.items()}
NAMES = {kind: a.title for kind, a in ALGORITHMS.items()}
BIAS_FACTOR = {kind: a.bias_factor for kind, a in ALGORITHMS.items() if a.bias_factor}


def kind_of_suffixes(suffixes: set[str]) -> str | None:
    found = algorithm_of_suffixes(suffixes)
    return None if found is None else found.kind


def missing_factors(kind: str, factors: dict) -> list[str]:
    return algorithm(kind).missing(set(factors))


__all__ = ["BIAS_FACTOR", "FACTORS", "NAMES", "WeightDelta", "dora_on_output", "dora_problem", "dora_weight",
           "kind_of_suffixes", "missing_factors", "take_rows"]
