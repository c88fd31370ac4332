"""The canonical form every format converts to: one delta per targeted module.

A converter turns a file's raw keys into ``{(component, module_name): delta}``;
`inject` then matches the names to live modules and builds layers from the
deltas. Saving goes the other way, from live adapters back to deltas.

Two kinds of delta, one vocabulary (``rank``, ``scale``, ``keys``, ``tensors()``):

- `LoraDelta`: a low-rank pair ``down`` / ``up`` as PEFT and diffusers name it, with
  PEFT's extras (DoRA magnitude, dropout, biases). Runs unfused as two matmuls.
- `FactorDelta`: any algorithm's factors as the file names them (LoHa, LoKr, full and
  norm diffs, LoCon with Tucker, a Kohya LoRA with ``dora_scale``); its algorithm
  (`algorithms`) rebuilds the dense delta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .algorithms import algorithm
from .algorithms.lora import low_rank_product


@dataclass
class LoraDelta:
    """A low-rank update ``delta_W = scale * up @ down``.

    ``down`` is ``[rank, in]`` (Linear) or ``[rank, in, kh, kw]`` (Conv2d, the
    "LoCon" case when kh, kw > 1); ``up`` is ``[out, rank]`` or
    ``[out, rank, 1, 1]``. ``alpha`` absent means ``alpha = rank`` (scale 1), as
    sd-scripts and PEFT both define it. ``keys`` are the file's keys that
    produced this delta, for error messages and load reports.

    >>> d = LoraDelta(down=torch.ones(4, 16), up=torch.ones(8, 4), alpha=2.0)
    >>> d.rank, d.scale
    (4, 0.5)
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    use_rslora: bool = False
    keys: tuple[str, ...] = field(default_factory=tuple)
    magnitude: torch.Tensor | None = None  # DoRA: per-output-row magnitude (PEFT's lora_magnitude_vector)
    dropout: float = 0.0  # applied to the adapter's input in training mode only
    bias: torch.Tensor | None = None  # PEFT's bias="lora_only"/"all": the module's bias while the adapter is on
    # PEFT's lora_bias=True (``lora_B.bias``, as Flux Control LoRAs carry): added to the LoRA's output
    # before its scale, so the layer's output gains ``weight * scale * up_bias``.
    up_bias: torch.Tensor | None = None

    kind = "lora"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        alpha = float(self.rank if self.alpha is None else self.alpha)
        if self.use_rslora:
            return alpha / math.sqrt(self.rank)
        return alpha / self.rank

    def tensors(self) -> list[torch.Tensor]:
        return [self.down, self.up] + [t for t in (self.magnitude, self.bias, self.up_bias) if t is not None]

    def is_all_zero(self) -> bool:
        return all(not bool(t.any()) for t in self.tensors())

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The unscaled ``up @ down`` in the base weight's layout."""
        return low_rank_product(self.up.to(dtype), self.down.to(dtype))


@dataclass
class FactorDelta:
    """A delta its algorithm rebuilds densely from the file's named factors (see `algorithms`).

    >>> d = FactorDelta("loha", {"hada_w1_a": torch.ones(6, 2), "hada_w1_b": torch.ones(2, 4),
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
    def algorithm(self):
        return algorithm(self.kind)

    @property
    def rank(self) -> int:
        return self.algorithm.rank(self.factors)

    @property
    def scale(self) -> float:
        return self.algorithm.scale(self.factors, self.alpha)

    @property
    def bias(self) -> torch.Tensor | None:
        bias_factor = self.algorithm.bias_factor
        return None if bias_factor is None else self.factors.get(bias_factor)

    def tensors(self) -> list[torch.Tensor]:
        return list(self.factors.values()) + ([self.dora_scale] if self.dora_scale is not None else [])

    def is_all_zero(self) -> bool:
        # A DoRA scale is never "nothing": with a zero delta it still rescales the rows.
        return self.dora_scale is None and all(not bool(t.any()) for t in self.factors.values())

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """The unscaled dense weight delta (None for a bias-only diff)."""
        return take_rows(self.algorithm.dense({k: v.to(dtype) for k, v in self.factors.items()}), self.rows)

    def dense_shape(self) -> tuple[int, ...] | None:
        """The dense delta's shape, from the factor shapes alone (None when they do not chain)."""
        try:
            shape = self.algorithm.dense_shape({k: tuple(v.shape) for k, v in self.factors.items()})
        except (KeyError, IndexError):
            return None
        if self.rows is None or shape is None:
            return shape
        if not all(0 <= start < stop <= shape[0] for start, stop in self.rows):
            return None
        return (sum(stop - start for start, stop in self.rows), *shape[1:])


Delta = LoraDelta | FactorDelta


def take_rows(tensor: torch.Tensor | None, rows: tuple[tuple[int, int], ...] | None) -> torch.Tensor | None:
    """``tensor``'s row ranges, concatenated (all of it when ``rows`` is None)."""
    if tensor is None or rows is None:
        return tensor
    if len(rows) == 1:
        return tensor[rows[0][0] : rows[0][1]]
    return torch.cat([tensor[start:stop] for start, stop in rows])
