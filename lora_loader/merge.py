"""New adapters made of several: PEFT's ``add_weighted_adapter`` combinations, as pure functions on deltas.

`weighted_merge` takes, per module, each source adapter's delta and weight and gives the
merged module's `LoraDelta` (scale 1: alpha = rank, as PEFT configures the new adapter).
The combination types and their math are PEFT's (``peft.tuners.lora.LoraModel.add_weighted_adapter``
and ``peft.utils.merge_utils``), so a merge here equals PEFT's on the same adapters:

- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the ``lora_A`` and the
  ``lora_B`` tensors are merged separately, each adapter's weighted by ``sqrt(|weight * scale|)``
  (the sign on ``lora_A``); all adapters of a module must have one rank.
- ``cat``: ``lora_A`` rows (times weight and scale) and ``lora_B`` columns stacked; the rank is the
  sum of the adapters' ranks (zero-padded to the adapter-wide rank, as PEFT allocates it).
- ``svd`` and the ``*_svd`` variants: the dense changes ``weight * scale * B @ A`` merged, then a rank
  ``svd_rank`` truncated SVD (``U diag(S)`` as ``lora_B``, ``Vh`` as ``lora_A``). LyCORIS adapters
  enter through their dense change, so they can be merged this way too.

``dare_*`` prune at random with ``torch.bernoulli``: seed torch's generator for a repeatable merge
(modules are visited in the model's module order, ``lora_A`` before ``lora_B``, as PEFT does).

>>> import torch
>>> from lora_loader.delta import LoraDelta
>>> a = LoraDelta(torch.ones(2, 3), torch.ones(4, 2), alpha=2.0)
>>> b = LoraDelta(torch.ones(2, 3), -torch.ones(4, 2), alpha=4.0)
>>> merged = weighted_merge({"m": [(a, 1.0), (b, 0.5)]}, "linear", new_rank=2)["m"]
>>> (merged.scale * merged.up @ merged.down)[0, 0].item()  # (1 * 1 - 0.5 * 2) * 2: the blend of the two
0.0
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .delta import FactorDelta, LoraDelta
from .errors import LoraError

COMBINATION_TYPES = (
    "svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
    "magnitude_prune", "magnitude_prune_svd",
)  # fmt: skip
_NEEDS_DENSITY = ("ties", "dare", "magnitude_prune")


def check_combination(combination_type: str, density: float | None, majority_sign_method: str) -> None:
    """A `LoraError` for a combination type, density or sign method PEFT does not define."""
    if combination_type not in COMBINATION_TYPES:
        raise LoraError(f"combination_type={combination_type!r}; expected one of {', '.join(COMBINATION_TYPES)}")
    if combination_type.startswith(_NEEDS_DENSITY):
        if density is None or isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 <= density <= 1:
            raise LoraError(f"combination_type={combination_type!r} needs density= (the fraction of values kept, 0..1), got {density!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise LoraError(f"majority_sign_method={majority_sign_method!r}; expected 'total' or 'frequency'")


def new_rank_of(combination_type: str, adapter_ranks: list[int], svd_rank: int | None) -> int:
    """The merged adapter's rank, by PEFT's rule (``adapter_ranks``: each source adapter's largest rank)."""
    if combination_type == "cat":
        return sum(adapter_ranks)
    if combination_type.endswith("svd"):
        return svd_rank or max(adapter_ranks)
    if len(set(adapter_ranks)) != 1:
        raise LoraError(
            f"combination_type={combination_type!r} needs adapters of one rank, got ranks {adapter_ranks}; "
            "use 'cat' or an '*_svd' combination for adapters of different ranks"
        )
    return adapter_ranks[0]


def weighted_merge(
    modules: dict,
    combination_type: str,
    new_rank: int,
    density: float | None = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
) -> dict:
    """``{module: LoraDelta}`` merged from ``{module: [(delta, weight), ...]}`` (in the model's module order)."""
    check_combination(combination_type, density, majority_sign_method)
    out = {}
    for key, entries in modules.items():
        if not entries:
            continue
        if combination_type.endswith("svd"):
            out[key] = _svd_merge(key, entries, combination_type, new_rank, density, majority_sign_method,
                                  svd_clamp, svd_full_matrices, svd_driver)  # fmt: skip
            continue
        loras = _plain_loras(key, entries, combination_type)
        if combination_type == "cat":
            out[key] = _cat(loras, new_rank)
        else:
            out[key] = _factorwise(key, loras, combination_type, density, majority_sign_method)
    return out


def _plain_loras(key, entries, combination_type: str) -> list[tuple[LoraDelta, float]]:
    for delta, _ in entries:
        if isinstance(delta, FactorDelta):
            raise LoraError(
                f"{key}: a {delta.algorithm.title} adapter has no lora_A / lora_B to combine with {combination_type!r}; "
                "an '*_svd' combination merges its dense change"
            )
        if delta.magnitude is not None or delta.bias is not None or delta.up_bias is not None:
            raise LoraError(f"{key}: DoRA adapters and adapter biases cannot be merged (PEFT refuses them too)")
    return entries


def _cat(loras: list[tuple[LoraDelta, float]], new_rank: int) -> LoraDelta:
    downs = torch.cat([d.down * (w * d.scale) for d, w in loras], dim=0)
    ups = torch.cat([d.up for d, _ in loras], dim=1)
    down = torch.zeros((new_rank, *downs.shape[1:]), dtype=downs.dtype)
    up = torch.zeros((ups.shape[0], new_rank, *ups.shape[2:]), dtype=ups.dtype)
    down[: downs.shape[0]] = downs
    up[:, : ups.shape[1]] = ups
    return LoraDelta(down, up, float(new_rank))


def _factorwise(key, loras, combination_type: str, density, majority_sign_method) -> LoraDelta:
    ranks = {d.rank for d, _ in loras}
    if len(ranks) != 1:
        raise LoraError(f"{key}: its adapters have ranks {sorted(ranks)}; {combination_type!r} needs one rank (use 'cat' or '*_svd')")
    weights_a, weights_b = [], []
    for delta, weight in loras:
        scaled = weight * delta.scale
        sign = 1 if scaled >= 0 else -1
        weights_a.append(math.sqrt(abs(scaled)) * sign)  # the sign on one side only
        weights_b.append(math.sqrt(abs(scaled)))
    dtype = loras[0][0].down.dtype
    down = _combine([d.down for d, _ in loras], torch.tensor(weights_a), combination_type, density, majority_sign_method)
    up = _combine([d.up for d, _ in loras], torch.tensor(weights_b), combination_type, density, majority_sign_method)
    rank = loras[0][0].rank
    return LoraDelta(down.to(dtype), up.to(dtype), float(rank))


def _svd_merge(key, entries, combination_type, new_rank, density, majority_sign_method, clamp, full_matrices, driver) -> LoraDelta:
    for delta, _ in entries:
        if getattr(delta, "magnitude", None) is not None or getattr(delta, "dora_scale", None) is not None:
            raise LoraError(f"{key}: DoRA adapters cannot be merged (PEFT refuses them too)")
    dense = [_scaled_dense(key, delta) for delta, _ in entries]
    weights = torch.tensor([w for _, w in entries], dtype=dense[0].dtype)
    merged = _combine(dense, weights, combination_type.removesuffix("_svd"), density, majority_sign_method)
    shape = merged.shape
    conv = merged.dim() == 4
    if conv:
        merged = merged.flatten(start_dim=1) if shape[2:] != (1, 1) else merged.squeeze(-1).squeeze(-1)
    u, s, vh = torch.linalg.svd(merged, full_matrices=full_matrices, driver=driver)
    up, down = u[:, :new_rank] @ torch.diag(s[:new_rank]), vh[:new_rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([up.flatten(), down.flatten()]), clamp)
        up, down = up.clamp(-high, high), down.clamp(-high, high)
    if conv:
        up = up.reshape(shape[0], up.shape[1], 1, 1)
        down = down.reshape(down.shape[0], *shape[1:])
    return LoraDelta(down.contiguous(), up.contiguous(), float(new_rank))


def _scaled_dense(key, delta) -> torch.Tensor:
    if isinstance(delta, LoraDelta):
        if delta.bias is not None or delta.up_bias is not None:
            raise LoraError(f"{key}: adapter biases cannot be merged")
        down, up = delta.down, delta.up
        if down.dim() == 4:  # PEFT's conv get_delta_weight: 1x1 as a matmul, else the conv of the factors
            if down.shape[2:] == (1, 1):
                product = (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
            else:
                product = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        else:
            product = up @ down
        return product * delta.scale
    dense = delta.dense(delta.factors[next(iter(delta.factors))].dtype)
    if dense is None:
        raise LoraError(f"{key}: a bias-only {delta.algorithm.title} change has no weight to merge")
    return dense * delta.scale


def _combine(tensors: list[torch.Tensor], weights: torch.Tensor, how: str, density, majority_sign_method) -> torch.Tensor:
    """PEFT's merge_utils: task arithmetic, TIES, DARE and magnitude pruning of stacked task tensors."""
    if how in ("svd", "linear"):
        return _weighted_sum(torch.stack(tensors), weights)
    if how in ("ties", "magnitude_prune"):
        stacked = torch.stack([_magnitude_prune(t, density) for t in tensors])
    else:  # dare_linear, dare_ties
        stacked = torch.stack([_random_prune(t, density) for t in tensors])
    if how in ("magnitude_prune", "dare_linear"):
        return _weighted_sum(stacked, weights)
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if majority_sign_method == "total" else sign.sum(dim=0)
    majority = sign == torch.where(magnitude >= 0, 1, -1)
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))
    return (weighted * majority).sum(dim=0) / torch.clamp(majority.sum(dim=0), min=1.0)


def _weighted_sum(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))).sum(dim=0)


def _magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    keep = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
    mask[keep[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def _random_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    return tensor * torch.bernoulli(torch.full_like(tensor, density)) / density
