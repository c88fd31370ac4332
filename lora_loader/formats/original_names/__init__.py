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

from .engine import ALWAYS, IF_TWO_HALVES, Blocks, Family, Target, fused, interleaved, split_module, swapped
from .cogvideox_mochi import COGVIDEOX, MOCHI
from .flux import FLUX
from .hunyuan_video import HUNYUAN_VIDEO, HUNYUAN_VIDEO_15
from .ltx import LTX2, LTX_VIDEO
from .minimax_h3 import MINIMAX_H3
from .qwen_image import QWEN_IMAGE
from .sd3 import SD3
from .wan import WAN
from .z_image import Z_IMAGE
from .writer import to_original

# A file's denoiser names are converted by the family that knows most of them (the first on a tie):
# families share block names (Flux's and HunyuanVideo's double_blocks), not whole tables.
# HunyuanVideo 1.5 before 1.0: its header names ("hunyuan-video-1.5") contain 1.0's, and a file in
# names both know (dual-stream blocks only) maps to the same modules in either. MiniMax-H3 (audio blocks
# too) before LTX-2, LTX-2 before LTX-Video: inspect names LTX-Video only a file with no audio module.
# Wan before MiniMax-H3: both name blocks_N_; a Kohya file in diffusers names of neither table goes to Wan, which
# keeps names it lacks for the live model (MiniMax-H3 would refuse them).
# Mochi and CogVideoX (whose LoRAs name only attn1, and veto a file with attn2) before LTX-Video, whose
# inspect rule is any attn1 name.
# Qwen-Image (no original names of its own: detection only) and Z-Image (layers_N_ / *_refiner_N_ blocks) last.
FAMILIES = (FLUX, SD3, HUNYUAN_VIDEO_15, HUNYUAN_VIDEO, WAN, MINIMAX_H3, LTX2, MOCHI, COGVIDEOX, LTX_VIDEO, QWEN_IMAGE, Z_IMAGE)

__all__ = [
    "ALWAYS", "COGVIDEOX", "FAMILIES", "FLUX", "HUNYUAN_VIDEO", "HUNYUAN_VIDEO_15", "IF_TWO_HALVES", "LTX2", "LTX_VIDEO",
    "MINIMAX_H3", "MOCHI", "QWEN_IMAGE", "SD3", "WAN", "Z_IMAGE", "Blocks", "Family", "Target", "add_original", "family_of", "family_of_model", "fused",
    "interleaved", "rename_original_names", "split_module", "swapped", "to_original",
]  # fmt: skip

# The components whose modules may be named as a family's original checkpoint names them.
DENOISER_COMPONENTS = ("denoiser", "transformer", "transformer_2", "transformer_ref")


def family_of(module_names) -> Family | None:
    """The family whose original names a file's denoiser modules use (Kohya-mangled: dots as underscores),
    or None (diffusers' or UNet names): of the families some of them claim (names in its blocks, or its
    ``claim`` names), the one whose table names most of them (then: that most claim, so a module the table
    lacks is reported as that family's), the first on a tie.

    >>> family_of(["double_blocks_0_img_attn_qkv", "single_blocks_3_linear1"]).name
    'Flux'
    >>> family_of(["transformer_blocks_0_attn_to_q"]) is None
    True
    >>> family_of(["transformer_blocks_0_attn1_to_q"]) is None, family_of(["transformer_blocks_0_attn1_to_q", "patchify_proj"]).name
    (True, 'LTX-2')
    """
    names = [name.replace(".", "_") for name in module_names]
    best, best_score = None, (0, 0)
    for family in FAMILIES:
        known, in_blocks = family.score(names)
        # Only block names claim a file: a top-level name (context_embedder) may be diffusers' name too.
        if in_blocks and (known, in_blocks) > best_score:
            best, best_score = family, (known, in_blocks)
    return best


def family_of_model(model) -> Family | None:
    """The family whose table names ``model``'s modules (by its class, `Family.model_classes`), or None."""
    name = type(getattr(model, "_orig_mod", model)).__name__
    return next((family for family in FAMILIES if name in family.model_classes), None)


def add_original(result, family: Family, component: str, module: str, delta) -> None:
    """One module in ``family``'s original names into ``result`` (a `ConvertedLora`) under diffusers' path(s),
    a fused projection split by rows, in the component the table names for it (LTX-2's connectors) or else
    ``component``; a module the table lacks, or that does not split, goes to ``unknown``."""
    name = module.replace(".", "_")
    parts, why = family.convert_module(name, delta)
    if why is not None:
        for key in delta.keys:
            result.unknown[key] = why
        return
    target = family.targets(name)  # None: a name a keep_unknown family kept for the live model
    component = (target.component if target is not None else None) or component
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
