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
from .wan import WAN

# A file's denoiser names are converted by the family that knows most of them (the first on a tie):
# families share block names (Flux's and HunyuanVideo's double_blocks), not whole tables.
FAMILIES = (FLUX, SD3, WAN)

__all__ = [
    "ALWAYS", "FAMILIES", "FLUX", "IF_TWO_HALVES", "SD3", "WAN", "Blocks", "Family", "Target", "add_original", "family_of", "fused",
    "rename_original_names", "split_module", "swapped",
]  # fmt: skip

# The components whose modules may be named as a family's original checkpoint names them.
DENOISER_COMPONENTS = ("denoiser", "transformer", "transformer_2", "transformer_ref")


def family_of(module_names) -> Family | None:
    """The family whose original names a file's denoiser modules use (Kohya-mangled: dots as underscores),
    or None (diffusers' or UNet names): of the families whose blocks hold some of them, the one whose
    table names most of them (then: whose blocks hold most, so a module the table lacks is reported as
    that family's), the first on a tie.

    >>> family_of(["double_blocks_0_img_attn_qkv", "single_blocks_3_linear1"]).name
    'Flux'
    >>> family_of(["transformer_blocks_0_attn_to_q"]) is None
    True
    """
    names = [name.replace(".", "_") for name in module_names]
    best, best_score = None, (0, 0)
    for family in FAMILIES:
        known, in_blocks = family.score(names)
        # Only block names claim a file: a top-level name (context_embedder) may be diffusers' name too.
        if in_blocks and (known, in_blocks) > best_score:
            best, best_score = family, (known, in_blocks)
    return best


def add_original(result, family: Family, component: str, module: str, delta) -> None:
    """One module in ``family``'s original names into ``result`` (a `ConvertedLora`) under diffusers' path(s),
    a fused projection split by rows; a module the table lacks, or that does not split, goes to ``unknown``."""
    parts, why = family.convert_module(module.replace(".", "_"), delta)
    if why is not None:
        for key in delta.keys:
            result.unknown[key] = why
        return
    for path, part in parts:
        result.deltas[(component, path)] = part


def rename_original_names(result) -> None:
    """A dotted-name file (diffusers' suffixes, no Kohya or ComfyUI prefix) whose denoiser modules are a
    family's original names (``blocks.0.self_attn.q``, ``transformer.double_blocks.0.img_attn.qkv``):
    renamed in place onto diffusers' modules when the family's table names most of them, so a file in
    diffusers' names that shares a few names with a table is left as it is."""
    for component in DENOISER_COMPONENTS:
        mine = {module: delta for (c, module), delta in result.deltas.items() if c == component}
        family = family_of(mine)
        if family is None or 2 * family.score([m.replace(".", "_") for m in mine])[0] <= len(mine):
            continue
        for module, delta in mine.items():
            del result.deltas[(component, module)]
            add_original(result, family, component, module, delta)
