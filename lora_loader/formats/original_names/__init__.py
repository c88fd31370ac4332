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

import dataclasses
from dataclasses import dataclass

from .engine import ALWAYS, IF_TWO_HALVES, Blocks, Family, Target, fused, interleaved, split_module, swapped
from .ace_step import ACE_STEP
from .cogvideox_mochi import COGVIDEOX, MOCHI
from .flux import FLUX
from .flux2 import FLUX2
from .flux3 import FLUX3
from .chroma import CHROMA
from .hunyuan_video import HUNYUAN_VIDEO, HUNYUAN_VIDEO_15
from .ideogram4 import IDEOGRAM4
from .ltx import LTX2, LTX_VIDEO
from .minimax_h3 import MINIMAX_H3
from .qwen_image import QWEN_IMAGE
from .rfd4_proteina import RFD4_PROTEINA
from .sd3 import SD3
from .wan import WAN
from .z_image import Z_IMAGE
from .anima import ANIMA
from .hidream import HIDREAM
from .krea2 import KREA2
from .lumina2 import LUMINA2
from .amused import AMUSED
from .auraflow import AURAFLOW
from .bria_fibo import BRIA_FIBO2
from .cogview4 import COGVIEW4
from .cosmos import COSMOS
from .ernie_image import ERNIE_IMAGE
from .kandinsky5 import KANDINSKY5
from .sana import SANA
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
# Flux.2 after Flux.1: both name blocks double_blocks_N_ / single_blocks_N_; widths (`Family.shapes`) and the names only
# one has tell them apart, and a file that neither tells is Flux.1's unless loaded into a Flux.2 model (`family_of`).
# Chroma (Flux.1's blocks, one distilled guidance layer) after both: only its guidance layer's names claim a file.
# Qwen-Image (no original names of its own: detection only) and Z-Image (layers_N_ / *_refiner_N_ blocks) last.
# Flux 3 after the Flux.1 family: it shares only single_blocks_N_ (other module names there) and claims by its own.
# Ideogram 4 before Z-Image: both name layers_N_attention_qkv and, in diffusers' names, layers_N_attention_to_q; only
# Ideogram 4's adaln_modulation / attention_o / top-level names claim a file or tell inspect. ACE-Step (layers_N_ too,
# a causal LM's own names) claims only by cross_attn and its embedders.
# Lumina 2 after Z-Image: the same block names and qkv; a file in names both know is Z-Image's unless loaded into a
# Lumina 2 model (or its fused qkv's widths are Lumina 2's). HiDream (detection only), Anima and Krea 2 (blocks_N_ with
# names Wan's table lacks: each wins by the names it knows) after them.
# The families diffusers converts nothing for (diffusers' names only) come first: their `detect` names only their own
# modules, so a file with those is not taken by a broader rule of a family after them (HunyuanVideo 1.5's
# time_embed_timestep_embedder, CogVideoX's patch_embed_text_proj, LTX-Video's attn1, Z-Image's attention names). Most
# have no blocks (`family_of` never picks them); AuraFlow's blocks (double_layers_N_ / single_layers_N_) are no other
# family's; Bria Fibo 2's table names its own modules (Z-Image's blocks and its Perceiver) and wins by the names it
# knows; on a tie with Z-Image (names both know, read differently) the live model's class decides (`model_classes`).
_DIFFUSERS_NAMES_ONLY = (SANA, COGVIEW4, AURAFLOW, KANDINSKY5, ERNIE_IMAGE, COSMOS, BRIA_FIBO2, AMUSED, RFD4_PROTEINA)
FAMILIES = _DIFFUSERS_NAMES_ONLY + (
    FLUX, FLUX2, CHROMA, FLUX3, SD3, HUNYUAN_VIDEO_15, HUNYUAN_VIDEO, WAN, MINIMAX_H3, LTX2, MOCHI, COGVIDEOX, LTX_VIDEO,
    QWEN_IMAGE, IDEOGRAM4, ACE_STEP, Z_IMAGE, LUMINA2, HIDREAM, ANIMA, KREA2,
)

__all__ = [
    "ACE_STEP", "ALWAYS", "AMUSED", "ANIMA", "AURAFLOW", "BRIA_FIBO2", "CHROMA", "COGVIDEOX", "COGVIEW4", "COSMOS", "ERNIE_IMAGE", "FAMILIES", "FLUX", "FLUX2", "FLUX3", "HIDREAM", "HUNYUAN_VIDEO", "HUNYUAN_VIDEO_15", "IDEOGRAM4", "IF_TWO_HALVES", "KANDINSKY5", "KREA2", "LTX2", "LTX_VIDEO", "LUMINA2", "MINIMAX_H3", "MOCHI", "QWEN_IMAGE", "RFD4_PROTEINA", "SANA", "SD3", "WAN", "Z_IMAGE", "Alternative", "Blocks", "Family", "Target",
    "add_original", "add_originals", "families_of", "family_of", "family_of_model", "for_model", "fused", "interleaved",
    "rename_original_names", "split_module", "swapped", "to_original",
]  # fmt: skip

# The components whose modules may be named as a family's original checkpoint names them.
DENOISER_COMPONENTS = ("denoiser", "transformer", "transformer_2", "transformer_ref")


def family_of(module_names, model_class: str | None = None) -> Family | None:
    """The family whose original names a file's denoiser modules use (Kohya-mangled: dots as underscores),
    or None (diffusers' or UNet names): of the families some of them claim (names in its blocks, or its
    ``claim`` names), the one whose table names most of them (then: that most claim, so a module the table
    lacks is reported as that family's), the first on a tie, unless the tie is between families one of which
    names ``model_class`` (the live model's class: `Family.model_classes`). ``module_names`` may map each name
    to its delta: a family whose `Family.shapes` a delta's widths contradict is ruled out.

    >>> family_of(["double_blocks_0_img_attn_qkv", "single_blocks_3_linear1"]).name
    'Flux'
    >>> family_of(["transformer_blocks_0_attn_to_q"]) is None
    True
    >>> family_of(["transformer_blocks_0_attn1_to_q"]) is None, family_of(["transformer_blocks_0_attn1_to_q", "patchify_proj"]).name
    (True, 'LTX-2')
    """
    tied = families_of(module_names)
    return next((f for f in tied if model_class in f.model_classes), tied[0]) if tied else None


def families_of(module_names) -> list[Family]:
    """The families `family_of` picks from: those with the best score, in `FAMILIES` order (several: a tie).

    >>> import torch
    >>> from lora_loader.delta import LoraDelta
    >>> [f.name for f in families_of(["double_blocks_0_img_attn_qkv"])]
    ['Flux', 'Flux.2', 'HunyuanVideo 1.5', 'HunyuanVideo']
    >>> d = 8  # single_blocks' linear1: 7 rows per input feature in Flux.1, 9 in Flux.2
    >>> [f.name for f in families_of({"single_blocks_0_linear1": LoraDelta(torch.ones(1, d), torch.ones(9 * d, 1))})]
    ['Flux.2', 'HunyuanVideo']
    """
    deltas = module_names if isinstance(module_names, dict) else {}
    names = {name: name.replace(".", "_") for name in module_names}
    scores = {family.name: family.score(list(names.values())) for family in FAMILIES}
    ruled_out = set()  # families whose widths a module contradicts where another family's fit it (`Family.shapes`)
    if any(family.shapes and scores[family.name][1] for family in FAMILIES):  # else no width rule can change the pick
        for name, delta in deltas.items():
            fits = {family.name: family.fits(names[name], delta) for family in FAMILIES if family.shapes}
            if True in fits.values():
                ruled_out |= {family for family, fit in fits.items() if fit is False}
    best, best_score = [], (0, 0)
    for family in FAMILIES:
        if family.name in ruled_out:
            continue
        known, in_blocks = scores[family.name]
        # Only block names claim a file: a top-level name (context_embedder) may be diffusers' name too.
        if in_blocks and (known, in_blocks) > best_score:
            best, best_score = [family], (known, in_blocks)
        elif in_blocks and (known, in_blocks) == best_score:
            best.append(family)
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
        family = family_of(mine)  # with the deltas: their widths rule families out (`Family.shapes`)
        if family is None or 2 * family.score([m.replace(".", "_") for m in mine])[0] <= len(mine):
            add_unclaimed(result, component, mine, instead=(tuple((component, m) for m in mine), ()), skip=())
            continue
        for module in mine:
            del result.deltas[(component, module)]
        add_originals(result, component, mine)


@dataclass(frozen=True)
class Alternative:
    """Another family's reading of a file's original-named modules, for a live model of one of ``model_classes``:
    in ``component`` (the file's symbolic one), ``deltas`` / ``unknown`` replace those of ``instead``, the keys
    the first family's reading gave."""

    component: str
    model_classes: tuple[str, ...]
    deltas: dict
    unknown: dict
    instead: tuple[tuple, tuple]  # (the (component, path) keys of deltas, the file keys of unknown) to drop


def add_originals(result, component: str, modules: dict) -> None:
    """A component's modules in a family's original names (module -> delta) into ``result`` (`ConvertedLora`),
    read by the family `family_of` picks from names and widths. Where families tie (Flux.1's and Flux.2's
    attention-only files: same names, same widths) and read the modules differently, the first is the reading,
    and each other one is kept as an `Alternative` for a live model of its class (`for_model`): the file alone
    cannot tell them apart; the model it is loaded into can.
    """
    tied = families_of(modules)
    readings = []
    for family in tied:
        reading = type(result)()
        for module, delta in modules.items():
            add_original(reading, family, component, module, delta)
        readings.append((family, reading))
    first = readings[0][1]
    result.deltas.update(first.deltas)
    result.unknown.update(first.unknown)
    instead = (tuple(first.deltas), tuple(first.unknown))
    for family, reading in readings[1:]:
        if family.model_classes and (set(reading.deltas), set(reading.unknown)) != (set(first.deltas), set(first.unknown)):
            result.alternatives.append(Alternative(component, family.model_classes, reading.deltas, reading.unknown, instead))
    add_unclaimed(result, component, modules, instead, skip=tied)


def add_unclaimed(result, component: str, modules: dict, instead: tuple, skip) -> None:
    """An `Alternative` reading of ``modules`` by each family (not in ``skip``) whose table knows every one of their
    names but none of which claims the file: names a causal LM shares (ACE-Step's ``layers_0_self_attn_q_proj``, a
    file without its ``cross_attn``) are read by the family only when loaded into one of its ``model_classes``.

    >>> import torch
    >>> from lora_loader.delta import LoraDelta
    >>> from lora_loader.formats.canonical import ConvertedLora
    >>> out = ConvertedLora()
    >>> add_unclaimed(out, "denoiser", {"layers.0.self_attn.q_proj": LoraDelta(torch.ones(1, 2), torch.ones(2, 1))}, ((), ()), ())
    >>> [(alt.model_classes, list(alt.deltas)) for alt in out.alternatives]
    [(('AceStepTransformer1DModel',), [('denoiser', 'layers.0.self_attn.to_q')])]
    """
    names = [m.replace(".", "_") for m in modules]
    for family in FAMILIES:
        if family in skip or not family.model_classes or family.claims(names) or family.score(names)[0] != len(names):
            continue
        reading = type(result)()
        for module, delta in modules.items():
            add_original(reading, family, component, module, delta)
        if not reading.unknown:
            result.alternatives.append(Alternative(component, family.model_classes, reading.deltas, reading.unknown, instead))


def for_model(converted, components: dict, resolve_component):
    """``converted`` as read for the live models: an `Alternative` whose family names the class of the model its
    component resolves to replaces the first family's reading (a copy; ``converted`` itself is left alone).
    The one place a live model picks between families (called by `inject.plan`)."""
    chosen = {}  # component -> the first alternative (in `FAMILIES` order) naming its live model's class
    for alt in converted.alternatives:
        name = resolve_component(alt.component)
        model = components.get(name) if name is not None else None
        if model is not None and type(getattr(model, "_orig_mod", model)).__name__ in alt.model_classes:
            chosen.setdefault(alt.component, alt)
    if not chosen:
        return converted
    deltas, unknown = dict(converted.deltas), dict(converted.unknown)
    for alt in chosen.values():
        drop_deltas, drop_unknown = alt.instead
        for key in drop_deltas:
            deltas.pop(key, None)
        for key in drop_unknown:
            unknown.pop(key, None)
        deltas.update(alt.deltas)
        unknown.update(alt.unknown)
    return dataclasses.replace(converted, deltas=deltas, unknown=unknown, alternatives=[])
