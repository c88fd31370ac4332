"""Tiny models of the architectures people fine-tune in 2026, from transformers' own configs, with seeded weights,
and two PEFT adapters for each that peft itself makes.

Every model keeps its architecture's module names and layer kinds: Qwen3 / Gemma 3 / Mistral (separate
``q/k/v/o`` and ``gate/up/down`` Linears), Phi-3 (fused ``qkv_proj`` and ``gate_up_proj`` Linears),
Qwen3-MoE / Mixtral / gpt-oss (transformers 5's stacked experts: ``mlp.experts.gate_up_proj`` and
``down_proj`` are ``nn.Parameter`` stacks, ``[E, out, in]``, gpt-oss ``[E, in, out]`` with
``is_transposed``), RoBERTa token classification (a ``classifier`` head saved whole:
``modules_to_save``). Widths are chosen so that no projection is square where a transpose could hide
(hidden 32, intermediate 48, expert intermediate 24, 4 experts, top-2).

The two adapters of an architecture differ in targets, rank, alpha and scaling rule (one rsLoRA), so a
row or a blend given the wrong one is visibly wrong. Where the experts are parameters both adapters
target them (PEFT requires every adapter with ``target_parameters`` to target the same ones).
Every parameter and every trainable adapter tensor is seeded noise (see `llm_tiny`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import llm_tiny
import peft
import torch
import transformers as T

VOCAB = 64
EXPERTS = dict(num_experts_per_tok=2)
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


_randomise = llm_tiny._randomise  # seeded noise on every parameter, as the other tiny LMs get it


def causal(config_class, model_class, **overrides):
    def build(seed: int = 0):
        torch.manual_seed(seed)
        model = _randomise(model_class(config_class(**{**_COMMON, **overrides})), seed)
        model.generation_config.eos_token_id = None  # every row generates exactly max_new_tokens
        model.generation_config.pad_token_id = 0
        return model

    return build


def _roberta(seed: int = 0):
    torch.manual_seed(seed)
    config = T.RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=64, num_labels=3, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return _randomise(T.RobertaForTokenClassification(config), seed)


@dataclass
class Arch:
    build: object  # seed -> model
    adapters: dict  # name -> peft.LoraConfig fields
    causal: bool = True
    experts_as_parameters: bool = False


ARCHS = {
    "qwen3": Arch(
        causal(T.Qwen3Config, T.Qwen3ForCausalLM),
        {"a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
         "b": dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"])},
    ),
    "qwen3_moe": Arch(
        causal(T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, moe_intermediate_size=24, num_experts=4, **EXPERTS),
        {"a": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], target_parameters=EXPERT_PARAMS),
         "b": dict(r=3, lora_alpha=5, use_rslora=True, target_modules=["o_proj"], target_parameters=EXPERT_PARAMS)},
        experts_as_parameters=True,
    ),
    "gemma3": Arch(
        causal(T.Gemma3TextConfig, T.Gemma3ForCausalLM, sliding_window=4),
        {"a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]),
         "b": dict(r=2, lora_alpha=6, use_rslora=True, target_modules=["o_proj", "gate_proj", "down_proj"])},
    ),
    "mistral": Arch(
        causal(T.MistralConfig, T.MistralForCausalLM),
        {"a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
         "b": dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["o_proj", "up_proj", "down_proj"])},
    ),
    "mixtral": Arch(
        causal(T.MixtralConfig, T.MixtralForCausalLM, num_local_experts=4, **EXPERTS),
        {"a": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], target_parameters=EXPERT_PARAMS),
         "b": dict(r=3, lora_alpha=2, use_rslora=True, target_modules=["k_proj", "o_proj"], target_parameters=EXPERT_PARAMS)},
        experts_as_parameters=True,
    ),
    "phi3": Arch(
        causal(T.Phi3Config, T.Phi3ForCausalLM, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        {"a": dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"]),
         "b": dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["o_proj", "down_proj"])},
    ),
    "gpt_oss": Arch(
        causal(T.GptOssConfig, T.GptOssForCausalLM, num_local_experts=4, sliding_window=4,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **EXPERTS),
        # gpt-oss's attention projections have biases: b trains a lora_B bias too (PEFT refuses lora_bias with
        # target_parameters, so only b has it, and only a targets the experts).
        {"a": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], target_parameters=EXPERT_PARAMS),
         "b": dict(r=3, lora_alpha=5, use_rslora=True, target_modules=["k_proj", "o_proj"], lora_bias=True)},
        experts_as_parameters=True,
    ),
    "roberta_token_cls": Arch(
        _roberta,
        {"a": dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]),
         "b": dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["key", "dense"], modules_to_save=["classifier"])},
        causal=False,
    ),
}


def input_ids(batch: int = 3, length: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=gen)  # 0-2: pad / bos / eos (RoBERTa pads with 1)


def peft_adapter(model: torch.nn.Module, fields: dict, folder, seed: int = 1) -> str:
    """peft's adapter for ``model`` (consumed) with ``fields``, every trainable tensor noise, saved by peft."""
    return llm_tiny.peft_adapter(model, peft.LoraConfig(init_lora_weights=False, **fields), folder, seed)


def peft_model(build, folders: dict[str, str], is_trainable: bool = False) -> peft.PeftModel:
    """A fresh model with ``{name: folder}`` loaded by peft (the first adapter active)."""
    (first, first_dir), *rest = folders.items()
    model = peft.PeftModel.from_pretrained(build(), first_dir, adapter_name=first, is_trainable=is_trainable)
    for name, folder in rest:
        model.load_adapter(folder, adapter_name=name, is_trainable=is_trainable)
    return model if is_trainable else model.eval()


# transformers 4 kept each expert as its own Linear modules; peft adapters trained then name them so.
V4_EXPERTS = {
    "qwen3_moe": ("mlp", {"gate_proj": ("hidden", "expert"), "up_proj": ("hidden", "expert"), "down_proj": ("expert", "hidden")}),
    "mixtral": ("block_sparse_moe", {"w1": ("hidden", "expert"), "w3": ("hidden", "expert"), "w2": ("expert", "hidden")}),
}


def v4_moe_adapter(arch: str, folder, r: int = 2, lora_alpha: int = 4, seed: int = 3) -> str:
    """A peft adapter as peft wrote it for transformers 4's ``arch``: ``q_proj``, the router ``gate`` (then an
    ``nn.Linear``) and every expert's own projections (``mlp.experts.3.gate_proj``; Mixtral's
    ``block_sparse_moe.experts.3.w1``), random factors, peft's config with those ``target_modules``."""
    from safetensors.torch import save_file

    config = ARCHS[arch].build().config
    experts = getattr(config, "num_experts", None) or config.num_local_experts
    width = {"hidden": config.hidden_size, "expert": getattr(config, "moe_intermediate_size", None) or config.intermediate_size}
    block, projections = V4_EXPERTS[arch]
    gen = torch.Generator().manual_seed(30_000 + seed)
    tensors = {}

    def pair(module: str, d_in: int, d_out: int) -> None:
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, d_in, generator=gen) * 0.3
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(d_out, r, generator=gen) * 0.3

    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        pair(f"{prefix}.self_attn.q_proj", config.hidden_size, 2 * 16)
        pair(f"{prefix}.{block}.gate", config.hidden_size, experts)
        for expert in range(experts):
            for name, (d_in, d_out) in projections.items():
                pair(f"{prefix}.{block}.experts.{expert}.{name}", width[d_in], width[d_out])
    folder = os.fspath(folder)
    peft.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=["q_proj", "gate", *projections]).save_pretrained(folder)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder
