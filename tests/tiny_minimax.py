"""A tiny MiniMax-H3 modular pipeline (its two partitions only) and the original checkpoint's module shapes.

The transformer's sizes are those of diffusers' own model test (``get_init_dict`` in
tests/models/transformers/test_models_transformer_minimax_h3.py) except ``attention_head_dim``: 128, the
head width of every released H3 partition, which diffusers' DiffSynth converter assumes (it reads the head
count off the fused ``qkv_proj`` rows). The pipeline is ``MiniMaxH3Blocks().init_pipeline()`` with the
two denoisers put in by ``update_components``: no text encoder, VAE or Hub repo is needed to load LoRAs.
"""

from __future__ import annotations

import torch
from diffusers import MiniMaxH3Transformer3DModel
from diffusers.modular_pipelines import MiniMaxH3Blocks

from tiny import _randomize

CONFIG = {
    "num_attention_heads": 2, "attention_head_dim": 128, "hidden_size": 24, "num_layers": 2, "num_refiner_layers": 2,
    "ffn_dim": 32, "in_channels": 4, "audio_in_channels": 6, "patch_size": (1, 2, 2), "text_dim": 8, "freq_dim": 8,
    "time_embed_hidden_dim": 24, "time_embed_dim": 16, "rope_freq_dim": 2,
}  # fmt: skip
HIDDEN, INNER, FFN, TIME = 24, 2 * 128, 32, 16
HEAD_DIM = 128
VIDEO_PATCH = 4 * 2 * 2

# (in, out) of every Linear of the original checkpoint, by its original name (``{i}``: a block index).
BLOCK = {
    "attn.qkv_proj": (HIDDEN, 3 * INNER),
    "attn.out_proj": (INNER, HIDDEN),
    "mlp.fc1": (HIDDEN, 2 * FFN),
    "mlp.fc2": (FFN, HIDDEN),
}
TOP = {
    "video_patch_proj": (VIDEO_PATCH, HIDDEN),
    "audio_patch_proj": (6, HIDDEN),
    "condition_proj": (8, HIDDEN),
    "time_embedder.proj_in": (8, 24),
    "time_embedder.proj_out": (24, TIME),
    "final_layer.adaln_proj.linear": (TIME, 2 * HIDDEN),
    "final_layer.video_out": (HIDDEN, VIDEO_PATCH),
    "final_layer.audio_out": (HIDDEN, 6),
}


def original_modules(blocks=True, refiner=True, adaln=True, top=True) -> dict[str, tuple[int, int]]:
    """``{original module name: (in, out)}`` of the tiny model, the parts a producer targets."""
    out = {}
    for i in range(CONFIG["num_layers"]):
        if blocks:
            out |= {f"blocks.{i}.{name}": shape for name, shape in BLOCK.items()}
        if adaln:
            out[f"blocks.{i}.adaln_proj.linear"] = (TIME, 6 * 3 * HIDDEN)
    for i in range(CONFIG["num_refiner_layers"]):
        if refiner:
            out |= {f"token_refiner.blocks.{i}.{name}": shape for name, shape in BLOCK.items()}
    if top:
        out |= TOP
    return out


def tiny_transformer(seed: int) -> MiniMaxH3Transformer3DModel:
    torch.manual_seed(seed)
    model = MiniMaxH3Transformer3DModel(**CONFIG)
    _randomize(model, seed)
    return model.eval()


def tiny_minimax_pipeline(seed: int = 0, ref: bool = True, main: bool = True):
    """A ``MiniMaxH3ModularPipeline`` holding ``transformer`` (unless ``main`` is False: the ref2va workflow's
    pipeline) and ``transformer_ref`` (another seed; unless ``ref`` is False: the t2va / fl2va workflows')."""
    pipe = MiniMaxH3Blocks().init_pipeline()
    components = {"transformer": tiny_transformer(seed)} if main else {}
    if ref:
        components["transformer_ref"] = tiny_transformer(seed + 100)
    pipe.update_components(**components)
    return pipe


def inputs(batch_size: int = 1) -> dict[str, torch.Tensor]:
    """One packed sequence (text, audio, video rows) as diffusers' model test builds it, two timesteps."""
    text, audio, video = 4, 6, 8
    length = text + audio + video
    g = torch.Generator().manual_seed(0)
    text_indices, audio_indices = torch.arange(text), torch.arange(text, text + audio)
    video_indices = torch.arange(text + audio, length)
    token_tags = torch.zeros(length, dtype=torch.long)
    token_tags[text_indices], token_tags[audio_indices] = 1, 2
    timestep_indices = torch.zeros(length, dtype=torch.long)
    timestep_indices[audio_indices] = 1
    position_ids = torch.zeros(length, 3)
    position_ids[:, 0] = torch.arange(length, dtype=torch.float32)
    position_ids[video_indices, 1] = torch.arange(video, dtype=torch.float32) % 4
    position_ids[video_indices, 2] = torch.arange(video, dtype=torch.float32) % 2
    return {
        "hidden_states": torch.randn(batch_size, video, VIDEO_PATCH, generator=g),
        "audio_hidden_states": torch.randn(batch_size, audio, 6, generator=g),
        "encoder_hidden_states": torch.randn(batch_size, text, 8, generator=g),
        "timestep": torch.tensor([0.7, 0.3]),
        "timestep_indices": timestep_indices,
        "token_tags": token_tags,
        "position_ids": position_ids,
        "video_indices": video_indices,
        "audio_indices": audio_indices,
        "text_indices": text_indices,
    }


def run(pipe, component: str = "transformer", **kwargs) -> torch.Tensor:
    """The denoiser's video and audio outputs, flattened into one tensor."""
    with torch.no_grad():
        out = getattr(pipe, component)(**inputs(), **kwargs)
    return torch.cat([out.sample.flatten(), out.audio_sample.flatten()])
