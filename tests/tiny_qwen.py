"""Tiny Qwen-Image and Z-Image transformers (diffusers' test sizes), seeded, with a fixed input each."""

from __future__ import annotations

import pytest
import torch
from diffusers import QwenImageTransformer2DModel, ZImageTransformer2DModel


def tiny_qwen(seed: int = 0) -> QwenImageTransformer2DModel:
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    ).eval()  # fmt: skip


def qwen_output(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(1, 16, 16, generator=g)
    text = torch.randn(1, 7, 16, generator=g)
    with torch.no_grad():
        return model(
            hidden_states=hidden, encoder_hidden_states=text, encoder_hidden_states_mask=torch.ones(1, 7),
            timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 4)]], return_dict=False,
        )[0]  # fmt: skip


def tiny_z_image(seed: int = 0) -> ZImageTransformer2DModel:
    torch.manual_seed(seed)
    return ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    ).eval()  # fmt: skip


def z_image_output(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    x = [torch.randn(16, 1, 8, 8, generator=g)]
    cap = [torch.randn(8, 16, generator=g)]
    with torch.no_grad():
        out = model(x, torch.tensor([0.5]), cap, return_dict=False)[0]
    return torch.stack(list(out)) if isinstance(out, (list, tuple)) else out


# -- layouts and an independent merge, shared by tests/test_qwen_image.py and tests/test_z_image.py ---------------------

RANK, ALPHA = 4, 2.0  # scale 0.5
_SPELLINGS = {  # suffix as a producer writes it -> role
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up", ".lora_down.weight": "down",
    ".lora_up.weight": "up", ".lora.down.weight": "down", ".lora.up.weight": "up", ".lora_A.weight": "down",
    ".lora_B.weight": "up", ".alpha": "alpha",
}  # fmt: skip


def spell(pairs: dict, stem, down: str, up: str, alpha: float | None) -> dict:
    """``{original or diffusers path: (A, B)}`` keyed as a producer writes it: ``stem(path)`` + suffixes, the alpha
    as a 0-d float tensor beside them (``alpha=None``: no alpha key, ``B`` carries the 0.5 scale)."""
    out = {}
    for path, (a, b) in pairs.items():
        s = stem(path)
        out[s + down] = a.contiguous()
        out[s + up] = (b if alpha is not None else b * (ALPHA / RANK)).contiguous()
        if alpha is not None:
            out[s + ".alpha"] = torch.tensor(alpha)
    return out


def random_pairs(model, paths, seed: int) -> dict:
    """A rank-4 pair per module path (``path -> (A [4, in], B [out, 4])``), seeded."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    pairs = {}
    for path, shape_of in paths.items():
        out_f, in_f = modules[shape_of].weight.shape if isinstance(shape_of, str) else shape_of
        pairs[path] = (torch.randn(RANK, in_f, generator=g) * 0.2, torch.randn(out_f, RANK, generator=g) * 0.2)
    return pairs


def independent_merge(make, output, tensors: dict, resolve, scale_of=None, weight: float = 1.0) -> torch.Tensor:
    """The output of a fresh model whose weights get ``weight * alpha / r * B @ A`` of each module of the raw file
    ``tensors`` (no lora_loader): ``resolve(stem) -> [(diffusers path, row slice)]`` names the rows a module's B
    writes; ``scale_of(stem, rank)`` overrides alpha / r (a header's alpha); LoKr factors as kron(w1, w2a @ w2b)."""
    groups: dict[str, dict] = {}
    for key, tensor in tensors.items():
        for suffix in sorted(_SPELLINGS, key=len, reverse=True) + [".lokr_w1", ".lokr_w2_a", ".lokr_w2_b"]:
            if key.endswith(suffix):
                groups.setdefault(key[: -len(suffix)], {})[_SPELLINGS.get(suffix, suffix)] = tensor
                break
        else:
            raise AssertionError(f"the test does not know {key}")
    model = make(0)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for stem, parts in groups.items():
            if ".lokr_w1" in parts:
                rank = parts[".lokr_w2_a"].shape[1]
                delta = torch.kron(parts[".lokr_w1"], parts[".lokr_w2_a"] @ parts[".lokr_w2_b"])
            else:
                rank = parts["down"].shape[0]
                delta = parts["up"] @ parts["down"]
            scale = scale_of(stem, rank) if scale_of else (float(parts["alpha"]) / rank if "alpha" in parts else 1.0)
            for path, rows in resolve(stem):
                modules[path].weight += weight * scale * delta[rows]
    return output(model)


def kohya_resolver(model, renames: dict | None = None, fused: dict | None = None):
    """``resolve`` for `independent_merge`: strips ``diffusion_model.`` / ``transformer.`` / ``lora_unet_`` /
    ``lycoris_``, then an original name (dots or underscores) -> diffusers path via ``renames`` (suffix rules), a
    fused one via ``fused`` (name suffix -> the diffusers leaf names of its equal row thirds)."""
    mangled = {name.replace(".", "_"): name for name, _ in model.named_modules() if name}

    def resolve(stem: str):
        for prefix in ("diffusion_model.", "transformer.", "lora_unet_", "lora_transformer_", "lycoris_"):
            stem = stem.removeprefix(prefix)
        name = stem.replace(".", "_")
        for suffix, leaves in (fused or {}).items():
            if name.endswith("_" + suffix):
                block = mangled[name[: -len(suffix) - 1]]
                rows = dict(model.named_modules())[f"{block}.{leaves[0]}"].weight.shape[0]
                return [(f"{block}.{leaf}", slice(i * rows, (i + 1) * rows)) for i, leaf in enumerate(leaves)]
        for old, new in (renames or {}).items():
            if name.endswith(old) or name.startswith(old):
                name = name.replace(old, new)
        return [(mangled[name], slice(None))]

    return resolve


def assert_close(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor, tolerance: float = 1e-4) -> None:
    assert (want - base).abs().max() > 1e-3, "the LoRA did not change the output: the test would prove nothing"
    assert (got - want).abs().max() <= tolerance, (got - want).abs().max()


def read(path: str) -> tuple[dict, dict]:
    """A safetensors file's tensors and header, read by safetensors itself."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def merged_output(make, output, resolve, path: str, header_alpha: bool, weight: float = 1.0) -> torch.Tensor:
    """The output of ``make(0)`` with the file at ``path`` merged in by `independent_merge`; ``header_alpha``: the file
    is diffusers' layout, whose strength (alpha / rank) is in its header, not in alpha keys."""
    header_scale = (lambda stem, rank: ALPHA / RANK) if header_alpha else None
    return independent_merge(make, output, read(path)[0], resolve, header_scale, weight)


def check_disable_fuse_unfuse_unload(model, path, output, base: torch.Tensor) -> None:
    """On an attached ``model`` without LoRA: after loading ``path``, ``disable_lora`` gives ``base`` exactly, a fuse
    gives the unfused output, ``unfuse_lora`` gives every weight back bit for bit, and unloading gives ``base``."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_lora_weights(path, adapter_name="a")
    unfused = output(model)
    model.disable_lora()
    assert torch.equal(output(model), base)
    model.enable_lora()
    model.fuse_lora()
    assert_close(output(model), unfused, base)
    model.unfuse_lora()
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    model.unload_lora_weights()
    assert torch.equal(output(model), base) and model.get_list_adapters() == {}


def check_refused_unchanged_then_skipped(model, tensors: dict, extra: list[str], match: str, output, want, base) -> None:
    """``tensors`` (a good file plus the ``extra`` keys, for modules ``model`` lacks) are refused with a `LoraError`
    matching ``match`` and leave the model exactly as it was; with ``strict=False`` they load with a warning, the
    extra keys are reported skipped, and the output is ``want`` (the good file's)."""
    import lora_loader

    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lora_loader.LoraError, match=match):
        model.load_lora_weights(tensors, adapter_name="x")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert model.get_list_adapters() == {}
    with pytest.warns(lora_loader.LoraWarning):
        report = model.load_lora_weights(tensors, adapter_name="x", strict=False)
    assert sorted(report.skipped) == sorted(extra)
    assert_close(output(model), want, base)


def diffusers_output(pipeline_cls, make, output, tensors: dict, adapter: str = "d"):
    """diffusers+peft on the same file: the pipeline's own ``lora_state_dict`` converter, then the transformer's
    ``load_lora_adapter`` (what ``load_lora_weights`` does for the transformer)."""
    model = make(0)
    if isinstance(tensors, str):  # a file with diffusers' header (rank and alpha in lora_adapter_metadata)
        state, metadata = pipeline_cls.lora_state_dict(tensors, return_lora_metadata=True)
    else:
        state, metadata = pipeline_cls.lora_state_dict(dict(tensors)), None
    model.load_lora_adapter(state, prefix="transformer", adapter_name=adapter, metadata=metadata)
    return output(model), model
