"""The canonical form every format converts to: one `Delta` per targeted module.

A converter turns a file's raw keys into ``{(component, module_name): Delta}``;
`inject` then matches the names to live modules and builds layers from the
deltas. Saving goes the other way, from live adapters back to deltas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


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

    def delta_weight(self) -> torch.Tensor:
        """The dense ``scale * up @ down`` in the base weight's layout, computed in fp32."""
        down = self.down.float()
        up = self.up.float()
        if down.dim() == 2:
            return self.scale * (up.flatten(1) @ down)
        # Conv: up is 1x1, so the product is a channel mix of the kxk down kernel.
        return self.scale * torch.einsum("or,rihw->oihw", up.flatten(1), down)
