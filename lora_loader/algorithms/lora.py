"""LoRA and LoCon: ``up @ down`` (kxk ``down`` for a Conv2d), and LoCon's Tucker form with a ``lora_mid`` core.

Plain LoRA files mostly become `delta.LoraDelta` (its factors run unfused in two
matmuls); this declaration serves the LoRA modules that come with a
``dora_scale`` (Kohya DoRA), which are rebuilt densely, and LoCon with Tucker.

>>> import torch
>>> LORA.dense({"lora_down.weight": torch.ones(2, 3), "lora_up.weight": torch.ones(4, 2)}).shape
torch.Size([4, 3])
"""

from __future__ import annotations

import torch

from .base import Algorithm, tucker


def low_rank_product(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``up @ down`` in the base weight's layout: ``[out, in]``, or ``[out, in, kh, kw]`` for a conv ``down``
    (``up`` being 1x1, the product is a channel mix of the kxk kernel)."""
    product = up.flatten(1) @ down.flatten(1)
    return product.view(up.shape[0], *down.shape[1:]) if down.dim() > 2 else product


class Lora(Algorithm):
    kind = "lora"
    title = "LoRA"
    factor_keys = required_keys = ("lora_down.weight", "lora_up.weight")

    def claims(self, factors):
        return bool(factors) and factors <= set(self.factor_keys)

    def rank(self, f):
        return int(f["lora_down.weight"].shape[0])

    def dense(self, f, base_weight=None):
        return low_rank_product(f["lora_up.weight"], f["lora_down.weight"])

    def dense_shape(self, s):
        down, up = s["lora_down.weight"], s["lora_up.weight"]
        if up[1] != down[0] or any(k != 1 for k in up[2:]):
            return None
        return (up[0], *down[1:])


class LoconTucker(Algorithm):
    kind = "locon"
    title = "LoCon (Tucker)"
    factor_keys = required_keys = ("lora_down.weight", "lora_mid.weight", "lora_up.weight")

    def claims(self, factors):
        return "lora_mid.weight" in factors

    def rank(self, f):
        return int(f["lora_down.weight"].shape[0])

    def dense(self, f, base_weight=None):
        return tucker(f["lora_mid.weight"], f["lora_up.weight"].flatten(1).T, f["lora_down.weight"].flatten(1))

    def dense_shape(self, s):
        down, mid, up = s["lora_down.weight"], s["lora_mid.weight"], s["lora_up.weight"]
        if len(mid) != 4 or up[1] != mid[0] or down[0] != mid[1] or any(k != 1 for k in (*down[2:], *up[2:])):
            return None
        return (up[0], down[1], *mid[2:])


LORA = Lora()
LOCON = LoconTucker()
