"""Which base model a LoRA was made for: SD 1.x, SD 2.x, SDXL, SD3, Flux or a causal LM.

`detect_family` reads it from the converted file's module names and shapes;
``lora-loader inspect`` reports it and ``lora-loader convert`` picks the model
to convert on with it (`lora_loader.skeletons`).

>>> from lora_loader.families import FAMILY_LABELS, family_from_metadata
>>> FAMILY_LABELS[family_from_metadata({"ss_base_model_version": "sdxl_base_v1-0"})]
'SDXL'
"""

from __future__ import annotations

import re

from .formats.original_names import FAMILIES

FAMILY_LABELS = {
    "sd1": "SD 1.x",
    "sd2": "SD 2.x",
    "sd1/sd2": "SD 1.x/2.x",
    "sdxl": "SDXL",
    "sd3": "SD3",
    "flux": "Flux",
    "causal-lm": "causal LM",
    "unknown": "unknown",
} | {family.key: family.name for family in FAMILIES if family.key not in ("flux", "sd3")}
# Table families whose diffusers module names a Flux / SD3 guess would take: a header naming one decides first.
_SHARED_NAMES_FAMILIES = {family.key for family in FAMILIES} - {"flux", "sd3"}
# Cross-attention input width (the text encoder's hidden size the UNet attends to) per UNet family.
_CROSS_ATTENTION_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
# Text encoder hidden size: CLIP ViT-L (SD 1.x, SDXL's first), OpenCLIP ViT-H (SD 2.x), OpenCLIP bigG (SDXL's second).
_TEXT_ENCODER_WIDTH = {768: "sd1", 1024: "sd2", 1280: "sdxl"}
# The symbolic component "denoiser" under the name the family's pipeline gives it.
DENOISER_NAME = {"sd1": "unet", "sd2": "unet", "sd1/sd2": "unet", "sdxl": "unet"} | {f.key: "transformer" for f in FAMILIES}

_UNET_MARKERS = ("down_blocks_", "up_blocks_", "mid_block_", "input_blocks_", "output_blocks_", "middle_block_", "conv_in", "time_embedding_")
# SD3's diffusers module names (Flux's double blocks and Qwen-Image's attention share them): the SD3 guess needs
# a file of these names only, so a DiT it does not know is "unknown", not SD3.
_SD3_NAMES = re.compile(
    r"^(?:transformer_blocks_\d+_(?:attn2?_(?:to_q|to_k|to_v|to_out_0|add_[qkv]_proj|to_add_out|norm_(?:added_)?[qk])"
    r"|ff(?:_context)?_net_(?:0_proj|2)|norm1(?:_context)?_linear)"
    r"|pos_embed_proj|context_embedder|proj_out|norm_out_linear|time_text_embed_(?:timestep|text)_embedder_linear_[12])$"
)
# CLIP text encoders' layer names (SD's text encoders): another text encoder's width says nothing of SD.
_CLIP_LAYERS = "text_model_encoder_layers_"
_LM_PATTERNS = (
    re.compile(r"(^|_)layers_\d+_(self_attn|mlp|attention|feed_forward)_"),  # Llama, Mistral, Qwen, Gemma, ...
    re.compile(r"(^|_)decoder_layers_\d+_"),  # OPT
    re.compile(r"(^|_)h_\d+_(attn|mlp)_"),  # GPT-2, GPT-J
    re.compile(r"(^|_)gpt_neox_layers_\d+_"),
)


def family_from_metadata(metadata: dict[str, str]) -> str | None:
    """The family a producer wrote in the header: sd-scripts' ``ss_base_model_version``, ``modelspec.architecture``,
    or ours. Only a hint: the keys and shapes decide when they can.

    >>> family_from_metadata({"modelspec.architecture": "stable-diffusion-3-medium/lora"})
    'sd3'
    """
    text = " ".join(
        metadata.get(k, "") for k in ("ss_base_model_version", "modelspec.architecture", "lora_loader.base_model")
    ).lower()
    for family in FAMILIES:  # the DiT families' own names first: "wan2.1-t2v-14b" is no SD 1.x "-v1"
        if family.key in text.split() or any(hint in text for hint in family.header_hints):
            return family.key
    for needle, family in (("flux", "flux"), ("sdxl", "sdxl"), ("-xl", "sdxl"), ("sd3", "sd3"), ("stable-diffusion-3", "sd3"),
                           ("sd_v2", "sd2"), ("v2-", "sd2"), ("sd_v1", "sd1"), ("-v1", "sd1"), ("sd1/sd2", "sd1/sd2")):
        if needle in text:
            return family
    return None


def _in_features(delta) -> int | None:
    """The input width of the module a delta targets (its dense delta's second dimension)."""
    down = getattr(delta, "down", None)
    if down is not None:
        return int(down.shape[1]) if down.dim() >= 2 else None
    shape = delta.dense_shape() if hasattr(delta, "dense_shape") else None
    return int(shape[1]) if shape and len(shape) >= 2 else None


def _first_match(items: list, pattern: str):
    """The first delta of ``[(name, delta)]`` whose module name matches ``pattern``, or None."""
    return next((d for n, d in items if re.search(pattern, n)), None)


def detect_family(deltas: dict, metadata: dict[str, str] | None = None, adapter_config: dict | None = None) -> tuple[str, list[str]]:
    """``(family, evidence)`` of a converted LoRA, from its module names and shapes.

    ``deltas`` is `formats.convert`'s ``{(component, module): delta}``. The
    names give the kind of model (UNet block names, Flux's single blocks, a
    causal LM's ``model.layers.N``); within SD UNets the cross-attention input
    width (768 / 1024 / 2048) and the text encoders' widths tell SD 1.x, 2.x and
    SDXL apart. The header's family (if any) decides only what shapes cannot.

    >>> import torch
    >>> d = {("denoiser", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"):
    ...      type("D", (), {"down": torch.zeros(4, 2048)})()}
    >>> detect_family(d)[0]
    'sdxl'
    """
    components = {c for c, _ in deltas}
    # A converter files a prefixed key under "unet"/"transformer" and an unprefixed one under "denoiser".
    denoiser = [(m.replace(".", "_"), d) for (c, m), d in deltas.items() if c in ("denoiser", "unet", "transformer")]
    text_encoder = [(m.replace(".", "_"), d) for (c, m), d in deltas.items() if c == "text_encoder"]
    unet = [n for n, _ in denoiser if n.startswith(_UNET_MARKERS)]  # at the start: SANA's ff.conv_inverted is no conv_in

    decided = _family_from_names(components, denoiser, unet, adapter_config, metadata, deltas)
    if decided is not None:
        return decided
    family, evidence = _unet_family(components, denoiser, text_encoder, unet)
    # The header decides only what names and widths leave open: nothing found, or "some SD UNet".
    hinted = family_from_metadata(metadata or {})
    if hinted and (family is None or (family == "sd1/sd2" and hinted in ("sd1", "sd2", "sdxl"))):
        evidence.append(f"header metadata names {FAMILY_LABELS[hinted]}")
        family = hinted
    if family is None:
        return "unknown", evidence or ["no known block names"]
    return family, evidence


def _family_from_names(components: set, denoiser: list, unet: list[str], adapter_config: dict | None,
                       metadata: dict[str, str] | None = None, deltas: dict | None = None) -> tuple[str, list[str]] | None:
    """The families the names alone settle (a causal LM, Flux, SD3), or None: a UNet, or nothing known. A header
    naming a table family (not Flux or SD3) decides before the Flux / SD3 guesses, which go by diffusers names
    other families share (HunyuanVideo's blocks are Flux's, HunyuanVideo 1.5's joint blocks SD3's)."""
    names = [n for n, _ in denoiser]
    if (adapter_config or {}).get("task_type") == "CAUSAL_LM":
        return "causal-lm", ["adapter_config.json says task_type CAUSAL_LM"]
    original = _original_names_family(deltas)
    if original is not None:
        return original
    # Before the tables' names: Anima's DiT is Cosmos-Predict2's, so only its text conditioner tells the two apart.
    if "text_conditioner" in components:  # diffusers' AnimaLoraLoaderMixin alone loads into a text_conditioner
        return "anima", ["keys for Anima's text conditioner (text_conditioner / the checkpoint's llm_adapter)"]
    for family in FAMILIES:  # module names only one DiT family has (the tables' `detect`)
        hit = next((n for n in names for pattern in family.detect if re.search(pattern, n)), None)
        if hit is None and family.detect_widths:  # names it shares with another family, at widths only it has
            hit = next((n for n, d in denoiser if family.detected_by_width(n, _in_features(d))), None)
        if hit is not None and not any(re.search(pattern, n) for pattern in family.detect_unless for n in names):
            return family.key, [f"{family.name} module names ({hit})"]
    hinted = family_from_metadata(metadata or {})
    if hinted in _SHARED_NAMES_FAMILIES and not unet:
        return hinted, [f"header metadata names {FAMILY_LABELS[hinted]} (its diffusers module names are shared)"]
    if any(n.startswith(("double_blocks_", "single_blocks_")) or "single_transformer_blocks_" in n for n in names):
        return "flux", ["Flux block names (double_blocks/single_blocks or single_transformer_blocks)"]
    if "text_encoder_3" in components:
        return "sd3", ["keys for a third text encoder (lora_te3_ / text_encoder_3)"]
    if not unet and any("transformer_blocks_" in n for n in names) and all(_SD3_NAMES.match(n) for n in names):
        # Joint-attention blocks in the names SD3, Flux's double blocks and Qwen-Image share.
        to_q = _first_match(denoiser, r"transformer_blocks_\d+_attn_to_q$")
        width = _in_features(to_q) if to_q is not None else None
        deepest = max(int(m.group(1)) for n in names if (m := re.match(r"transformer_blocks_(\d+)_", n)))
        if width == 3072 and deepest >= 19:  # Flux.1 has 19 double blocks, Qwen-Image 60 of width 3072
            return "qwen-image", [f"joint-attention block {deepest} of width 3072 (Qwen-Image; Flux.1 has 19 double blocks)"]
        if width == 3072:
            return "flux", ["DiT transformer_blocks with attention width 3072 (Flux)"]
        if width in (4096, 6144):  # an attention-only Flux.2 file (Flux.1's names and layout for these modules)
            return "flux2", [f"DiT transformer_blocks with attention width {width} (Flux.2 Klein 9B / dev)"]
        return "sd3", [f"DiT transformer_blocks (joint attention), attention width {width} (SD3)"]
    lm_names = [m.replace(".", "_") for (c, m) in (deltas or {}) if c == "denoiser"] if deltas is not None else names
    # A pipeline's transformer (a key behind transformer.) is a DiT whose blocks may be named layers.N (Lumina 2).
    if not unet and any(p.search(n) for p in _LM_PATTERNS for n in lm_names) and not any("encoder_layers_" in n for n in names):
        return "causal-lm", ["decoder layer names (layers.N.self_attn / mlp)"]
    return None


# A file key's module stem: behind a producer's prefix, before the adapter's own suffix.
_STEM = re.compile(
    r"^(?:lora_unet_|lycoris_|diffusion_model\.|transformer\.|base_model\.model\.)?(.+?)"
    r"(?:\.(?:lora_(?:A|B|down|up)|lora\.(?:down|up)|lokr_w|hada_w|alpha$|diff|dora_scale$))"
)


def _original_names_family(deltas: dict | None) -> tuple[str, list[str]] | None:
    """The family (one with `Family.detect_original`) whose table alone knows most of the denoiser's modules as the
    FILE names them (its own keys, before conversion to diffusers' names): a file in one family's original checkpoint
    names (Anima's ``blocks.0.cross_attn.k_proj``) whose diffusers names other families share (``attn2.to_k``). None
    when no such table or several tables tie, or the names are diffusers' own. Other families' original names
    (MiniMax-H3's ``blocks.0.attn.qkv_proj``, ``mlp.fc1``) are too common in DiT code bases to name a file alone.

    >>> import torch
    >>> from lora_loader.delta import LoraDelta
    >>> d = LoraDelta(torch.ones(1, 2), torch.ones(2, 1), keys=("diffusion_model.blocks.0.cross_attn.k_proj.lora_A.weight",))
    >>> _original_names_family({("denoiser", "transformer_blocks.0.attn2.to_k"): d})[0]
    'anima'
    """
    from .formats.original_names import DENOISER_COMPONENTS, families_of

    stems = set()
    for (component, _), delta in (deltas or {}).items():
        if component in DENOISER_COMPONENTS:
            stems |= {m.group(1).replace(".", "_") for key in getattr(delta, "keys", ()) if (m := _STEM.match(key))}
    tied = families_of(sorted(stems)) if stems else []
    if len(tied) != 1 or not tied[0].detect_original or 2 * tied[0].score(stems)[0] <= len(stems):
        return None
    return tied[0].key, [f"{tied[0].name} original checkpoint names in the file's keys"]


def _unet_family(components: set, denoiser: list, text_encoder: list, unet: list[str]) -> tuple[str | None, list[str]]:
    """``(family or None, evidence)`` of an SD UNet LoRA, from the strongest clue down: a second text encoder,
    the cross-attention width, SDXL's block layout and depth, the ``proj_in`` kind, the text encoder's width."""
    evidence: list[str] = []
    family = None
    if "text_encoder_2" in components:
        family = "sdxl"
        evidence.append("keys for a second text encoder (lora_te2_ / text_encoder_2)")
    cross = _first_match(denoiser, r"attn2_to_[kv]$") if unet else None  # a DiT's cross-attention is no UNet's
    width = _in_features(cross) if cross is not None else None
    if width is not None:
        known = _CROSS_ATTENTION_WIDTH.get(width)
        evidence.append(f"cross-attention input width {width}" + ("" if known else " (not a known SD size)"))
        family = family or known
    if family is None and any(n.startswith(("input_blocks_", "output_blocks_", "middle_block_")) or "add_embedding_" in n or "label_emb_" in n for n in unet):
        family = "sdxl"
        evidence.append("Stability UNet block names / add_embedding (SDXL's layout in sd-scripts)")
    if family is None and any(re.search(r"transformer_blocks_[2-9]_", n) for n in unet):
        family = "sdxl"
        evidence.append("more than 2 transformer blocks per attention (SDXL depth 2/10)")
    proj = _first_match(denoiser, r"attentions_\d+_proj_(in|out)$")
    if family is None and getattr(proj, "down", None) is not None:
        # SD 1.x's proj_in/proj_out are 1x1 convs (a 4-D lora_down); SD 2.x and SDXL use linear projections.
        conv = proj.down.dim() == 4
        family = "sd1" if conv else "sd2"
        evidence.append(f"{'1x1 conv' if conv else 'linear'} proj_in/proj_out")
    clip = [(n, d) for n, d in text_encoder if n.startswith(_CLIP_LAYERS)]  # not Anima's Qwen3 (model.layers.N)
    q_proj = _first_match(clip, r"self_attn_q_proj$")
    te_width = _in_features(q_proj) if q_proj is not None else None
    if family is None and te_width is not None:
        evidence.append(f"text encoder width {te_width}" + ("" if te_width in _TEXT_ENCODER_WIDTH else " (not a known CLIP size)"))
        family = _TEXT_ENCODER_WIDTH.get(te_width)
    if family is None and (unet or clip):
        family = "sd1/sd2"
        evidence.append("UNet / CLIP text encoder names")
    return family, evidence
