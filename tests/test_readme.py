"""Every fenced code block of README.md is run (or, for the install commands, checked) by a test.

The blocks are extracted from README.md itself when this module is imported, so
editing a snippet into something broken fails here:

- ```python blocks that name Hub repos run in one child process whose environment
  points huggingface_hub at a local cache (``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1``)
  filled with tiny stand-ins under exactly those repo ids and file names
  (tests/readme_cache.py); each runs with ``exec`` in its own fresh working
  directory, then a check of what the snippet promises. The child refuses every
  network connection, as ``no_network`` does here.
- the embedded-model block runs in this process (it needs no Hub).
- the ```bash block of ``lora-loader`` lines runs each line (but the two demos)
  through ``lora_loader.cli.main`` in a folder holding the files the lines name.
- the two install commands are not run (they would reinstall): the test command
  must be exactly what ``.ci/run`` runs (modulo pip's ``-q``), the demo command must
  end with ``lora-loader demo``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_sources import no_network  # noqa: F401 - autouse: no test here may reach the network

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TESTS = Path(__file__).resolve().parent


# -- the blocks ---------------------------------------------------------------------------------------------------


def fenced_blocks(text: str) -> list[tuple[str, int, str]]:
    """``(language, first code line number, code)`` of every fenced block, in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = re.match(r"^(`{3,}|~{3,})\s*([\w+-]*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        fence, language = opening.groups()
        end = i + 1
        while end < len(lines) and not lines[end].startswith(fence):
            end += 1
        assert end < len(lines), f"README.md:{i + 1}: the fenced block is never closed"
        blocks.append((language.lower(), i + 2, "\n".join(lines[i + 1:end]) + "\n"))
        i = end + 1
    return blocks


BLOCKS = fenced_blocks(README.read_text(encoding="utf-8"))


def python_kind(code: str) -> str | None:
    """Which test runs a ```python block."""
    if "StableDiffusionXLPipeline" in code:
        return "sdxl"
    if "FluxPipeline" in code:
        return "flux"
    if "AutoModelForCausalLM" in code:
        return "llm"
    if "WanPipeline" in code:
        return "wan"
    if "HunyuanVideoTransformer3DModel" in code:
        return "hunyuan"
    if "from lora_loader import embedded" in code:
        return "embedded"
    return None


def bash_kind(code: str) -> str | None:
    """Which test checks a ```bash block."""
    lines = [line for line in code.splitlines() if line.strip()]
    if lines and all(line.startswith("lora-loader ") for line in lines):
        return "cli"
    if len(lines) == 1 and lines[0].startswith(".ci/newest"):
        return "newest-check"  # tests/test_newest_check.py
    if len(lines) == 1 and "pytest" in lines[0]:
        return "test-command"
    if len(lines) == 1 and lines[0].rstrip().endswith("lora-loader demo"):
        return "demo-command"
    return None


def blocks_of(language: str, kind: str) -> list[tuple[int, str]]:
    classify = python_kind if language == "python" else bash_kind
    return [(line, code) for lang, line, code in BLOCKS if lang == language and classify(code) == kind]


def the_block(language: str, kind: str) -> tuple[int, str]:
    found = blocks_of(language, kind)
    assert len(found) == 1, f"expected one ```{language} block of kind {kind!r} in README.md, found {len(found)}"
    return found[0]


def test_every_fenced_block_is_one_this_module_runs():
    """A new snippet, or one that no longer matches its test, fails here instead of going untested."""
    assert BLOCKS, "README.md has no fenced blocks"
    for language, line, code in BLOCKS:
        where = f"README.md:{line}"
        if language == "python":
            assert python_kind(code) is not None, f"{where}: a ```python block no test here runs"
        elif language == "bash":
            assert bash_kind(code) is not None, f"{where}: a ```bash block no test here runs"
        else:
            # The only untagged block is the package layout (a file tree, not code).
            assert language == "" and code.startswith("lora_loader/\n"), f"{where}: a ```{language} block no test here runs"
    kinds = [python_kind(c) for lang, _, c in BLOCKS if lang == "python"] + [bash_kind(c) for lang, _, c in BLOCKS if lang == "bash"]
    assert sorted(kinds) == sorted(["sdxl", "embedded", "flux", "llm", "wan", "hunyuan", "cli", "test-command", "demo-command",
                                    "newest-check"]), kinds


# -- the install commands -------------------------------------------------------------------------------------------


def commands(line: str) -> list[list[str]]:
    """A ``a && b && c`` line as shlex-split commands, pip's ``-q`` dropped."""
    out = []
    for part in line.split("&&"):
        argv = shlex.split(part)
        if argv[:4] == ["python3", "-m", "pip", "install"]:
            argv = [a for a in argv if a not in ("-q", "--quiet")]
        out.append(argv)
    return out


def ci_command() -> str:
    lines = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    runs = [line for line in lines if "pytest" in line]
    assert len(runs) == 1, f".ci/run: expected one line running pytest, found {runs}"
    return runs[0]


def test_the_test_command_is_exactly_what_ci_runs():
    line, code = the_block("bash", "test-command")
    readme = commands(code.strip())
    assert readme == commands(ci_command()), f"README.md:{line} and .ci/run run different commands"
    assert readme[-1][:3] == ["python3", "-m", "pytest"]


def test_the_demo_command_installs_the_package_then_runs_the_demo():
    line, code = the_block("bash", "demo-command")
    argv = commands(code.strip())
    assert argv[-1] == ["lora-loader", "demo"], f"README.md:{line}: {code}"
    installs = argv[:-1]
    assert installs and all(a[:4] == ["python3", "-m", "pip", "install"] for a in installs), installs
    assert any(a[-2:] == ["-e", "."] for a in installs), "the demo command does not install the package from the checkout"
    # The same torch as the tests and CI: the pins of both commands agree.
    pins = {a for a in sum(installs, []) if "==" in a}
    test_pins = {a for a in sum(commands(ci_command()), []) if "==" in a}
    assert pins and pins <= test_pins, (pins, test_pins)


def constraints() -> dict[str, str]:
    """constraints.txt as ``{normalised package name: version}``; every line must be an exact pin."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version and not set(version) & set("<>=!~*,"), f"constraints.txt: '{line}' is not an exact pin"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


@pytest.mark.parametrize("kind", ["test-command", "demo-command"])
def test_every_install_of_the_two_commands_goes_through_the_constraints_file(kind):
    """Issue 15: a release upstream (transformers 5.25) must not change what a fresh machine installs."""
    _, code = the_block("bash", kind)
    installs = [a for a in commands(code.strip()) if a[:4] == ["python3", "-m", "pip", "install"]]
    assert installs and all(a[4:6] == ["-c", "constraints.txt"] for a in installs), installs
    pins = constraints()
    for argv in installs:  # a version the command names is the one the constraints file pins
        for arg in argv[6:]:
            if "==" in arg:
                name, version = arg.split("==")
                assert pins.get(re.sub(r"[-_.]+", "-", name).lower()) == version, (arg, "constraints.txt")


def test_the_constraints_file_pins_every_package_the_project_installs_and_their_versions_are_the_installed_ones():
    """Each runtime and test requirement of pyproject.toml is pinned, and within its range; and the suite
    runs at exactly those versions (this test runs inside the environment the test command made)."""
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = constraints()
    for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
        requirement = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"constraints.txt does not pin {requirement.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"pyproject.toml's {spec} excludes the pinned {pins[name]}"
        if os.environ.get("LORA_LOADER_NEWEST_CHECK") != "1":  # .ci/newest installs newer releases on purpose
            assert version(requirement.name).split("+")[0] == pins[name], f"{requirement.name} {version(requirement.name)} installed, {pins[name]} pinned"


# -- the Hub snippets, in a child process with a local HF cache ----------------------------------------------------

HUB_KINDS = ("sdxl", "flux", "llm", "wan", "hunyuan")


@pytest.fixture(scope="module")
def hub_runs(tmp_path_factory):
    """Build the cache, run the sdxl, flux and llm snippets once in one child process; ``{kind: result}``."""
    import readme_cache

    root = tmp_path_factory.mktemp("readme-hub")
    cache = root / "hf-cache"
    readme_cache.build_hub_cache(cache, root / "stand-ins")
    jobs = []
    for kind in HUB_KINDS:
        for line, code in blocks_of("python", kind):
            cwd = root / f"cwd-{kind}-{line}"
            cwd.mkdir()
            jobs.append({"name": f"{kind}:{line}", "kind": kind, "code": code, "label": f"README.md:{line}",
                         "cwd": str(cwd), "check": kind})
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_"))}
    env.update(
        HF_HUB_CACHE=str(cache),
        HF_HOME=str(root / "hf-home"),
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TQDM_DISABLE="1",
        PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [sys.executable, str(TESTS / "readme_cache.py"), str(root / "jobs.json"), str(root / "results.json")],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    results = json.loads((root / "results.json").read_text()) if (root / "results.json").exists() else {}
    return {"jobs": jobs, "results": results, "returncode": proc.returncode, "output": (proc.stdout + proc.stderr)[-6000:]}


@pytest.mark.parametrize("kind", HUB_KINDS)
def test_hub_snippet_runs_and_keeps_its_promises(hub_runs, kind):
    """sdxl: two Kohya SDXL LoRAs from their repos, blended, block weights, disable gives the base UNet output
    exactly, fuse + unfuse leave every weight bit-identical, ``3d-kohya.safetensors`` holds Kohya keys with the
    real alphas and reloads to the same adapter. flux: FLUX.1-dev + the XLabs file, DiT block weights by path
    (``single_transformer_blocks.37`` exists), an image; the LoRA changes the transformer. llm: OPT + a PEFT
    adapter repo loaded twice and blended, per-row adapters in ``generate``, a new ``LoraConfig`` adapter saved
    as a folder peft reads, ``AutoLoraModelForCausalLM`` loading it back on the base its config names. wan: Wan 2.2's
    two experts, one Lightning file each under one name, each expert at its weight as its file alone gives.
    hunyuan: a Tencent-named LoRA on the HunyuanVideo transformer alone changes its output."""
    jobs = [job for job in hub_runs["jobs"] if job["kind"] == kind]
    assert jobs, f"README.md has no ```python block of kind {kind}"
    for job in jobs:
        result = hub_runs["results"].get(job["name"])
        assert result is not None, (
            f"{job['label']}: the child process did not report (exit code {hub_runs['returncode']}):\n{hub_runs['output']}"
        )
        assert result["ok"], f"{job['label']}: the {result['stage']} failed:\n{result.get('error')}"


# -- the embedded model, in this process -----------------------------------------------------------------------------


def test_embedded_snippet_draws_with_the_shipped_model_and_adapters(tmp_path, monkeypatch):
    """Needs the embedded model in lora_loader/embedded/shapes-sd/ and its adapters: it ships in the package."""
    from PIL import Image

    from lora_loader import embedded

    line, code = the_block("python", "embedded")
    # Said before the snippet runs, which would fail on the missing folder with an AttributeError from diffusers.
    assert (embedded.model_path() / "model_index.json").is_file(), f"the embedded model is not in {embedded.model_path()}"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)
    pipe, images = namespace["pipe"], namespace["images"]
    assert len(images) == 1 and isinstance(images[0], Image.Image), images
    assert images[0].size == (32, 32), images[0].size
    assert pipe.get_active_adapters() == ["neon", "pastel"], pipe.get_active_adapters()


# -- the lora-loader command block -----------------------------------------------------------------------------------


def cli_lines() -> list[tuple[int, list[str]]]:
    """``(README line, argv)`` of every line of the CLI block, ``# comments`` dropped."""
    found = blocks_of("bash", "cli")
    if len(found) != 1:
        return []
    first, code = found[0]
    out = []
    for offset, text in enumerate(code.splitlines()):
        argv = shlex.split(text, comments=True)
        if argv:
            out.append((first + offset, argv))
    return out


CLI_LINES = cli_lines()
DEMOS = [["lora-loader", "demo"], ["lora-loader", "demo", "--llm"]]


def test_the_cli_block_has_the_demo_lines_and_commands_to_run():
    assert CLI_LINES, "README.md has no ```bash block of lora-loader lines"
    argvs = [argv for _, argv in CLI_LINES]
    assert all(argv[0] == "lora-loader" for argv in argvs)
    for demo in DEMOS:  # run by tests/test_cli.py and the demo tests, not here (minutes, needs the GGUF)
        assert demo in argvs, f"README's CLI block lost `{' '.join(demo)}`"
    assert [argv for argv in argvs if argv not in DEMOS], "no lora-loader line to run"


def sd15_shaped_kohya(path: Path) -> None:
    """An sd-scripts LoRA for the real SD 1.5's shapes (``inspect`` and ``convert`` without ``--model`` need them):
    every cross-attention k/v, a 3x3 conv (LoCon), a 1x1 ``proj_in``, two text encoder attentions; fp16, alphas."""
    import producers
    from safetensors.torch import save_file

    from lora_loader.cli import build_skeleton

    host = build_skeleton("sd1")
    g = torch.Generator().manual_seed(5)
    sd = {}

    def add(name, module):
        locon = producers._is_locon(module)
        down, up = producers._lora_pair(module, 2 if locon else 4, g)
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down.half(), up.half()
        sd[f"{name}.alpha"] = torch.tensor(1.0 if locon else 2.0, dtype=torch.float16)

    for name, module in producers._sd_scripts_modules(host.unet):
        if name.endswith(("attn2.to_k", "attn2.to_v")) or name in ("conv_in", "down_blocks.0.attentions.0.proj_in"):
            add("lora_unet_" + name.replace(".", "_"), module)
    for name, module in producers._sd_scripts_modules(host.text_encoder):
        if ".layers.0.self_attn." in name or ".layers.11.self_attn." in name:
            add("lora_te_" + producers._with_text_model(name).replace(".", "_"), module)
    save_file(sd, os.fspath(path))


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory):
    """A folder with the files the CLI lines name: ``my_lora.safetensors`` (SD 1.5-shaped Kohya file),
    ``my-sd-folder/`` (the tiny SD pipeline, ``save_pretrained``), ``a.safetensors`` (sd-scripts naming) and
    ``b.safetensors`` (PEFT + diffusers' ``save_lora_weights``), both for that tiny pipeline."""
    import peft
    import producers
    from diffusers import StableDiffusionPipeline
    from tiny import tiny_sd_pipeline

    folder = tmp_path_factory.mktemp("readme-cli")
    sd15_shaped_kohya(folder / "my_lora.safetensors")
    pipe = tiny_sd_pipeline(0)
    pipe.save_pretrained(folder / "my-sd-folder")
    producers.save_state_dict(producers.sd_scripts_sd15_lora(pipe, seed=7), folder / "a.safetensors")
    configs = {"unet": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)}
    state_dicts = producers.peft_lora(tiny_sd_pipeline, 8, configs)
    producers.save_diffusers_lora(folder, StableDiffusionPipeline, state_dicts, configs, "b.safetensors")
    return folder


def check_merged_file(cli_dir: Path, argv: list[str]) -> None:
    """The merged file (a ``cat`` merge) alone gives what its sources blended with their weights give."""
    from tiny import outputs, tiny_sd_pipeline

    import lora_loader

    weights = {a.partition(":")[0]: float(a.partition(":")[2]) for a in argv[2:] if ":" in a}
    written = cli_dir / argv[argv.index("--to") + 1]
    blend = lora_loader.attach(tiny_sd_pipeline(0))
    for i, name in enumerate(weights):
        blend.load_lora_weights(str(cli_dir / name), adapter_name=f"s{i}")
    blend.set_adapters([f"s{i}" for i in range(len(weights))], list(weights.values()))
    merged = lora_loader.attach(tiny_sd_pipeline(0))
    merged.load_lora_weights(str(written), adapter_name="m")
    want, got = outputs(blend), outputs(merged)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4)


def _cli_id(item) -> str:
    line, argv = item
    return f"README.md:{line}:" + " ".join(argv[1:3])


@pytest.mark.parametrize("item", [item for item in CLI_LINES if item[1] not in DEMOS], ids=_cli_id)
def test_cli_line_exits_zero_and_does_what_it_says(item, cli_dir, monkeypatch, capsys):
    from lora_loader.cli import main

    line, argv = item
    monkeypatch.chdir(cli_dir)
    command = argv[1]
    capsys.readouterr()
    code = main(argv[1:])
    out, err = capsys.readouterr()
    assert code == 0, f"README.md:{line}: `{' '.join(argv)}` exited {code}:\n{err[-3000:]}"
    if command == "inspect":
        if "--json" in argv:
            info = json.loads(out)
            assert (info["format"], info["family"], info["unknown_keys"]) == ("kohya", "sd1", {}), info
        else:
            assert "format" in out and "base model  SD 1.x" in out, out
    elif command == "convert":
        written = cli_dir / argv[3]
        assert written.is_file(), f"convert wrote no {written.name}"
        with safe_open(written, "pt") as f:
            keys = list(f.keys())
        assert keys and all(k.startswith(("unet.", "text_encoder.")) for k in keys), keys[:4]
    elif command == "merge":
        check_merged_file(cli_dir, argv)
    elif command == "generate":
        images = sorted((cli_dir / "lora-loader-out").glob("*.png"))
        assert images, f"generate wrote no image: {out}"
    else:
        pytest.fail(f"README.md:{line}: no check for `lora-loader {command}`")
