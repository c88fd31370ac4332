"""Any pipeline's transformer, no family table: a diffusers / PEFT file, or dotted module paths with any LoRA suffix
spelling, loads by module path, and ``lora-loader inspect`` says "unknown" rather than guessing a family.

The model is a small DiT of names no table knows (``stages.N.mixer.in_proj``, ...). PEFT makes one rank-4, alpha-2
adapter on it; the same factors are spelled as each producer writes them (PEFT, diffusers' ``transformer.``,
``base_model.model.``, DiffSynth's ``.lora_A.default.weight``, Kohya suffixes on dotted paths with ``.alpha``,
``LoRACompatibleLinear``'s ``.lora.down.weight``) and compared with peft's own forward of the adapter.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from producers import add_peft_adapter, save_state_dict
from torch import nn

import lora_loader
from lora_loader import LoraError
from lora_loader.families import detect_family
from lora_loader.formats import convert

RANK, ALPHA = 4, 2.0


class Stage(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.mixer = nn.ModuleDict({"in_proj": nn.Linear(dim, 2 * dim), "out_proj": nn.Linear(2 * dim, dim)})
        self.mlp = nn.Sequential(nn.Linear(dim, 3 * dim), nn.GELU(), nn.Linear(3 * dim, dim))

    def forward(self, x):
        x = x + self.mixer["out_proj"](torch.tanh(self.mixer["in_proj"](x)))
        return x + self.mlp(x)


class TinyDiT(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.patch = nn.Linear(8, dim)
        self.stages = nn.ModuleList([Stage(dim), Stage(dim)])
        self.head = nn.Linear(dim, 8)

    def forward(self, x):
        x = self.patch(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


def tiny(seed: int = 0) -> TinyDiT:
    torch.manual_seed(seed)
    return TinyDiT().eval()


def output(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3)))


TARGETS = ["patch", "in_proj", "out_proj", "mlp.0", "mlp.2", "head"]


@pytest.fixture(scope="module")
def adapter():
    """PEFT's state dict of a fresh adapter, and peft's own output of it on an identical model."""
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(1)
    model = tiny()
    sd = add_peft_adapter(model, config)
    return sd, output(model), output(tiny())


def respell(sd: dict, prefix: str, down: str, up: str, alpha: bool) -> dict:
    out = {}
    for key, tensor in sd.items():
        stem, _, role = key.rpartition(".lora_")
        if role == "A.weight":
            out[prefix + stem + down] = tensor
            if alpha:
                out[prefix + stem + ".alpha"] = torch.tensor(ALPHA)
        else:
            out[prefix + stem + up] = tensor if alpha else tensor * (ALPHA / RANK)
    return out


SPELLINGS = {
    "peft": ("", ".lora_A.weight", ".lora_B.weight", False),
    "diffusers-transformer": ("transformer.", ".lora_A.weight", ".lora_B.weight", False),
    "peft-base-model": ("base_model.model.", ".lora_A.weight", ".lora_B.weight", False),
    "diffsynth-default": ("", ".lora_A.default.weight", ".lora_B.default.weight", False),
    "dotted-kohya-suffixes": ("", ".lora_down.weight", ".lora_up.weight", True),
    "transformer-kohya-suffixes": ("transformer.", ".lora_down.weight", ".lora_up.weight", True),
    "lora-compatible-linear": ("", ".lora.down.weight", ".lora.up.weight", True),
    "peft-with-alpha": ("", ".lora_A.weight", ".lora_B.weight", True),
}


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_every_suffix_spelling_loads_by_module_path_as_peft_computes_it(spelling, adapter):
    sd, want, base = adapter
    tensors = respell(sd, *SPELLINGS[spelling])
    model = lora_loader.attach(tiny())
    report = model.load_lora_weights(tensors, adapter_name="g")
    assert not report.skipped
    got = output(model)
    assert (want - base).abs().max() > 1e-3 and (got - want).abs().max() <= 1e-5
    assert detect_family(convert(tensors).deltas)[0] == "unknown"


def test_inspect_says_unknown_for_a_transformer_no_table_knows(adapter, tmp_path, capsys):
    from lora_loader.cli import main

    path = save_state_dict(respell(adapter[0], *SPELLINGS["transformer-kohya-suffixes"]), tmp_path / "x.safetensors")
    assert main(["inspect", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "unknown"


def test_a_dit_is_not_named_sd2_sd3_or_a_causal_lm_by_names_it_shares():
    """An Anima-like file (cross-attention of width 1024, a Qwen3 text encoder of width 1024) is no SD 2.x (its DiT's
    adaLN layers name the Cosmos DiT), a SANA file is SANA's, a DiT's
    joint blocks in names beyond SD3's are no SD3, and a transformer's ``layers.N`` (Lumina 2) no causal LM."""
    def d(component, module, width=1024):
        return {(component, module): SimpleNamespace(down=torch.zeros(4, width))}

    anima = (d("transformer", "transformer_blocks.0.attn1.to_q", 2048) | d("transformer", "transformer_blocks.0.attn2.to_k")
             | d("transformer", "transformer_blocks.0.norm1.linear_1", 2048) | d("text_encoder", "model.layers.0.self_attn.q_proj"))
    assert detect_family(anima)[0] == "cosmos"  # norm1.linear_1: the adaLN-LoRA layer of the Cosmos DiT Anima is built on
    anima_attention = d("transformer", "transformer_blocks.0.attn2.to_k") | d("text_encoder", "model.layers.0.self_attn.q_proj")
    assert detect_family(anima_attention)[0] != "sd2"  # (SD3's names: SD 3.5 has attn2 too)
    sana = (d("transformer", "transformer_blocks.0.attn1.to_q") | d("transformer", "transformer_blocks.0.attn2.to_k")
            | d("transformer", "transformer_blocks.0.ff.conv_inverted"))
    assert detect_family(sana)[0] == "sana"  # ff.conv_inverted: SANA's GLUMBConv feed-forward, no other DiT's
    # ff.dense_in: a name no family has (ff.linear_in is Flux.2's diffusers name, and would name Flux.2)
    assert detect_family(d("transformer", "transformer_blocks.0.attn.to_q", 1536) | d("transformer", "transformer_blocks.0.ff.dense_in", 1536))[0] == "unknown"
    assert detect_family(d("transformer", "transformer_blocks.0.attn.to_q", 1536) | d("transformer", "transformer_blocks.0.ff.net.2", 1536))[0] == "sd3"
    assert detect_family(d("transformer", "layers.0.feed_forward.linear_1"))[0] == "unknown"
    assert detect_family(d("denoiser", "model.layers.0.self_attn.q_proj"))[0] == "causal-lm"


def test_a_file_without_any_lora_key_is_still_not_a_lora_file():
    with pytest.raises(LoraError, match="not a LoRA file"):
        lora_loader.attach(tiny()).load_lora_weights({"stages.0.mixer.in_proj.weight": torch.ones(32, 16)}, adapter_name="x")


def test_a_module_the_model_lacks_is_refused_and_changes_nothing(adapter):
    tensors = respell(adapter[0], *SPELLINGS["dotted-kohya-suffixes"])
    tensors["stages.4.mlp.0.lora_down.weight"], tensors["stages.4.mlp.0.lora_up.weight"] = torch.ones(RANK, 16), torch.ones(48, RANK)
    model = lora_loader.attach(tiny())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoraError, match=r"stages\.4\.mlp\.0\.lora_down\.weight"):
        model.load_lora_weights(tensors, adapter_name="x")
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before) and model.get_list_adapters() == {}
    with pytest.warns(lora_loader.LoraWarning):
        report = model.load_lora_weights(tensors, adapter_name="x", strict=False)
    assert sorted(report.skipped) == ["stages.4.mlp.0.lora_down.weight", "stages.4.mlp.0.lora_up.weight"]


def test_blend_disable_fuse_unfuse_unload_against_peft(adapter):
    sd, _, base = adapter
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(2)
    second = add_peft_adapter(tiny(), config)
    theirs = tiny()  # peft's weighted sum of two adapters: each layer's output plus 0.7 and 0.3 of theirs
    from peft.utils import set_peft_model_state_dict

    for name, state in (("a", sd), ("b", second)):
        inject_adapter_in_model(config, theirs, name)
        set_peft_model_state_dict(theirs, state, adapter_name=name)
    for module in theirs.modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict):
            module.set_adapter(["a", "b"])
            module.scaling["a"] *= 0.7
            module.scaling["b"] *= 0.3
    model = lora_loader.attach(tiny())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_lora_weights(respell(sd, *SPELLINGS["dotted-kohya-suffixes"]), adapter_name="a")
    model.load_lora_weights(respell(second, *SPELLINGS["lora-compatible-linear"]), adapter_name="b")
    model.set_adapters(["a", "b"], [0.7, 0.3])
    blended = output(model)
    assert (blended - base).abs().max() > 1e-3 and (blended - output(theirs)).abs().max() <= 1e-5
    model.disable_lora()
    assert torch.equal(output(model), base)
    model.enable_lora()
    model.fuse_lora()
    assert (output(model) - blended).abs().max() <= 1e-5
    model.unfuse_lora()
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    model.unload_lora_weights()
    assert torch.equal(output(model), base)


def test_an_alpha_beside_lora_a_and_lora_b_keeps_a_text_encoder_module_a_plain_lora():
    """OFT keeps its alpha among its factors; a dotted module with only lora_A / lora_B / alpha is still a plain LoRA
    for every component (it was refused on text encoders as 'LyCORIS factors' once both rules met)."""
    from lora_loader.formats import convert

    sd = {"text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 8),
          "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(8, 2),
          "text_encoder.encoder.layers.0.self_attn.q_proj.alpha": torch.tensor(4.0)}
    converted = convert(sd)
    assert not converted.unknown, converted.unknown
    (component, module), = converted.deltas
    assert (component, module) == ("text_encoder", "encoder.layers.0.self_attn.q_proj")
    assert converted.deltas[(component, module)].scale == 2.0
