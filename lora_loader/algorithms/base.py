"""What an adapter algorithm declares: its file keys, rank, scale rule and dense weight.

Each algorithm is one object in its own module (`lora`, `loha`, `lokr`, `diff`);
`lora_loader.algorithms` finds them by kind. ``factors`` are always the tensors
of one module, keyed by the file's suffix (``"hada_w1_a"``, ``"lora_down.weight"``).
"""

from __future__ import annotations

import torch


class Algorithm:
    """One adapter algorithm. Subclasses set the class attributes and override what differs.

    The forward of every algorithm but plain LoRA is the wrapped layer's own
    operation applied with the dense delta (``x @ dense.T`` for a Linear, a
    convolution for a Conv2d, a normalised affine for a norm); plain LoRA runs its
    two factors instead (`layers.LoraAdapter`), which is the fast path.
    """

    kind: str = ""
    title: str = ""  # for messages: "LoHa", "full diff"
    factor_keys: tuple[str, ...] = ()  # every suffix it reads, optional ones included
    required_keys: tuple[str, ...] = ()  # the suffixes a module of this kind always has
    bias_factor: str | None = None  # the factor that changes the module's bias, not its weight
    # True for an algorithm whose delta depends on the layer's own weight (OFT and BOFT rotate it):
    # `dense` is then given that weight, [out, in, ...] in the factors' dtype.
    uses_base_weight: bool = False
    # True when the module's ``alpha`` key is one of its factors, not a scale (OFT's constraint): kept in
    # ``factors`` as ``"alpha"`` by the Kohya reader and written back as it was.
    alpha_in_factors: bool = False

    def claims(self, factors: set[str]) -> bool:
        """Whether a module's factor suffixes (``alpha`` and ``dora_scale`` removed) are of this algorithm."""
        raise NotImplementedError

    def missing(self, have: set[str]) -> list[str]:
        """The factors a module of this kind still needs (empty when complete)."""
        return sorted(set(self.required_keys) - have)

    def rank(self, factors: dict) -> int:
        return 1

    def scale(self, factors: dict, alpha: float | None) -> float:
        """``alpha / rank``, alpha absent or 0 meaning rank (scale 1), as LyCORIS and sd-scripts define it."""
        rank = self.rank(factors)
        return float(rank if alpha in (None, 0) else alpha) / rank

    def dense(self, factors: dict[str, torch.Tensor], base_weight: torch.Tensor | None = None) -> torch.Tensor | None:
        """The unscaled dense weight delta ``[out, in, ...]`` (None when only the bias changes).
        ``base_weight`` is given only to an algorithm that `uses_base_weight`."""
        raise NotImplementedError

    def dense_shape(self, shapes: dict[str, tuple]) -> tuple[int, ...] | None:
        """The shape `dense` would return, from the factor shapes alone (None when they do not chain)."""
        raise NotImplementedError


def tucker(core: torch.Tensor, out_mode: torch.Tensor, in_mode: torch.Tensor) -> torch.Tensor:
    """LyCORIS' ``rebuild_tucker``: core [r, r, k...] with modes ``out_mode`` [r, out] and ``in_mode`` [r, in]."""
    return torch.einsum("ij...,ip,jr->pr...", core, out_mode, in_mode)
