"""DoRA, a variant of any algorithm: the adapted weight's rows rescaled to a learned magnitude.

``W' = m * (W + delta) / ||W + delta||``, the norm taken per output row (PEFT's
``lora_magnitude_vector``, LyCORIS' default ``wd_on_out``) or per input column
(LyCORIS' ``dora_scale`` stored ``[1, in, ...]``). PEFT divides by the bare norm;
LyCORIS adds ``eps``. This module is the one place that math lives: the
unfused forward, fusing, training's initial magnitude and the file checks call it.

>>> import torch
>>> combined = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
>>> rescale(combined, torch.tensor([10.0, 1.0]))
tensor([[6., 8.],
        [0., 1.]])
"""

from __future__ import annotations

import torch


def weight_norm(weight: torch.Tensor, on_output: bool = True) -> torch.Tensor:
    """The 2-norm of each output row (or input column) of ``weight`` ``[out, in, ...]``, shaped to broadcast over it."""
    if on_output:
        return torch.linalg.norm(weight.reshape(weight.shape[0], -1), dim=1).view(-1, *[1] * (weight.dim() - 1))
    moved = weight.transpose(0, 1)
    return torch.linalg.norm(moved.reshape(moved.shape[0], -1), dim=1).view(1, -1, *[1] * (weight.dim() - 2))


def magnitude_scale(combined: torch.Tensor, magnitude: torch.Tensor, on_output: bool = True, eps: float = 0.0) -> torch.Tensor:
    """``m / (||combined|| + eps)``, shaped to broadcast over ``combined``: what each row (column) is multiplied by."""
    norm = weight_norm(combined, on_output)
    return magnitude.reshape(norm.shape).to(combined.dtype) / (norm + eps if eps else norm)


def rescale(combined: torch.Tensor, magnitude: torch.Tensor, on_output: bool = True, eps: float = 0.0) -> torch.Tensor:
    """``combined`` with each output row (input column) rescaled to ``magnitude``: the DoRA weight."""
    return combined * magnitude_scale(combined, magnitude, on_output, eps)


def lycoris_weight(combined: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """LyCORIS' weight decomposition: ``combined`` rescaled to ``dora_scale`` per output row
    (``dora_scale`` [out, 1, ...]) or per input column ([1, in, ...]); ``+ eps`` as LyCORIS."""
    on_output = dora_on_output(dora_scale, combined.shape)
    return rescale(combined, dora_scale, on_output, eps=torch.finfo(combined.dtype).eps)


def dora_on_output(dora_scale: torch.Tensor, weight_shape) -> bool:
    """True for LyCORIS' default ``wd_on_out`` layout ``[out, 1, ...]`` (also a 1-D ``[out]``)."""
    if dora_scale.dim() >= 2:
        return dora_scale.shape[0] == weight_shape[0] and (dora_scale.shape[1] == 1 or weight_shape[1] == 1)
    return dora_scale.numel() == weight_shape[0]


def dora_problem(dora_scale: torch.Tensor, weight_shape) -> str | None:
    """Why ``dora_scale`` fits neither axis of a weight ``[out, in, ...]``, or None."""
    out_axis = dora_scale.numel() == weight_shape[0] and (dora_scale.dim() < 2 or dora_scale.shape[1] == 1)
    in_axis = dora_scale.dim() >= 2 and dora_scale.shape[0] == 1 and dora_scale.numel() == weight_shape[1]
    if out_axis or in_axis:
        return None
    return f"dora_scale is {list(dora_scale.shape)}; expected [{weight_shape[0]}, 1, ...] or [1, {weight_shape[1]}, ...]"
