"""bitsandbytes' quantized Linear layers (``Linear8bitLt``, ``Linear4bit``) as bases for adapters.

Both are subclasses of ``nn.Linear``, so wrapping and the unfused forward
(``base(x) + adapters(x)``) work unchanged: bitsandbytes computes the base in its
own kernels, the adapters compute in full precision beside it (QLoRA). What
differs is the stored weight: int8 rows with per-row scales (``Int8Params``) or
packed 4-bit blocks with a ``quant_state`` (``Params4bit``), whose ``shape`` is
not ``[out, in]``. So the layer's shape comes from ``out_features``/``in_features``,
code that needs the dense weight (DoRA's norms, fusing) dequantizes it here, and
fusing writes a freshly quantized parameter: the sum is rounded to the 8-/4-bit
grid, so a fused quantized model is close to, not equal to, the unfused one
(as with PEFT's merge). Unfusing puts the original parameter object back, so
the base is restored exactly.

bitsandbytes is imported only when a quantized layer is met.
"""

from __future__ import annotations

import torch
from torch import nn

_QUANTIZED_PARAMS = ("Int8Params", "Params4bit")


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module``'s weight is a bitsandbytes-quantized parameter (int8 or packed 4-bit data)."""
    weight = getattr(module, "weight", None)
    return type(weight).__name__ in _QUANTIZED_PARAMS and not weight.dtype.is_floating_point


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense ``[out, in]`` float tensor (what bitsandbytes computes with)."""
    import bitsandbytes as bnb

    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    return bnb.functional.int8_vectorwise_dequant(weight.data, _row_scales(module).to(weight.data.device))


def _row_scales(module: nn.Module) -> torch.Tensor:
    # Linear8bitLt moves the scales from the parameter into `module.state` on its first forward.
    scales = module.weight.SCB
    return module.state.SCB if scales is None else scales


def snapshot(module: nn.Module) -> tuple:
    """What `restore` needs to put this layer's current quantized weight back exactly."""
    weight = module.weight
    return (weight, _row_scales(module) if type(weight).__name__ == "Int8Params" else None)


def restore(module: nn.Module, saved: tuple) -> None:
    """Make ``saved`` (from `snapshot`) the layer's weight again, its scales with it."""
    weight, row_scales = saved
    module._parameters["weight"] = weight
    if row_scales is not None:
        # The next forward moves CB/SCB from the parameter into the state, as after loading.
        weight.CB, weight.SCB = weight.data, row_scales
        module.state.reset_grads()


def quantized_like(module: nn.Module, dense: torch.Tensor) -> tuple:
    """``dense`` ([out, in], float) quantized as this layer's weight is; a `snapshot`-style tuple for `restore`."""
    import bitsandbytes as bnb

    weight = module.weight
    device = weight.device
    if type(weight).__name__ == "Params4bit":
        state = weight.quant_state
        fresh = bnb.nn.Params4bit(
            dense.to("cpu", state.dtype),
            requires_grad=False,
            blocksize=state.blocksize,
            compress_statistics=weight.compress_statistics,
            quant_type=state.quant_type,
            quant_storage=weight.quant_storage,
            module=getattr(weight, "module", None),
        ).to(device)
        return (fresh, None)
    fresh = bnb.nn.Int8Params(dense.to("cpu"), requires_grad=False, has_fp16_weights=False).to(device)
    return (fresh, fresh.SCB)
