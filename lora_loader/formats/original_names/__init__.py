"""Original checkpoint names of DiT families, as tables, and the one engine that applies them.

Trainers that work on a model's original checkpoint (sd-scripts, ComfyUI, BFL) name its
modules as that checkpoint does; diffusers renames them and splits fused projections.
Each family here is a table (`engine.Family`: original name -> diffusers path(s), fused
row splits, (shift, scale) swaps); `engine` applies any of them. Kohya / ComfyUI files
whose denoiser names are a family's are converted with `family_of`. The SD / SDXL UNet's
Stability names depend on the live model's block layout and are aliases there (`sgm`).

Adding a family: a table module beside `flux.py` (a `Family` of `Blocks` and top-level
modules), its entry in `FAMILIES`, and tests against diffusers' own converter.
"""

from __future__ import annotations

from .engine import ALWAYS, IF_TWO_HALVES, Blocks, Family, Target, fused, split_module, swapped
from .flux import FLUX
from .sd3 import SD3

# Tried in order: the first whose blocks a file's denoiser names use converts it.
FAMILIES = (FLUX, SD3)

__all__ = ["ALWAYS", "FAMILIES", "FLUX", "IF_TWO_HALVES", "SD3", "Blocks", "Family", "Target", "family_of", "fused", "split_module", "swapped"]


def family_of(module_names) -> Family | None:
    """The family whose original names a Kohya file's denoiser modules use, or None (diffusers' or UNet names)."""
    names = list(module_names)
    return next((family for family in FAMILIES if family.claims(names)), None)
