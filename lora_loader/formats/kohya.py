"""Kohya / sd-scripts keys: ``lora_unet_<mangled path>.lora_down.weight`` and friends.

A module's keys share a prefix that names the component and the
underscore-mangled module path:

=================  ================
``lora_unet_``     the UNet / DiT (``"denoiser"``)
``lora_transformer_``  the DiT, in diffusers' names (OneTrainer)
``lora_te_``       ``text_encoder`` (SD 1.x / 2.x)
``lora_te1_``      ``text_encoder`` (SDXL CLIP-L)
``lora_te2_``      ``text_encoder_2`` (SDXL CLIP-G)
``lora_te3_``      the T5 encoder (``text_encoder_3`` in SD3, ``text_encoder_2`` in Flux)
``oft_unet_``      the UNet, sd-scripts' ``networks.oft`` (OFT only)
=================  ================

Suffixes: ``.lora_down.weight`` ([r, in] or [r, in, kh, kw]),
``.lora_up.weight`` ([out, r] or [out, r, 1, 1]) and an optional scalar
``.alpha`` of any dtype (scale = alpha / r; absent or 0 means alpha = r, as
sd-scripts' ``LoRAModule`` defines it). LyCORIS writes its other algorithms in
the same naming (and as ``lycoris_<path>``): ``lora_mid`` (LoCon Tucker),
``hada_*`` (LoHa), ``lokr_*`` (LoKr), ``diff``/``diff_b`` (full),
``oft_blocks``/``rescale`` (OFT, BOFT: ``alpha`` is their constraint and stays a
factor), ``a1.weight``..``b2.weight`` (GLoRA) and ``dora_scale`` (DoRA) become `delta.FactorDelta`; a plain pair stays a
`LoraDelta` with its fast paths.

Two extras that LightX2V's and Kijai's Wan LoRAs (and ComfyUI, which reads them) use:
a ``diff_b`` beside a plain pair is the bias change of that module, applied with the
LoRA (``lora_B.bias`` as diffusers converts it, divided by the pair's scale so the
layer's ``scale * lora_B.bias`` is ``diff_b`` again); and ``<module>.diff_m`` is the
diff of the module's ``modulation`` parameter, read as ``<module>_modulation.diff``.
"""

from __future__ import annotations

import torch

from ..delta import FactorDelta, LoraDelta
from ..algorithms import ALGORITHMS, SHARED_KEYS, algorithm_of_suffixes, all_factor_keys
from .canonical import ConvertedLora
from .original_names import add_originals, family_of

PREFIXES = (
    ("lora_unet_", "denoiser"),
    ("lora_transformer_", "denoiser"),  # OneTrainer / "mixture" Flux files: diffusers' DiT names, underscored
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "t5"),  # sd-scripts' SD3 and Flux networks both call T5-XXL te3
    ("lora_te_", "text_encoder"),
    ("lycoris_", "denoiser"),  # LyCORIS' own wrapper (SimpleTuner): lycoris_<mangled path>
    ("oft_unet_", "denoiser"),  # sd-scripts' networks/oft.py: oft_unet_<mangled path>.oft_blocks / .alpha
)

# Keys of other algorithms in the same naming: recognised so the error says what they are.
_NOT_YET = {
    "lokr_t1": "LoKr lokr_t1 is not used by LyCORIS either",
}
_SUFFIXES = all_factor_keys() | set(SHARED_KEYS)
# LightX2V's diff of a module's ``modulation`` parameter (tools/extract/lora_extractor.py: ".modulation" -> ".diff_m").
MODULATION_DIFF = "diff_m"
_LORA_PAIR = {"lora_down.weight", "lora_up.weight"}


def claims(key: str) -> bool:
    return key.startswith(tuple(prefix for prefix, _ in PREFIXES))


def _split(key: str) -> tuple[str, str, str]:
    """``lora_te1_x_y.lora_up.weight`` -> (component, module, suffix)."""
    module_key, _, suffix = key.partition(".")
    for prefix, component in PREFIXES:
        if module_key.startswith(prefix):
            # VideoX-Fun (CogVideoX-Fun, its Wan and EasyAnimate LoRAs) joins prefix, the adapted root's empty
            # name and the path with dots before mangling: lora_unet__transformer_blocks_0_attn1_to_q.
            return component, module_key[len(prefix):].removeprefix("_"), suffix
    raise AssertionError(key)  # claims() guarantees a prefix


def alpha_value(tensor: torch.Tensor) -> float:
    return float(tensor.item() if tensor.numel() == 1 else tensor.detach().float().reshape(-1)[0])


def convert(tensors: dict[str, torch.Tensor], configs: dict) -> ConvertedLora:
    result = ConvertedLora()
    modules: dict[tuple[str, str], dict[str, str]] = {}
    for key in tensors:
        component, module, suffix = _split(key)
        if suffix == MODULATION_DIFF:  # blocks_0.diff_m: the diff of parameter blocks_0_modulation
            module, suffix = f"{module}_modulation", "diff"
        if suffix in _SUFFIXES:
            modules.setdefault((component, module), {})[suffix] = key
        elif suffix in _NOT_YET:
            result.unknown[key] = _NOT_YET[suffix]
        else:
            result.unknown[key] = (
                "expected .lora_down.weight, .lora_up.weight, .alpha, or a LyCORIS factor "
                "(lora_mid, hada_*, lokr_*, diff, w_norm, oft_blocks, a1.weight, dora_scale) after the module name"
            )
    denoiser = {}  # module -> delta of the denoiser's modules, renamed below if in a family's original names
    for (component, module), keys in modules.items():
        alpha_key = keys.get("alpha")
        factor_keys = {s: k for s, k in keys.items() if s not in ("alpha", "dora_scale")}
        dora_key = keys.get("dora_scale")
        if not factor_keys:
            if alpha_key:
                result.ignored.append(alpha_key)  # an alpha with no pair changes nothing
            if dora_key:
                result.unknown[dora_key] = "a dora_scale with no LoRA factors beside it"
            continue
        # A plain pair with the module's bias diff (LightX2V): one LoRA whose lora_B carries a bias.
        lora_bias_key = factor_keys.pop("diff_b") if set(factor_keys) == _LORA_PAIR | {"diff_b"} and not dora_key else None
        found = algorithm_of_suffixes(set(keys) - {"diff_b"} if lora_bias_key else set(keys))
        if found is None:
            algorithms = ", ".join(sorted({a.title for s in factor_keys for a in ALGORITHMS.values() if s in a.factor_keys and a.kind != "locon"}))
            for k in factor_keys.values():
                result.unknown[k] = f"mixes the factors of several algorithms on one module ({algorithms}: {sorted(factor_keys)})"
            continue
        kind, missing = found.kind, found.missing(set(factor_keys))
        if missing:
            for k in factor_keys.values():
                result.unknown[k] = f"its {found.title} factor(s) {', '.join(missing)} are missing"
            if alpha_key:
                result.ignored.append(alpha_key)
            if dora_key:
                result.unknown[dora_key] = f"its {found.title} factor(s) {', '.join(missing)} are missing"
            continue
        alpha = alpha_value(tensors[alpha_key]) if alpha_key and not found.alpha_in_factors else None
        if alpha == 0:
            alpha = None  # sd-scripts and LyCORIS: alpha 0 or None means alpha = rank
        used = tuple(factor_keys.values()) + tuple(k for k in (alpha_key, dora_key, lora_bias_key) if k)
        if kind == "lora" and dora_key is None:
            down, up = tensors[factor_keys["lora_down.weight"]], tensors[factor_keys["lora_up.weight"]]
            delta = LoraDelta(down, up, alpha, keys=used)
            if lora_bias_key:  # added as scale * up_bias: the bias change itself, divided by the scale
                diff_b = tensors[lora_bias_key]
                delta.up_bias = diff_b if delta.scale == 1 else diff_b.float() / delta.scale
        else:
            factors = {s: tensors[k] for s, k in factor_keys.items()}
            if alpha_key and found.alpha_in_factors:  # OFT's constraint, not a scale
                factors["alpha"] = tensors[alpha_key]
            dora = tensors[dora_key] if dora_key else None
            delta = FactorDelta(kind, factors, alpha, keys=used, dora_scale=dora)
        if component == "denoiser":
            denoiser[module] = delta
        else:
            result.deltas[(component, module)] = delta
    # Original-checkpoint names of a DiT: renamed (and fused projections split) onto diffusers' modules; the
    # deltas' widths rule out a family whose names they share but not its widths (Flux.1 / Flux.2).
    if family_of(denoiser) is not None:
        add_originals(result, "denoiser", denoiser)
    else:
        result.deltas.update({("denoiser", module): delta for module, delta in denoiser.items()})
    return result
