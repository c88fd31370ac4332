"""Write LoRA files the way real producers write them, for the tiny pipelines of `tiny.py`.

Every helper here is independent of lora_loader (nothing is imported from it):

- `peft_lora` trains nothing but creates adapters with PEFT itself (`add_peft_adapter`:
  ``inject_adapter_in_model`` + ``get_peft_model_state_dict``, what diffusers' and transformers'
  ``add_adapter`` do, without their version gates and glue), and
  `save_diffusers_lora` writes them with the pipeline's own ``save_lora_weights``
  (``lora_adapter_metadata`` header with rank, alpha, patterns, rsLoRA).
- `kohya_from_peft` converts those with diffusers' ``convert_state_dict_to_kohya``.
- `sd_scripts_sdxl_lora` / `sd_scripts_sd15_lora` write what kohya-ss/sd-scripts'
  ``networks/lora.py`` writes (LoRA on linears and 1x1 convs with ``network_dim`` /
  ``network_alpha``, "LoCon" on 3x3 convs with ``conv_dim`` / ``conv_alpha``), SDXL
  with Stability ("SGM") UNet names, renamed with `SDXL_UNET_CONVERSION_MAP`, a
  transcription of sd-scripts' ``make_unet_conversion_map``.
- `old_diffusers_lora` renames a PEFT state dict to the diffusers <= 0.25 layouts
  (attention processors' ``to_q_lora``, ``lora.down``, ``lora_linear_layer``) by
  inverting diffusers' own mapping tables.
"""

from __future__ import annotations

import os

import torch
from diffusers.utils import convert_state_dict_to_kohya
from diffusers.utils.state_dict_utils import DIFFUSERS_OLD_TO_PEFT, PEFT_TO_DIFFUSERS, UNET_TO_DIFFUSERS
from peft import inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


# -- PEFT / diffusers ----------------------------------------------------------------------------


def peft_lora(pipeline_factory, seed: int, configs: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Per component, the PEFT state dict of a fresh adapter made by PEFT from ``configs[component]``.

    ``configs`` maps a component (``unet``, ``text_encoder``, ``text_encoder_2``) to a
    ``peft.LoraConfig``; use ``init_lora_weights=False`` so lora_B is not zero.
    """
    pipe = pipeline_factory(0)
    out = {}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for component, config in configs.items():
            out[component] = add_peft_adapter(getattr(pipe, component), config)
    return out


def add_peft_adapter(model: nn.Module, config, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Inject a PEFT LoRA into ``model`` with peft's own ``inject_adapter_in_model`` and return its
    PEFT state dict (``<module>.lora_A.weight`` ...), detached copies.

    diffusers' ``ModelMixin.add_adapter`` and transformers' ``PeftAdapterMixin.add_adapter`` are this
    call plus glue (transformers 5.25's refuses peft < 0.22); the oracle files depend on peft alone.
    The injected adapter is active, as after either ``add_adapter``.
    """
    inject_adapter_in_model(config, model, adapter_name)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {k: v.detach().clone() for k, v in state.items()}


def save_diffusers_lora(directory, pipeline_cls, state_dicts: dict, configs: dict, weight_name: str) -> str:
    """Write ``state_dicts`` with ``pipeline_cls.save_lora_weights`` and the configs as header metadata."""
    kwargs = {"weight_name": weight_name}
    for component, sd in state_dicts.items():
        kwargs[f"{component}_lora_layers"] = sd
        kwargs[f"{component}_lora_adapter_metadata"] = configs[component].to_dict()
    pipeline_cls.save_lora_weights(os.fspath(directory), **kwargs)
    return os.path.join(os.fspath(directory), weight_name)


def save_state_dict(sd: dict[str, torch.Tensor], path) -> str:
    """A plain safetensors file, no header metadata (as Kohya tools and old diffusers wrote them)."""
    save_file({k: v.contiguous() for k, v in sd.items()}, os.fspath(path))
    return os.fspath(path)


def _with_text_model(key: str) -> str:
    """transformers < 5 had ``CLIPTextModel.text_model``; files from that era all carry the segment."""
    return key if key.startswith("text_model.") else "text_model." + key


def prefixed(state_dicts: dict, text_model: bool = True) -> dict[str, torch.Tensor]:
    """One state dict with ``unet.`` / ``text_encoder.`` / ``text_encoder_2.`` prefixes."""
    out = {}
    for component, sd in state_dicts.items():
        for key, value in sd.items():
            if text_model and component in TEXT_ENCODERS:
                key = _with_text_model(key)
            out[f"{component}.{key}"] = value
    return out


# -- Kohya via diffusers' converter -------------------------------------------------------------


def kohya_from_peft(state_dicts: dict, alpha=None) -> dict[str, torch.Tensor]:
    """diffusers' ``convert_state_dict_to_kohya`` of a PEFT LoRA (``lora_unet_*``, ``lora_te1_*``, ``lora_te2_*``).

    The converter writes ``alpha = rank`` as int64 tensors. ``alpha``, if given, is a
    tensor that replaces every ``.alpha`` (to make alpha != rank matter).
    """
    kohya = convert_state_dict_to_kohya(prefixed(state_dicts))
    if alpha is not None:
        for key in kohya:
            if key.endswith(".alpha"):
                kohya[key] = alpha.clone()
    return kohya


# -- sd-scripts ----------------------------------------------------------------------------------

# kohya-ss/sd-scripts library/sdxl_model_util.py, make_unet_conversion_map(), written out:
# (Stability / SGM prefix, diffusers prefix). Layer prefixes first, then the resnet
# children, then the embeddings and the in/out convs, as the function lists them.
SDXL_UNET_LAYER_MAP = (
    ("input_blocks.1.0.", "down_blocks.0.resnets.0."),
    ("input_blocks.1.1.", "down_blocks.0.attentions.0."),
    ("input_blocks.2.0.", "down_blocks.0.resnets.1."),
    ("input_blocks.2.1.", "down_blocks.0.attentions.1."),
    ("output_blocks.0.0.", "up_blocks.0.resnets.0."),
    ("output_blocks.0.1.", "up_blocks.0.attentions.0."),
    ("output_blocks.1.0.", "up_blocks.0.resnets.1."),
    ("output_blocks.1.1.", "up_blocks.0.attentions.1."),
    ("output_blocks.2.0.", "up_blocks.0.resnets.2."),
    ("output_blocks.2.1.", "up_blocks.0.attentions.2."),
    ("input_blocks.3.0.op.", "down_blocks.0.downsamplers.0.conv."),
    ("output_blocks.2.2.", "up_blocks.0.upsamplers.0."),
    ("input_blocks.4.0.", "down_blocks.1.resnets.0."),
    ("input_blocks.4.1.", "down_blocks.1.attentions.0."),
    ("input_blocks.5.0.", "down_blocks.1.resnets.1."),
    ("input_blocks.5.1.", "down_blocks.1.attentions.1."),
    ("output_blocks.3.0.", "up_blocks.1.resnets.0."),
    ("output_blocks.3.1.", "up_blocks.1.attentions.0."),
    ("output_blocks.4.0.", "up_blocks.1.resnets.1."),
    ("output_blocks.4.1.", "up_blocks.1.attentions.1."),
    ("output_blocks.5.0.", "up_blocks.1.resnets.2."),
    ("output_blocks.5.1.", "up_blocks.1.attentions.2."),
    ("input_blocks.6.0.op.", "down_blocks.1.downsamplers.0.conv."),
    ("output_blocks.5.2.", "up_blocks.1.upsamplers.0."),
    ("input_blocks.7.0.", "down_blocks.2.resnets.0."),
    ("input_blocks.7.1.", "down_blocks.2.attentions.0."),
    ("input_blocks.8.0.", "down_blocks.2.resnets.1."),
    ("input_blocks.8.1.", "down_blocks.2.attentions.1."),
    ("output_blocks.6.0.", "up_blocks.2.resnets.0."),
    ("output_blocks.6.1.", "up_blocks.2.attentions.0."),
    ("output_blocks.7.0.", "up_blocks.2.resnets.1."),
    ("output_blocks.7.1.", "up_blocks.2.attentions.1."),
    ("output_blocks.8.0.", "up_blocks.2.resnets.2."),
    ("output_blocks.8.1.", "up_blocks.2.attentions.2."),
    ("input_blocks.9.0.op.", "down_blocks.2.downsamplers.0.conv."),
    ("output_blocks.8.2.", "up_blocks.2.upsamplers.0."),
    ("middle_block.1.", "mid_block.attentions.0."),
    ("middle_block.0.", "mid_block.resnets.0."),
    ("middle_block.2.", "mid_block.resnets.1."),
)
SDXL_UNET_RESNET_MAP = (
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
)
SDXL_UNET_OTHER_MAP = (
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("label_emb.0.0.", "add_embedding.linear_1."),
    ("label_emb.0.2.", "add_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
)
# The function's result: resnet prefixes expanded with the resnet children.
SDXL_UNET_CONVERSION_MAP = tuple(
    [
        (sgm + sgm_child, hf + hf_child)
        for sgm, hf in SDXL_UNET_LAYER_MAP
        if "resnets" in hf
        for sgm_child, hf_child in SDXL_UNET_RESNET_MAP
    ]
    + [(sgm, hf) for sgm, hf in SDXL_UNET_LAYER_MAP if "resnets" not in hf]
    + list(SDXL_UNET_OTHER_MAP)
)


def diffusers_to_sgm(module_name: str) -> str:
    """A diffusers SDXL UNet module path in Stability's layout, as sd-scripts' ``convert_unet_state_dict``
    finds it: strip fragments from the right until a prefix is in the map.

    >>> diffusers_to_sgm("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    'input_blocks.4.1.transformer_blocks.0.attn1.to_q'
    >>> diffusers_to_sgm("up_blocks.0.upsamplers.0.conv")
    'output_blocks.2.2.conv'
    """
    by_hf = {hf: sgm for sgm, hf in SDXL_UNET_CONVERSION_MAP}
    key = module_name + ".weight"
    fragments = key.split(".")[:-1]
    while fragments:
        prefix = ".".join(fragments) + "."
        if prefix in by_hf:
            return (by_hf[prefix] + key[len(prefix):])[: -len(".weight")]
        fragments.pop()
    raise KeyError(f"{module_name} has no Stability name")


def _lora_pair(module: nn.Module, rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_down, lora_up) as sd-scripts' LoRAModule shapes them: a conv's down keeps its kernel, up is 1x1."""
    if isinstance(module, nn.Conv2d):
        out_ch, in_ch, kh, kw = module.weight.shape
        down = torch.randn(rank, in_ch, kh, kw, generator=g) / (in_ch * kh * kw) ** 0.5
        up = torch.randn(out_ch, rank, 1, 1, generator=g) * 0.5
    else:
        out_f, in_f = module.weight.shape
        down = torch.randn(rank, in_f, generator=g) / in_f**0.5
        up = torch.randn(out_f, rank, generator=g) * 0.5
    return down, up


def _is_locon(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)


def _sd_scripts_modules(root: nn.Module, exclude=()):
    for name, module in root.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not any(part in name for part in exclude):
            yield name, module


def _sd_scripts_lora(
    pipe,
    seed: int,
    unet_name,
    te_prefixes: dict[str, str],
    network_dim: int,
    network_alpha: torch.Tensor,
    conv_dim: int,
    conv_alpha: torch.Tensor,
    unet_exclude=(),
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def add(kohya_name: str, module: nn.Module) -> None:
        locon = _is_locon(module)
        down, up = _lora_pair(module, conv_dim if locon else network_dim, g)
        sd[f"{kohya_name}.lora_down.weight"] = down
        sd[f"{kohya_name}.lora_up.weight"] = up
        sd[f"{kohya_name}.alpha"] = (conv_alpha if locon else network_alpha).clone()

    for name, module in _sd_scripts_modules(pipe.unet, unet_exclude):
        add("lora_unet_" + unet_name(name).replace(".", "_"), module)
    for component, prefix in te_prefixes.items():
        for name, module in _sd_scripts_modules(getattr(pipe, component)):
            if ".layers." in name:  # sd-scripts targets CLIPAttention and CLIPMLP
                add(prefix + _with_text_model(name).replace(".", "_"), module)
    return sd


def sd_scripts_sdxl_lora(pipe, seed: int, unet_exclude=()) -> dict[str, torch.Tensor]:
    """An SDXL LoRA as sd-scripts' ``sdxl_train_network.py`` saves it (with ``conv_dim``), on every
    linear and conv of the UNet, named in Stability's layout (``lora_unet_input_blocks_4_1_...``),
    and on every linear of both text encoders (``lora_te1_text_model_...``, ``lora_te2_...``).

    network_dim 4 / network_alpha 2 (fp16) on linears and 1x1 convs; conv_dim 2 /
    conv_alpha 1 (bf16) on 3x3 convs (LoCon: ``lora_down`` [r, in, 3, 3], ``lora_up`` [out, r, 1, 1]).
    """
    return _sd_scripts_lora(
        pipe,
        seed,
        diffusers_to_sgm,
        {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
        network_dim=4,
        network_alpha=torch.tensor(2.0, dtype=torch.float16),
        conv_dim=2,
        conv_alpha=torch.tensor(1.0, dtype=torch.bfloat16),
        unet_exclude=unet_exclude,
    )


def sd_scripts_sd15_lora(pipe, seed: int, unet_exclude=()) -> dict[str, torch.Tensor]:
    """An SD 1.5 LoRA as sd-scripts' ``train_network.py`` saves it: UNet in diffusers' module names,
    underscore-mangled (``lora_unet_down_blocks_0_attentions_0_proj_in``, a 1x1 conv in SD 1.5),
    text encoder as ``lora_te_text_model_encoder_...``.

    network_dim 4 / network_alpha 1 (fp32) on linears and 1x1 convs; conv_dim 3 /
    conv_alpha 6 (fp16) on 3x3 convs.
    """
    return _sd_scripts_lora(
        pipe,
        seed,
        lambda name: name,
        {"text_encoder": "lora_te_"},
        network_dim=4,
        network_alpha=torch.tensor(1.0),
        conv_dim=3,
        conv_alpha=torch.tensor(6.0, dtype=torch.float16),
        unet_exclude=unet_exclude,
    )


# -- old diffusers layouts -----------------------------------------------------------------------


def _inverted(table: dict[str, str]) -> list[tuple[str, str]]:
    return [(new, old) for old, new in table.items()]


def old_diffusers_lora(state_dicts: dict, text_encoder_style: str = "processor") -> dict[str, torch.Tensor]:
    """A PEFT LoRA renamed to diffusers' pre-PEFT layouts, with diffusers' own tables read backwards.

    UNet (``UNET_TO_DIFFUSERS`` inverted): attention projections as attention-processor
    LoRAs (``attn1.processor.to_q_lora.down.weight``, ``to_out_lora``), every other
    module as ``LoRACompatibleLinear``/``Conv`` (``proj_in.lora.down.weight``).
    Text encoders: ``text_encoder_style="processor"`` inverts ``DIFFUSERS_OLD_TO_PEFT``
    (``self_attn.to_q_lora.down.weight``, mlp as ``fc1.lora_linear_layer.down.weight``);
    ``"lora_linear_layer"`` applies ``PEFT_TO_DIFFUSERS`` (``q_proj.lora_linear_layer.down.weight``).
    No alpha: these layouts had none (alpha = rank).
    """
    unet_table = _inverted(UNET_TO_DIFFUSERS)
    if text_encoder_style == "processor":
        te_table = _inverted(DIFFUSERS_OLD_TO_PEFT)
    elif text_encoder_style == "lora_linear_layer":
        te_table = list(PEFT_TO_DIFFUSERS.items()) + [
            (".lora_A", ".lora_linear_layer.down"),
            (".lora_B", ".lora_linear_layer.up"),
        ]
    else:
        raise ValueError(text_encoder_style)
    out = {}
    for component, sd in state_dicts.items():
        table = unet_table if component == "unet" else te_table
        for key, value in sd.items():
            if component in TEXT_ENCODERS:
                key = _with_text_model(key)
            for new, old in table:
                if new in key:
                    key = key.replace(new, old)
                    break
            else:
                raise KeyError(f"no old diffusers name for {key}")
            if component == "unet" and "_lora." in key:
                # attention processors lived at attn1.processor: to_q_lora is a child of the processor
                head, _, tail = key.rpartition(".to_")
                key = f"{head}.processor.to_{tail}"
            out[f"{component}.{key}"] = value
    return out
