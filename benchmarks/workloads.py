"""What the benchmarks run on: model sizes, models with seeded random weights, and the LoRA files.

Nothing is downloaded: the SD 1.5 UNet and CLIP text encoder and the Llama are
built from their configs, their weights filled from a seeded pool (fast, unlike
torch's init), and the Kohya and PEFT files written here with seeded factors.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from dataclasses import dataclass

import torch
from torch import nn

# -- sizes -------------------------------------------------------------------------------------------

SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    sample_size=64,
    in_channels=4,
    out_channels=4,
)
SD15_TEXT = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=49408)
# TinyLlama-1.1B's shape: 1.10 B parameters (16 layers would give only 0.84 B).
LLAMA_1B = dict(
    hidden_size=2048,
    num_hidden_layers=22,
    intermediate_size=5632,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
)


@dataclass
class Size:
    name: str
    unet: dict
    text: dict
    llama: dict
    latent: int  # latent side: the UNet forward runs on 1 x 4 x latent x latent
    lm_tokens: int  # the LM forward runs on 1 x lm_tokens
    n_load: int = 10  # adapters loaded one after another for "10th vs 1st"
    n_small: int = 50  # small adapters loaded for the set_adapters figure
    kohya_rank: int = 32
    kohya_alpha: float = 16.0
    small_rank: int = 4
    lm_rank: int = 16
    repeats: int = 5
    rss_repeats: int = 2


FULL = Size("full", SD15_UNET, SD15_TEXT, LLAMA_1B, latent=32, lm_tokens=64)
QUICK = Size(
    "quick",
    dict(SD15_UNET, block_out_channels=(64, 128, 256, 256), cross_attention_dim=256),
    dict(SD15_TEXT, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    dict(LLAMA_1B, hidden_size=512, num_hidden_layers=4, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2),
    latent=16,
    lm_tokens=32,
    n_small=10,
    repeats=2,
    rss_repeats=1,
)

UNET_TARGETS = re.compile(r".*\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|.*\.(proj_in|proj_out)|.*\.ff\.net\.(0\.proj|2)")
TEXT_TARGETS = re.compile(r".*\.self_attn\.(q_proj|k_proj|v_proj|out_proj)|.*\.mlp\.(fc1|fc2)")


# -- models with seeded random weights, built fast -----------------------------------------------------

_POOL = None


def _pool() -> torch.Tensor:
    """4M seeded uniform values of unit variance, twice over so any window of 4M can be sliced."""
    global _POOL
    if _POOL is None:
        pool = torch.empty(1 << 22).uniform_(-(3**0.5), 3**0.5, generator=torch.Generator().manual_seed(1234))
        _POOL = torch.cat([pool, pool])
    return _POOL


def fill_seeded(module: nn.Module, seed: int) -> None:
    """Seeded random weights without the cost of torch's init: every matrix gets windows of a random pool
    at seeded offsets, scaled to 1/sqrt(fan_in); norm weights 1, biases 0."""
    pool, n = _pool(), 1 << 22
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            flat = p.view(-1)
            if p.dim() >= 2:
                std = p[0].numel() ** -0.5
                for i in range(0, flat.numel(), n):
                    length = min(n, flat.numel() - i)
                    off = int(torch.randint(0, n, (1,), generator=g))
                    torch.mul(pool[off : off + length], std, out=flat[i : i + length])
            elif name.endswith("bias"):
                flat.zero_()
            else:
                flat.fill_(1.0)


@contextlib.contextmanager
def no_init():
    from transformers.initialization import no_init_weights

    with no_init_weights():
        yield


def build_unet(size: Size, seed: int, fill: bool = True):
    from diffusers import UNet2DConditionModel

    with no_init():
        unet = UNet2DConditionModel(**size.unet)
    if fill:
        fill_seeded(unet, seed)
    else:
        touch(unet)
    return unet.eval()


def build_text_encoder(size: Size, seed: int, fill: bool = True):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**size.text, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=size.text["hidden_size"])
    with no_init():
        te = CLIPTextModel(config)
    if fill:
        fill_seeded(te, seed)
    else:
        touch(te)
    return te.eval()


def touch(module: nn.Module) -> None:
    """Make every weight resident (for the memory figure, where values do not matter)."""
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(0.01)


def build_llama(size: Size, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**size.llama, tie_word_embeddings=False, max_position_embeddings=2048)
    with no_init():
        model = LlamaForCausalLM(config)
    fill_seeded(model, seed)
    return model.eval()


_TOKENIZER_DIR = None


def tiny_tokenizer():
    """A byte-level CLIP tokenizer with no merges, written offline (the pipeline needs one; it is never timed)."""
    global _TOKENIZER_DIR
    from transformers import CLIPTokenizer

    if _TOKENIZER_DIR is None:
        _TOKENIZER_DIR = tempfile.mkdtemp(prefix="bench-clip-tok-")
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs, extra = bs[:], 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + extra)
                extra += 1
        units = [chr(c) for c in cs]
        vocab = units + [u + "</w>" for u in units] + ["<|startoftext|>", "<|endoftext|>"]
        with open(os.path.join(_TOKENIZER_DIR, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
        with open(os.path.join(_TOKENIZER_DIR, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(_TOKENIZER_DIR, model_max_length=77)


def make_pipeline(unet, text_encoder):
    """A StableDiffusionPipeline around the given UNet and text encoder (a tiny VAE: it is never run)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=16,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# -- LoRA files ------------------------------------------------------------------------------------------


def kohya_targets(unet, text_encoder) -> list[tuple[str, nn.Module]]:
    """(Kohya module name, module) for every layer a full SD 1.5 LoRA covers, as sd-scripts names them."""
    out = []
    for name, module in unet.named_modules():
        if UNET_TARGETS.fullmatch(name):
            out.append(("lora_unet_" + name.replace(".", "_"), module))
    for name, module in text_encoder.named_modules():
        if TEXT_TARGETS.fullmatch(name):
            full = name if name.startswith("text_model.") else "text_model." + name  # transformers 5 dropped it
            out.append(("lora_te_" + full.replace(".", "_"), module))
    return out


def write_kohya(path: str, targets, rank: int, alpha: float, seed: int) -> int:
    """A Kohya/sd-scripts file: fp16 lora_down / lora_up (4-D for 1x1 convs) and fp16 .alpha, plus ss_ metadata."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, module in targets:
        if isinstance(module, nn.Conv2d):
            fan_in, fan_out = module.in_channels, module.out_channels
            down_shape, up_shape = (rank, fan_in, 1, 1), (fan_out, rank, 1, 1)
        else:
            fan_in, fan_out = module.in_features, module.out_features
            down_shape, up_shape = (rank, fan_in), (fan_out, rank)
        tensors[f"{key}.lora_down.weight"] = (torch.randn(down_shape, generator=g) * fan_in**-0.5).half()
        tensors[f"{key}.lora_up.weight"] = (torch.randn(up_shape, generator=g) * 0.02).half()
        tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha), "ss_base_model_version": "sd_v1"}
    save_file(tensors, path, metadata=meta)
    return len(targets)


def write_peft_adapters(model, folders: list[str], rank: int, seed: int) -> None:
    """PEFT adapter folders made by peft itself (get_peft_model + save_pretrained), rank ``rank`` on all linear layers."""
    from peft import LoraConfig, get_peft_model

    for i, folder in enumerate(folders):
        torch.manual_seed(seed + i)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        with torch.no_grad():  # init_lora_weights=False gives B a kaiming init: scale it to a realistic strength
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.05)
        peft_model.save_pretrained(folder)
        peft_model.unload()  # the base modules back in place, weights untouched
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if hasattr(model, attr):
                with contextlib.suppress(AttributeError):
                    delattr(model, attr)


# -- lora_loader / diffusers helpers ------------------------------------------------------------------


def peft_layer_counts(pipe_or_model, adapter: str, components=("unet", "text_encoder")) -> dict[str, int]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for component in components:
        model = getattr(pipe_or_model, component, None) if component != "model" else pipe_or_model
        if model is None:
            continue
        n = sum(1 for m in model.modules() if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {}))
        if n:
            out[component] = n
    return out


def remove_peft(model: nn.Module) -> None:
    """Every PEFT layer of a transformers model replaced by its base layer (transformers has no unload)."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(model)
    for attr in ("peft_config",):
        if hasattr(model, attr):
            delattr(model, attr)
    model._hf_peft_config_loaded = False


def no_lora_left(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from lora_loader.layers import LoraLayer

    return not any(isinstance(m, (BaseTunerLayer, LoraLayer)) for m in model.modules())


def changed_weights(model: nn.Module, reference: dict[str, torch.Tensor]) -> int:
    """How many of the reference's tensors differ (not bit-equal) from the model's; PEFT's base_layer unwrapped."""
    live = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        live[name.replace(".base_layer.", ".")] = p.detach()
    missing = [k for k in reference if k not in live]
    if missing:
        raise RuntimeError(f"changed_weights: {len(missing)} reference tensors not found, e.g. {missing[:3]}")
    return sum(1 for k, ref in reference.items() if not torch.equal(live[k], ref))
