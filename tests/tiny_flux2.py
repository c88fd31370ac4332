"""A tiny Flux.2 transformer (diffusers' `Flux2Transformer2DModel`; d = 32, mlp_ratio 3: linear1 has 9d rows)."""

from __future__ import annotations

import torch
from diffusers import Flux2Transformer2DModel

CONFIG = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
              joint_attention_dim=16, timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4))  # fmt: skip


def tiny_flux2(seed: int = 0, guidance: bool = True) -> Flux2Transformer2DModel:
    """Flux.2 dev (guidance embedder) or Klein (``guidance=False``), seeded random weights."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Flux2Transformer2DModel(**CONFIG, guidance_embeds=guidance)
        with torch.no_grad():
            for p in model.parameters():  # diffusers zero-inits nothing here, but keep every weight non-trivial
                p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def forward(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(1, 16, CONFIG["in_channels"], generator=g)
    text = torch.randn(1, 8, CONFIG["joint_attention_dim"], generator=g)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(-1, 4)
    txt_ids = torch.zeros(8, 4)
    txt_ids[:, 3] = torch.arange(8.0)
    kwargs = {"guidance": torch.tensor([3.5])} if model.config.guidance_embeds else {}
    with torch.no_grad():
        return model(hidden_states=hidden, encoder_hidden_states=text, timestep=torch.tensor([0.5]), img_ids=img_ids,
                     txt_ids=txt_ids, return_dict=False, **kwargs)[0]  # fmt: skip
