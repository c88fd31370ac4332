"""Tiny causal LMs built from configs with seeded weights, and PEFT adapters for them written by peft itself.

The models keep the real architectures' module names and layer kinds (Llama:
``nn.Linear`` projections and an untied ``lm_head``; GPT-2: transformers'
``Conv1D`` with ``[in, out]`` weights and a tied ``wte``; OPT: biased
``nn.Linear`` projections), shrunk so a forward takes about a millisecond.

Every parameter, norms and biases included, is randomised from a generator
seeded with ``seed``: a zero bias or a unit norm weight could hide a bug that
drops, transposes or double-applies it. The same seed gives bit-identical models.

Adapters are written by ``peft.get_peft_model(...).save_pretrained(dir)``; before
saving, every trainable tensor (``lora_A``/``lora_B``, ``lora_embedding_*``,
``lora_magnitude_vector``, ``modules_to_save`` copies, LoRA biases) gets seeded
noise, so none is at its initial value: a fresh ``lora_B`` is zero, a fresh DoRA
magnitude equals the weight norm (DoRA would then equal plain LoRA), and a fresh
``modules_to_save`` copy equals the original (a loader ignoring it would pass).
"""

from __future__ import annotations

import os

import peft
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

VOCAB = 64
SEQ_LEN = 10


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded noise on every parameter (each tied parameter once), so nothing is exactly 0 or 1."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
    return model.eval()


def llama_config(**overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return _randomise(LlamaForCausalLM(llama_config(**overrides)), seed)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2
    )
    return _randomise(GPT2LMHeadModel(config), seed)


def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        word_embed_proj_dim=16,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        dropout=0.0,
        attention_dropout=0.0,
    )
    return _randomise(OPTForCausalLM(config), seed)


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "opt": tiny_opt}


def input_ids(batch: int = 2, length: int = SEQ_LEN, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Token ids from 3 up: OPT uses 1 as padding and 2 as BOS/EOS.
    return torch.randint(3, VOCAB, (batch, length), generator=gen)


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    model.eval()
    return model(input_ids=input_ids() if ids is None else ids).logits.detach().clone()


def peft_adapter(model: torch.nn.Module, config: peft.LoraConfig, folder, seed: int = 1) -> str:
    """Write a PEFT adapter for ``model`` (consumed) with ``config``; every trainable tensor randomised."""
    peft_model = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(20_000 + seed)
    with torch.no_grad():
        for _, p in sorted(peft_model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    folder = os.fspath(folder)
    peft_model.save_pretrained(folder)
    return folder


def peft_oracle(factory, adapters: dict[str, str], seed: int = 0) -> peft.PeftModel:
    """A fresh ``factory(seed)`` with ``{name: folder}`` loaded by ``peft.PeftModel`` (first adapter active)."""
    (first, first_dir), *rest = adapters.items()
    model = peft.PeftModel.from_pretrained(factory(seed), first_dir, adapter_name=first)
    for name, folder in rest:
        model.load_adapter(folder, adapter_name=name)
    return model.eval()
