"""What the DiT benchmark runs on: Flux.1-dev and Wan 2.1 14B at their real widths with fewer blocks, and the
LoRA files their trainers write for them.

Nothing is downloaded. The transformers are diffusers' own classes built from the real configs' widths
(``FluxTransformer2DModel``: 24 heads x 128 = 3072, MLP 4x, T5 width 4096, pooled 768, 64 input channels;
``WanTransformer3DModel``: 40 heads x 128 = 5120, FFN 13824, text width 4096, 16 input channels) with fewer
blocks, their weights filled from `workloads.fill_seeded`'s seeded pool. The files are written the way each
trainer saves them, with seeded factors:

- ``aitk``: ai-toolkit's LoRA on every linear layer of every block. Flux: diffusers/PEFT keys
  ``transformer.<module path>.lora_A.weight`` / ``lora_B.weight`` (no alpha: scale 1), bf16. Wan:
  the original checkpoint's names with ComfyUI's prefix, ``diffusion_model.blocks.N.self_attn.q.lora_A.weight``.
- ``kohya``: sd-scripts' ``networks.lora_flux`` file in BFL names (``lora_unet_double_blocks_0_img_attn_qkv``,
  ``lora_unet_single_blocks_0_linear1``, ...): fused projections with one ``lora_down`` and a stacked
  ``lora_up``, an ``.alpha`` per module, bf16; the modulation layers (``img_mod_lin``, ``txt_mod_lin``,
  ``modulation_lin``) left out, as sd-scripts' default exclude pattern does.
- ``lokr``: LyCORIS' LoKr through sd-scripts (``--network_module lycoris.kohya --network_args algo=lokr
  factor=16``) on the same BFL modules: ``lokr_w1`` (16 x 16, full), ``lokr_w2_a`` @ ``lokr_w2_b`` (rank r),
  ``.alpha``; diffusers has no LoKr loader.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file
from torch import nn

from workloads import fill_seeded, no_init, touch

# -- sizes ------------------------------------------------------------------------------------------------

# FLUX.1-dev's transformer config (black-forest-labs/FLUX.1-dev, transformer/config.json) but the block counts.
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_attention_heads=24, attention_head_dim=128, joint_attention_dim=4096,
    pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip
# Wan 2.1 T2V 14B's (Wan-AI/Wan2.1-T2V-14B-Diffusers, transformer/config.json) but the block count.
WAN_14B = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
    freq_dim=256, ffn_dim=13824, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)  # fmt: skip


@dataclass
class DitSize:
    """One family at one width: its config, the blocks built here and in the full model."""

    family: str  # "flux" or "wan"
    label: str  # what the table calls the model
    config: dict
    blocks: tuple[int, ...]  # Flux: (double, single); Wan: (blocks,)
    full_blocks: tuple[int, ...]  # the real model's, for the extrapolation
    full_label: str
    layouts: tuple[str, ...]
    ranks: tuple[int, ...] = (16, 32)
    img_tokens: int = 64  # forward: image / video tokens after patching
    txt_tokens: int = 16
    extra_full: list[tuple[str, float]] = field(default_factory=list)  # (label, factor) more extrapolations

    @property
    def scale(self) -> float:
        """How many times the reduced model's blocks the full model has (the same mix of block kinds)."""
        ratios = {f / b for f, b in zip(self.full_blocks, self.blocks)}
        if len(ratios) != 1:  # e.g. Flux 1 double + 1 single: the kinds would scale differently
            raise ValueError(f"blocks {self.blocks} are not a fixed fraction of the full model's {self.full_blocks}")
        return ratios.pop()

    @property
    def width(self) -> int:
        return self.config["num_attention_heads"] * self.config["attention_head_dim"]

    def blocks_text(self) -> str:
        if self.family == "flux":
            return f"{self.blocks[0]} double + {self.blocks[1]} single blocks (full: {self.full_blocks[0]} + {self.full_blocks[1]})"
        return f"{self.blocks[0]} blocks (full: {self.full_blocks[0]})"


def flux_size(double: int = 1, single: int = 2, quick: bool = False) -> DitSize:
    config = dict(FLUX_DEV, num_layers=double, num_single_layers=single)
    if quick:  # 4 heads of 128: the same code paths at a sixth of the width
        config.update(num_attention_heads=4, joint_attention_dim=512)
    return DitSize("flux", "Flux.1-dev" if not quick else "Flux.1-dev shape, 512 wide (quick)", config, (double, single), (19, 38),
                   "Flux.1-dev (19 double + 38 single)", ("aitk", "kohya", "lokr"), img_tokens=64 if not quick else 16,
                   txt_tokens=16 if not quick else 8)


def wan_size(blocks: int = 2, quick: bool = False) -> DitSize:
    config = dict(WAN_14B, num_layers=blocks)
    if quick:
        config.update(num_attention_heads=4, ffn_dim=1536, text_dim=512)
    size = DitSize("wan", "Wan 2.1 14B" if not quick else "Wan 2.1 shape, 512 wide (quick)", config, (blocks,), (40,),
                   "Wan 2.1 14B (40 blocks)", ("aitk",), img_tokens=64 if not quick else 16, txt_tokens=16 if not quick else 8)
    size.extra_full.append(("Wan 2.2 A14B (2 experts x 40 blocks, one file each)", 2 * size.scale))
    return size


# -- models -------------------------------------------------------------------------------------------------


def build(size: DitSize, seed: int, dtype: torch.dtype = torch.bfloat16, fill: bool = True, blocks_only: bool = False) -> nn.Module:
    """The transformer with seeded weights in ``dtype``. ``blocks_only``: only the first block of each kind
    gets values (the forward figure calls those directly, so the rest of the memory is never touched and
    stays unmapped)."""
    from diffusers import FluxTransformer2DModel, WanTransformer3DModel

    cls = FluxTransformer2DModel if size.family == "flux" else WanTransformer3DModel
    with no_init():
        model = cls(**size.config)
    model.to(dtype)
    if blocks_only:
        for name, child in model.named_children():
            if name.endswith("blocks"):
                fill_seeded(child[0], seed)
    elif fill:
        fill_seeded(model, seed)
    else:
        touch(model)
    return model.eval()


def pipeline(size: DitSize, transformer: nn.Module):
    """The family's pipeline around the transformer only (diffusers allows the other components to be None)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, WanPipeline

    if size.family == "flux":
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    else:
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every linear layer inside a block: what ai-toolkit's LoRA targets."""
    heads = ("transformer_blocks", "single_transformer_blocks", "blocks")
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[0] in heads]


def fingerprints(model: nn.Module) -> dict[str, str]:
    """SHA-1 of every weight's bytes, by its name in the plain model (PEFT's ``base_layer`` unwrapped, LoRA
    factors skipped): two fingerprints equal means bit-equal weights, without keeping a copy of the model."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        t = p.detach().cpu().contiguous()
        raw = t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)
        out[name.replace(".base_layer.", ".")] = hashlib.sha1(raw.numpy().tobytes()).hexdigest()
    return out


def changed(model: nn.Module, reference: dict[str, str]) -> int:
    now = fingerprints(model)
    missing = [k for k in reference if k not in now]
    if missing:
        raise RuntimeError(f"{len(missing)} weights not found after the cycle, e.g. {missing[:3]}")
    return sum(1 for k, h in reference.items() if now[k] != h)


# -- the trainers' names ----------------------------------------------------------------------------------

# BFL (the original Flux checkpoint) module -> diffusers modules it is made of, rows stacked in this order.
FLUX_DOUBLE = {
    "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"], "img_attn_proj": ["attn.to_out.0"],
    "img_mlp_0": ["ff.net.0.proj"], "img_mlp_2": ["ff.net.2"],
    "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"], "txt_attn_proj": ["attn.to_add_out"],
    "txt_mlp_0": ["ff_context.net.0.proj"], "txt_mlp_2": ["ff_context.net.2"],
}  # fmt: skip
FLUX_SINGLE = {"linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear2": ["proj_out"]}
# Wan's original module names (Wan-Video's WanModel) inside a block, as diffusers' converter maps them.
WAN_ORIGINAL = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v", "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}  # fmt: skip


def bfl_modules(model: nn.Module) -> list[tuple[str, list[nn.Linear]]]:
    """(BFL name, the diffusers linears it stacks) for every module sd-scripts' Flux LoRA trains by default."""
    out = []
    mods = dict(model.named_modules())
    for i in range(len(model.transformer_blocks)):
        out += [(f"double_blocks_{i}_{k}", [mods[f"transformer_blocks.{i}.{p}"] for p in v]) for k, v in FLUX_DOUBLE.items()]
    for i in range(len(model.single_transformer_blocks)):
        out += [(f"single_blocks_{i}_{k}", [mods[f"single_transformer_blocks.{i}.{p}"] for p in v]) for k, v in FLUX_SINGLE.items()]
    return out


def _randn(g: torch.Generator, *shape: int, std: float) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)


def write_file(size: DitSize, model: nn.Module, layout: str, path: str, rank: int, seed: int, max_blocks: int | None = None) -> dict:
    """Write one file of ``layout`` for ``model``; returns what it holds (modules, bytes). ``max_blocks``: only
    the first blocks (the warm-up file of the RSS child)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    n_modules = 0
    if layout == "aitk":
        for name, lin in block_linears(model):
            if max_blocks is not None and int(name.split(".")[1]) >= max_blocks:
                continue
            if size.family == "flux":
                key = f"transformer.{name}"
            else:
                _, i, rest = name.split(".", 2)
                key = f"diffusion_model.blocks.{i}.{WAN_ORIGINAL[rest]}"
            sd[f"{key}.lora_A.weight"] = _randn(g, rank, lin.in_features, std=lin.in_features**-0.5)
            sd[f"{key}.lora_B.weight"] = _randn(g, lin.out_features, rank, std=0.01)
            n_modules += 1
        meta = {"format": "pt", "software": '{"name": "ai-toolkit"}'}
    elif layout in ("kohya", "lokr"):
        assert size.family == "flux", layout
        for name, parts in bfl_modules(model):
            if max_blocks is not None and int(name.split("_")[2]) >= max_blocks:  # double_blocks_<i>_...
                continue
            rows, cols = sum(p.out_features for p in parts), parts[0].in_features
            key = f"lora_unet_{name}"
            if layout == "kohya":
                sd[f"{key}.lora_down.weight"] = _randn(g, rank, cols, std=cols**-0.5)
                sd[f"{key}.lora_up.weight"] = _randn(g, rows, rank, std=0.01)
                sd[f"{key}.alpha"] = torch.tensor(rank / 2, dtype=torch.bfloat16)
            else:  # LyCORIS LoKr, factor 16: w1 (16 x 16) full, w2 (rows/16 x cols/16) = w2_a @ w2_b of rank r
                f = 16
                sd[f"{key}.lokr_w1"] = _randn(g, f, f, std=0.1)
                sd[f"{key}.lokr_w2_a"] = _randn(g, rows // f, rank, std=0.1)
                sd[f"{key}.lokr_w2_b"] = _randn(g, rank, cols // f, std=(cols // f) ** -0.5)
                sd[f"{key}.alpha"] = torch.tensor(float(rank), dtype=torch.bfloat16)
            n_modules += 1
        meta = {"ss_network_module": "networks.lora_flux" if layout == "kohya" else "lycoris.kohya",
                "ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2 if layout == "kohya" else rank),
                "ss_base_model_version": "flux1"}
        if layout == "lokr":
            meta["ss_network_args"] = '{"algo": "lokr", "factor": "16"}'
    else:
        raise ValueError(layout)
    save_file(sd, path, metadata=meta)
    return {"modules": n_modules, "bytes": sum(t.numel() * t.element_size() for t in sd.values())}


def layout_text(size: DitSize, layout: str, rank: int) -> str:
    if layout == "aitk":
        keys = "`transformer.*.lora_A/B`" if size.family == "flux" else "`diffusion_model.blocks.N.*.lora_A/B`"
        return f"ai-toolkit rank {rank} ({keys}, every block linear)"
    if layout == "kohya":
        return f"Kohya sd-scripts rank {rank}, alpha {rank / 2:g} (`lora_unet_double_blocks_*`, fused qkv)"
    return f"LyCORIS LoKr factor 16, w2 rank {rank} (`lora_unet_*.lokr_w1/w2_a/w2_b`)"


# -- forward inputs ------------------------------------------------------------------------------------------


def block_inputs(size: DitSize, model: nn.Module, dtype: torch.dtype, device: str = "cpu") -> dict:
    """Seeded inputs for one block of each kind: hidden states, text states, the time embedding, the rotary table."""
    g = torch.Generator().manual_seed(11)
    d = size.width
    if size.family == "flux":
        ids = torch.zeros(size.txt_tokens + size.img_tokens, 3)
        side = int(size.img_tokens**0.5)
        ids[size.txt_tokens :, 1] = torch.arange(size.img_tokens).div(side, rounding_mode="floor").float()
        ids[size.txt_tokens :, 2] = (torch.arange(size.img_tokens) % side).float()
        with torch.no_grad():
            rope = tuple(t.to(device) for t in model.pos_embed(ids.to(device)))
        return dict(
            hidden_states=torch.randn(1, size.img_tokens, d, generator=g).to(device, dtype),
            encoder_hidden_states=torch.randn(1, size.txt_tokens, d, generator=g).to(device, dtype),
            temb=torch.randn(1, d, generator=g).to(device, dtype), image_rotary_emb=rope,
        )
    side = int(size.img_tokens**0.5)
    latent = torch.zeros(1, size.config["in_channels"], 1, 2 * side, 2 * side, device=device)
    with torch.no_grad():
        rope = model.rope(latent)
    return dict(
        hidden_states=torch.randn(1, size.img_tokens, d, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(1, size.txt_tokens, d, generator=g).to(device, dtype),
        temb=(torch.randn(1, 6, d, generator=g) * 0.1).to(device, dtype), rotary_emb=rope,
    )


def forward_blocks(size: DitSize, model: nn.Module, inputs: dict) -> torch.Tensor:
    """One forward of each block kind (Flux: the first double and the first single block; Wan: the first block),
    on the same inputs; the outputs concatenated for the checks."""
    outs = []
    with torch.no_grad():
        if size.family == "flux":
            ctx, img = model.transformer_blocks[0](**inputs)
            outs += [ctx.flatten(), img.flatten()]
            single = model.single_transformer_blocks[0](**inputs)
            outs += [t.flatten() for t in (single if isinstance(single, tuple) else (single,))]
        else:
            outs.append(model.blocks[0](**inputs).flatten())
    return torch.cat([o.float() for o in outs])
