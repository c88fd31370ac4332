"""The ``lora-loader`` command: inspect, convert, generate, demo, and its errors.

The CLI runs in-process (``main([...])`` returns the exit code; capsys holds
stdout/stderr) and once as ``python3 -m lora_loader`` in a subprocess. Every
file it reads here is written by an independent producer (tests/producers.py:
PEFT itself, diffusers' writer, an sd-scripts transcription), so what inspect
reports is checked against facts known without lora_loader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import peft
import producers
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from llm_tiny import logits as lm_logits
from llm_tiny import peft_adapter, tiny_llama
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny import outputs, tiny_sd_pipeline, tiny_sdxl_pipeline

import lora_loader
from lora_loader.cli import main
from lora_loader.skeletons import build_skeleton

REPO = Path(__file__).resolve().parents[1]


# -- helpers ---------------------------------------------------------------------------------------------------------


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the test's own setup printed (save_pretrained's bars, diffusers' notices)
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def inspect_json(capsys, path) -> dict:
    code, out, err = run(capsys, "inspect", path, "--json")
    assert code == 0, err
    return json.loads(out)


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lora-loader: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def sd_scripts_modules(pipe, te_components) -> dict[str, list[tuple[str, torch.nn.Module]]]:
    """What sd-scripts targets, found independently of lora_loader: every Linear/Conv2d of the UNet, the
    text encoders' attention and MLP linears."""
    found = {"unet": list(producers._sd_scripts_modules(pipe.unet))}
    for te in te_components:
        found[te] = [(n, m) for n, m in producers._sd_scripts_modules(getattr(pipe, te)) if ".layers." in n]
    return found


def real_shaped_kohya(family: str, path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """An sd-scripts-style Kohya file (fp16, SDXL in Stability names) for a real SD 1.5 / SDXL model's shapes, on a
    subset of modules: every cross-attention k/v, some convs (3x3 "LoCon" with conv_dim 2 / conv_alpha 1), the time
    embedding, and two text encoder layers. Shapes are read off the built-in skeleton (configs of the real models)."""
    host = build_skeleton(family)
    g = torch.Generator().manual_seed(seed)
    rename = producers.diffusers_to_sgm if family == "sdxl" else (lambda name: name)
    prefixes = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"} if family == "sdxl" else {"text_encoder": "lora_te_"}
    wanted = ("conv_in", "down_blocks.1.resnets.0.conv1", "time_embedding.linear_1", "mid_block.attentions.0.proj_in")
    sd = {}

    def add(name: str, module) -> None:
        locon = producers._is_locon(module)
        down, up = producers._lora_pair(module, 2 if locon else 4, g)
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down.half(), up.half()
        sd[f"{name}.alpha"] = torch.tensor(1.0 if locon else 2.0, dtype=torch.float16)

    for name, module in producers._sd_scripts_modules(host.unet):
        if name.endswith(("attn2.to_k", "attn2.to_v")) or name in wanted:
            add("lora_unet_" + rename(name).replace(".", "_"), module)
    for component, prefix in prefixes.items():
        for name, module in producers._sd_scripts_modules(getattr(host, component)):
            if ".layers.0." in name or ".layers.5." in name:
                add(prefix + producers._with_text_model(name).replace(".", "_"), module)
    save_file(sd, os.fspath(path))
    return sd


PEFT_UNET = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"],
                            rank_pattern={"to_k": 2}, alpha_pattern={"conv1": 2}, init_lora_weights=False)
PEFT_TE = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights=False)


def diffusers_file(kind: str, directory: Path, seed: int = 3) -> tuple[str, dict]:
    """A LoRA written by diffusers' own ``save_lora_weights`` from adapters PEFT made (rank/alpha in the header)."""
    factory, cls = (tiny_sd_pipeline, StableDiffusionPipeline) if kind == "sd" else (tiny_sdxl_pipeline, StableDiffusionXLPipeline)
    configs = {"unet": PEFT_UNET, "text_encoder": PEFT_TE}
    if kind == "sdxl":
        configs["text_encoder_2"] = PEFT_TE
    state_dicts = producers.peft_lora(factory, seed, configs)
    return producers.save_diffusers_lora(directory, cls, state_dicts, configs, f"{kind}-diffusers.safetensors"), state_dicts


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """The tiny SD 1.5 / SDXL pipelines saved with ``save_pretrained``, as a user's local model folders."""
    root = tmp_path_factory.mktemp("pipelines")
    folders = {}
    for kind, factory in (("sd", tiny_sd_pipeline), ("sdxl", tiny_sdxl_pipeline)):
        factory(0).save_pretrained(root / kind)
        folders[kind] = root / kind
    return folders


def pipeline_outputs(factory, *files) -> dict[str, torch.Tensor]:
    pipe = lora_loader.attach(factory(0))
    for i, path in enumerate(files):
        pipe.load_lora_weights(os.fspath(path), adapter_name=f"a{i}")
    return outputs(pipe)


# -- inspect ---------------------------------------------------------------------------------------------------------


def test_inspect_sd_scripts_sdxl_file_reports_what_was_written(capsys, tmp_path):
    pipe = tiny_sdxl_pipeline(0)
    sd = producers.sd_scripts_sdxl_lora(pipe, seed=1)
    path = producers.save_state_dict(sd, tmp_path / "sdxl.safetensors")
    info = inspect_json(capsys, path)

    modules = sd_scripts_modules(pipe, ("text_encoder", "text_encoder_2"))
    locon = sum(producers._is_locon(m) for _, m in modules["unet"])
    total = sum(len(v) for v in modules.values())
    assert info["format"] == "kohya"
    assert info["family"] == "sdxl" and info["family_label"] == "SDXL"
    assert info["tensors"] == len(sd) and info["size_bytes"] == os.path.getsize(path)
    assert info["parameters"] == sum(t.numel() for t in sd.values())
    assert info["dtypes"] == {str(k).replace("torch.", ""): v for k, v in Counter(t.dtype for t in sd.values()).items()}
    assert info["modules"] == total
    assert {name: c["modules"] for name, c in info["components"].items()} == {k: len(v) for k, v in modules.items()}
    # sd-scripts: network_dim 4 / alpha 2 on linears and 1x1 convs, conv_dim 2 / conv_alpha 1 on 3x3 convs.
    assert info["ranks"] == {"2": locon, "4": total - locon}
    assert info["alphas"] == {"1": locon, "2": total - locon}
    assert info["components"]["text_encoder_2"]["ranks"] == {"4": len(modules["text_encoder_2"])}
    assert info["unknown_keys"] == {} and info["alpha_missing"] == 0 and info["metadata"] == {}


def test_inspect_diffusers_file_reads_rank_and_alpha_from_the_header(capsys, tmp_path):
    path, state_dicts = diffusers_file("sd", tmp_path)
    info = inspect_json(capsys, path)
    # Tiny widths say nothing, but proj_in is a 1x1 conv as in SD 1.x (SD 2.x and SDXL use linear projections).
    assert info["format"] == "diffusers" and info["family"] == "sd1"
    assert "1x1 conv proj_in/proj_out" in info["family_evidence"]
    unet_keys = [k for k in state_dicts["unet"] if k.endswith("lora_A.weight")]
    te_keys = [k for k in state_dicts["text_encoder"] if k.endswith("lora_A.weight")]
    n_to_k = sum(".to_k." in k for k in unet_keys)
    n_conv1 = sum(".conv1." in k for k in unet_keys)
    assert info["components"]["unet"]["modules"] == len(unet_keys)
    assert info["components"]["text_encoder"]["modules"] == len(te_keys)
    assert info["components"]["unet"]["ranks"] == {"2": n_to_k, "4": len(unet_keys) - n_to_k}
    assert info["components"]["unet"]["alphas"] == {"2": n_conv1, "8": len(unet_keys) - n_conv1}
    assert info["components"]["text_encoder"]["alphas"] == {"6": len(te_keys)}
    # The header's lora_adapter_metadata is long JSON: shown truncated, with its length.
    raw = load_safetensors_metadata(path)["lora_adapter_metadata"]
    shown = info["metadata"]["lora_adapter_metadata"]
    assert len(raw) > 200 and shown.startswith(raw[:200]) and shown.endswith(f"({len(raw)} chars)")


def load_safetensors_metadata(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        return dict(f.metadata())


def test_inspect_peft_folder_of_a_causal_lm(capsys, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM",
                             rank_pattern={"down_proj": 2})
    folder = peft_adapter(tiny_llama(0), config, tmp_path / "adapter")
    info = inspect_json(capsys, folder)
    layers = tiny_llama(0).config.num_hidden_layers
    assert info["format"] == "peft" and info["family"] == "causal-lm"
    assert info["components"] == {"model": {"modules": 3 * layers, "kinds": {"lora": 3 * layers},
                                            "ranks": {"2": layers, "4": 2 * layers}, "alphas": {"6": 3 * layers}, "dora": 0}}
    assert info["adapter_config"]["r"] == 4
    expected = os.path.getsize(Path(folder) / "adapter_model.safetensors") + os.path.getsize(Path(folder) / "adapter_config.json")
    assert info["size_bytes"] == expected


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_inspect_tells_families_apart_by_real_widths(capsys, tmp_path, family):
    path = tmp_path / f"{family}.safetensors"
    real_shaped_kohya(family, path)
    info = inspect_json(capsys, path)
    assert info["family"] == family
    width = {"sd1": 768, "sdxl": 2048}[family]
    assert any(f"cross-attention input width {width}" in e for e in info["family_evidence"])


def _pair(stem: str, down: tuple, up: tuple, kohya: bool) -> dict[str, torch.Tensor]:
    a, b = (".lora_down.weight", ".lora_up.weight") if kohya else (".lora_A.weight", ".lora_B.weight")
    return {stem + a: torch.ones(down), stem + b: torch.ones(up)}


ATTN1_Q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
FAMILY_CASES = {
    "flux-kohya": (_pair("lora_unet_double_blocks_0_img_attn_qkv", (4, 3072), (9216, 4), True), {}, "flux"),
    "flux-diffusers": (_pair("transformer.single_transformer_blocks.0.attn.to_q", (4, 3072), (3072, 4), False), {}, "flux"),
    "sd3": (_pair("transformer.transformer_blocks.0.attn.to_q", (4, 1536), (1536, 4), False), {}, "sd3"),
    "causal-lm": (_pair("base_model.model.model.layers.0.self_attn.q_proj", (4, 64), (64, 4), False), {}, "causal-lm"),
    "sd2-te": (_pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj", (4, 1024), (1024, 4), True), {}, "sd2"),
    "unet-ambiguous": (_pair(ATTN1_Q, (4, 640), (640, 4), False), {}, "sd1/sd2"),
    "unet-header": (_pair(ATTN1_Q, (4, 640), (640, 4), False), {"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
    "unknown": (_pair("encoder.block.0.dense", (4, 8), (8, 4), False), {}, "unknown"),
}


@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
def test_inspect_family_from_names_widths_and_header(capsys, tmp_path, case):
    sd, metadata, family = FAMILY_CASES[case]
    path = tmp_path / f"{case}.safetensors"
    save_file(sd, os.fspath(path), metadata=metadata or None)
    info = inspect_json(capsys, path)
    assert info["family"] == family, info["family_evidence"]
    assert info["unknown_keys"] == {}


def test_inspect_lists_unknown_keys_with_reasons_and_human_output(capsys, tmp_path):
    sd = producers.sd_scripts_sd15_lora(tiny_sd_pipeline(0), seed=1)
    sd["lora_unet_conv_in.lokr_t1"] = torch.ones(2, 2)
    sd["something_else.weight"] = torch.ones(3)
    path = tmp_path / "odd.safetensors"
    save_file(sd, os.fspath(path), metadata={"ss_network_dim": "4", "ss_tag_frequency": "x" * 5000})
    info = inspect_json(capsys, path)
    assert set(info["unknown_keys"]) == {"lora_unet_conv_in.lokr_t1", "something_else.weight"}
    assert "lokr_t1" in info["unknown_keys"]["lora_unet_conv_in.lokr_t1"]
    code, out, err = run(capsys, "inspect", path)
    assert code == 0 and err == ""
    assert "format      kohya" in out and "base model  SD 1.x  (" in out
    assert "unknown keys (2)" in out and "something_else.weight: not a key of any LoRA format" in out
    assert "ss_tag_frequency: " + "x" * 200 + "... (5000 chars)" in out


# -- errors ----------------------------------------------------------------------------------------------------------


def test_bad_input_is_one_line_and_a_nonzero_code(capsys, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + os.urandom(64))
    not_lora = tmp_path / "weights.safetensors"
    save_file({"conv.weight": torch.ones(2, 2)}, os.fspath(not_lora))
    out_exists = tmp_path / "exists.safetensors"
    out_exists.write_bytes(b"")
    empty = tmp_path / "empty"
    empty.mkdir()
    lora = producers.save_state_dict(producers.sd_scripts_sd15_lora(tiny_sd_pipeline(0), seed=1), tmp_path / "l.safetensors")
    cases = [
        (("inspect", tmp_path / "missing.safetensors"), "does not exist"),
        (("inspect", garbage), "not a readable safetensors file"),
        (("inspect", empty), "holds no .safetensors or .bin"),
        (("convert", not_lora, tmp_path / "o.safetensors", "--to", "kohya"), "not a LoRA file"),
        (("convert", lora, out_exists, "--to", "kohya"), "--force"),
        (("convert", lora, tmp_path / "o.safetensors", "--to", "kohya"), "pass --model"),  # tiny shapes: not SD 1.5's
        (("convert", lora, tmp_path / "o.safetensors", "--to", "kohya", "--model", tmp_path / "nope"), "--model"),
        (("generate", "--model", tmp_path / "nope", "--prompt", "x"), "nope"),
        (("convert", lora, tmp_path / "o.safetensors", "--to", "onnx"), "invalid choice"),
        (("inspect",), "required"),
        (("frobnicate",), "invalid choice"),
    ]
    for argv, needle in cases:
        code, out, err = run(capsys, *argv)
        assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o.safetensors").exists()


def test_debug_shows_the_real_exception(capsys, tmp_path):
    with pytest.raises(lora_loader.LoraError):
        main(["--debug", "inspect", os.fspath(tmp_path / "missing.safetensors")])
    with pytest.raises(lora_loader.LoraError):
        main(["inspect", os.fspath(tmp_path / "missing.safetensors"), "--debug"])


def test_help_and_no_command(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "inspect" in out and "convert" in out and "generate" in out and "demo" in out
    code, _, err = run(capsys)
    assert code == 2 and "usage:" in err


def test_python_dash_m_runs_the_command(tmp_path):
    sd = producers.sd_scripts_sd15_lora(tiny_sd_pipeline(0), seed=1)
    path = producers.save_state_dict(sd, tmp_path / "l.safetensors")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "lora_loader", "inspect", path, "--json", "--compact"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["format"] == "kohya" and info["tensors"] == len(sd)
    failed = subprocess.run([sys.executable, "-m", "lora_loader", "inspect", str(tmp_path / "missing.safetensors")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert failed.returncode == 1 and failed.stdout == ""
    assert_one_line_error(failed.returncode, failed.stderr, "does not exist")


# -- convert ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, via", [("sd1", "diffusers"), ("sdxl", "peft")])
def test_convert_without_model_round_trips_real_shaped_files_exactly(capsys, tmp_path, family, via):
    """No --model: names are resolved on the built-in SD 1.5 / SDXL skeleton (configs only, no weights).
    Kohya -> diffusers|peft -> Kohya gives back every key of the sd-scripts file with the same values."""
    source = real_shaped_kohya(family, tmp_path / "src.safetensors")
    middle, back = tmp_path / f"mid-{via}.safetensors", tmp_path / "back.safetensors"
    code, out, err = run(capsys, "convert", tmp_path / "src.safetensors", middle, "--to", via)
    assert code == 0, err
    assert "reloaded and checked identical" in out
    converted = load_file(os.fspath(middle))
    assert not any(k.startswith("lora_") for k in converted)
    assert {str(v.dtype) for v in converted.values()} == {"torch.float16"}  # the source's dtype is kept
    assert inspect_json(capsys, middle)["family"] == family
    code, out, err = run(capsys, "convert", middle, back, "--to", "kohya")
    assert code == 0, err
    result = load_file(os.fspath(back))
    assert set(result) == set(source)
    for key, tensor in source.items():
        assert torch.equal(result[key].float(), tensor.float()), key


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_convert_with_model_folder_gives_the_same_outputs(capsys, tmp_path, tiny_folders, kind):
    """--model: a pipeline folder (save_pretrained). A file converted to another layout and back loads to the same
    UNet and text encoder outputs as the original, and so does the intermediate file."""
    factory = tiny_sd_pipeline if kind == "sd" else tiny_sdxl_pipeline
    if kind == "sd":  # diffusers' writer -> Kohya -> diffusers
        source, _ = diffusers_file("sd", tmp_path)
        layouts = ("kohya", "diffusers")
    else:  # sd-scripts (Stability names, LoCon) -> PEFT keys -> Kohya
        source = producers.save_state_dict(producers.sd_scripts_sdxl_lora(factory(0), seed=2), tmp_path / "src.safetensors")
        layouts = ("peft", "kohya")
    middle, back = tmp_path / f"mid.safetensors", tmp_path / "back.safetensors"
    for src, dst, to in ((source, middle, layouts[0]), (middle, back, layouts[1])):
        code, out, err = run(capsys, "convert", src, dst, "--to", to, "--model", tiny_folders[kind])
        assert code == 0, err
        assert f"model {tiny_folders[kind]}" in out
    assert inspect_json(capsys, middle)["format"] == layouts[0]
    expected = pipeline_outputs(factory, source)
    base = outputs(factory(0))
    for path in (middle, back):
        got = pipeline_outputs(factory, path)
        for name, tensor in expected.items():
            torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6)
            assert not torch.allclose(tensor, base[name])  # the LoRA changes every output checked


def test_convert_refuses_to_change_a_linear_lora_into_a_conv_one(capsys, tmp_path, tiny_folders):
    """lora_loader loads a 2-D (Linear) LoRA onto a 1x1 Conv2d; written back it would be 4-D, which diffusers and
    peft cannot load on the Linear the file was made for. convert says so and writes nothing."""
    g = torch.Generator().manual_seed(0)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"  # a 1x1 Conv2d(8, 8) in the tiny SD 1.5 UNet
    sd = {f"{name}.lora_down.weight": torch.randn(2, 8, generator=g), f"{name}.lora_up.weight": torch.randn(8, 2, generator=g)}
    path = producers.save_state_dict(sd, tmp_path / "linear.safetensors")
    code, _, err = run(capsys, "convert", path, tmp_path / "o.safetensors", "--to", "diffusers", "--model", tiny_folders["sd"])
    assert_one_line_error(code, err, "Linear vs Conv2d")
    assert not (tmp_path / "o.safetensors").exists()


def test_convert_causal_lm_with_model_folder(capsys, tmp_path):
    """A PEFT adapter of a transformers model: PEFT -> Kohya -> PEFT folder, same logits; --model is the base folder."""
    tiny_llama(0).save_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    folder = peft_adapter(tiny_llama(0), config, tmp_path / "adapter")
    code, _, err = run(capsys, "convert", folder, tmp_path / "k.safetensors", "--to", "kohya")
    assert_one_line_error(code, err, "--model")  # no base_model_name_or_path in the adapter to fall back on
    for src, dst, to in ((folder, tmp_path / "k.safetensors", "kohya"), (tmp_path / "k.safetensors", tmp_path / "back", "peft")):
        code, _, err = run(capsys, "convert", src, dst, "--to", to, "--model", tmp_path / "base")
        assert code == 0, err
    assert sorted(os.listdir(tmp_path / "back")) == ["adapter_config.json", "adapter_model.safetensors"]
    ours = lora_loader.attach(tiny_llama(0))
    ours.load_adapter(os.fspath(tmp_path / "back"))
    oracle = peft.PeftModel.from_pretrained(tiny_llama(0), os.fspath(folder)).eval()
    torch.testing.assert_close(lm_logits(ours), lm_logits(oracle), rtol=0, atol=1e-5)
    # A layout lora_loader cannot read back is refused and leaves no file behind, whatever the reason.
    code, _, err = run(capsys, "convert", folder, tmp_path / "d.safetensors", "--to", "diffusers", "--model", tmp_path / "base")
    if code != 0:
        assert_one_line_error(code, err)
        assert not (tmp_path / "d.safetensors").exists()


# -- generate --------------------------------------------------------------------------------------------------------


def test_generate_writes_the_image_the_python_api_gives(capsys, tmp_path, tiny_folders):
    folder = tiny_folders["sd"]
    kohya = producers.save_state_dict(producers.sd_scripts_sd15_lora(tiny_sd_pipeline(0), seed=1), tmp_path / "style.safetensors")
    diffusers, _ = diffusers_file("sd", tmp_path)
    out = tmp_path / "out" / "cat.png"
    code, stdout, err = run(capsys, "generate", "--model", folder, "--lora", f"{kohya}:0.7", "--lora", f"{diffusers}:0.4",
                            "--prompt", "a cat", "--negative-prompt", "blurry", "--steps", "2", "--seed", "3",
                            "--out", out, "--device", "cpu")
    assert code == 0, err
    assert stdout.strip() == str(out)
    written = np.asarray(Image.open(out).convert("RGB"))

    pipe = lora_loader.attach(StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32))
    pipe.load_lora_weights(kohya, adapter_name="style")
    pipe.load_lora_weights(diffusers, adapter_name="d")
    pipe.set_adapters(["style", "d"], weights=[0.7, 0.4])
    image = pipe("a cat", negative_prompt="blurry", num_inference_steps=2,
                 generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert np.array_equal(written, np.asarray(image.convert("RGB")))
    pipe.disable_lora()
    base = pipe("a cat", negative_prompt="blurry", num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert not np.array_equal(written, np.asarray(base.convert("RGB")))  # the LoRAs did something


# -- demo ------------------------------------------------------------------------------------------------------------


def test_demo_calls_the_image_demo_lazily(capsys, tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("lora_loader.demo")
    fake.run_demo = lambda **kwargs: calls.append(kwargs)
    monkeypatch.setitem(sys.modules, "lora_loader.demo", fake)
    code, _, err = run(capsys, "demo", "--out", tmp_path / "g", "--steps", "3", "--seed", "5")
    assert code == 0, err
    assert calls == [{"out": tmp_path / "g", "steps": 3, "seed": 5}]
    code, _, err = run(capsys, "demo")
    assert code == 0, err
    assert calls[-1] == {"out": Path("gallery"), "seed": 0}  # the demo's own default step count
