#!/usr/bin/env python3
"""lora_loader against diffusers+peft (and transformers+peft for the LM), side by side.

One command builds, with seeded random weights and no downloads, an SD 1.5 UNet and
CLIP text encoder (the real SD 1.5 configs) and a ~1.1B-parameter Llama, writes
realistic LoRA files (Kohya SD 1.5, rank 32, on every attention projection,
proj_in/proj_out and feed-forward layer of the UNet and every attention and MLP
layer of the text encoder; a PEFT adapter folder made by peft itself, rank 16 on
all linear layers of the LM), and times both libraries in the same process, in
alternating rounds (the order flips every round). Every figure is printed as
median, min and max over the rounds and as a ratio, and ``benchmarks/RESULTS.md``
is written with the machine it ran on.

    python benchmarks/run.py                 # the full run (~19 min on a 2-core CPU)
    python benchmarks/run.py --quick         # smaller models, 2 rounds: a smoke run (~3 min)
    python benchmarks/run.py --repeats 7     # more rounds
    python benchmarks/run.py --only load,fuse

Figures (names for ``--only``): load, switch, forward, fuse, rss, lm.
See benchmarks/README.md for what each figure measures.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import ctypes
import datetime
import gc
import json
import os
import platform
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # the lora_loader of this checkout, installed or not

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from torch import nn  # noqa: E402


def quiet_libraries() -> None:
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for log in (dlog, tlog):
        log.set_verbosity_error()
        log.disable_progress_bar()

FIGURES = ("load", "switch", "forward", "fuse", "rss", "lm")
LL = "lora_loader"
DP = "diffusers+peft"
TP = "transformers+peft"
ST = "safetensors read"

# -- sizes -------------------------------------------------------------------------------------------

SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    sample_size=64,
    in_channels=4,
    out_channels=4,
)
SD15_TEXT = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=49408)
# TinyLlama-1.1B's shape: 1.10 B parameters (16 layers would give only 0.84 B).
LLAMA_1B = dict(
    hidden_size=2048,
    num_hidden_layers=22,
    intermediate_size=5632,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
)


@dataclass
class Size:
    name: str
    unet: dict
    text: dict
    llama: dict
    latent: int  # latent side: the UNet forward runs on 1 x 4 x latent x latent
    lm_tokens: int  # the LM forward runs on 1 x lm_tokens
    n_load: int = 10  # adapters loaded one after another for "10th vs 1st"
    n_small: int = 50  # small adapters loaded for the set_adapters figure
    kohya_rank: int = 32
    kohya_alpha: float = 16.0
    small_rank: int = 4
    lm_rank: int = 16
    repeats: int = 5
    rss_repeats: int = 2


FULL = Size("full", SD15_UNET, SD15_TEXT, LLAMA_1B, latent=32, lm_tokens=64)
QUICK = Size(
    "quick",
    dict(SD15_UNET, block_out_channels=(64, 128, 256, 256), cross_attention_dim=256),
    dict(SD15_TEXT, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    dict(LLAMA_1B, hidden_size=512, num_hidden_layers=4, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2),
    latent=16,
    lm_tokens=32,
    n_small=10,
    repeats=2,
    rss_repeats=1,
)

UNET_TARGETS = re.compile(r".*\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|.*\.(proj_in|proj_out)|.*\.ff\.net\.(0\.proj|2)")
TEXT_TARGETS = re.compile(r".*\.self_attn\.(q_proj|k_proj|v_proj|out_proj)|.*\.mlp\.(fc1|fc2)")


# -- models with seeded random weights, built fast -----------------------------------------------------

_POOL = None


def _pool() -> torch.Tensor:
    """4M seeded uniform values of unit variance, twice over so any window of 4M can be sliced."""
    global _POOL
    if _POOL is None:
        pool = torch.empty(1 << 22).uniform_(-(3**0.5), 3**0.5, generator=torch.Generator().manual_seed(1234))
        _POOL = torch.cat([pool, pool])
    return _POOL


def fill_seeded(module: nn.Module, seed: int) -> None:
    """Seeded random weights without the cost of torch's init: every matrix gets windows of a random pool
    at seeded offsets, scaled to 1/sqrt(fan_in); norm weights 1, biases 0."""
    pool, n = _pool(), 1 << 22
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            flat = p.view(-1)
            if p.dim() >= 2:
                std = p[0].numel() ** -0.5
                for i in range(0, flat.numel(), n):
                    length = min(n, flat.numel() - i)
                    off = int(torch.randint(0, n, (1,), generator=g))
                    torch.mul(pool[off : off + length], std, out=flat[i : i + length])
            elif name.endswith("bias"):
                flat.zero_()
            else:
                flat.fill_(1.0)


@contextlib.contextmanager
def no_init():
    from transformers.initialization import no_init_weights

    with no_init_weights():
        yield


def build_unet(size: Size, seed: int, fill: bool = True):
    from diffusers import UNet2DConditionModel

    with no_init():
        unet = UNet2DConditionModel(**size.unet)
    if fill:
        fill_seeded(unet, seed)
    else:
        touch(unet)
    return unet.eval()


def build_text_encoder(size: Size, seed: int, fill: bool = True):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**size.text, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=size.text["hidden_size"])
    with no_init():
        te = CLIPTextModel(config)
    if fill:
        fill_seeded(te, seed)
    else:
        touch(te)
    return te.eval()


def touch(module: nn.Module) -> None:
    """Make every weight resident (for the memory figure, where values do not matter)."""
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(0.01)


def build_llama(size: Size, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**size.llama, tie_word_embeddings=False, max_position_embeddings=2048)
    with no_init():
        model = LlamaForCausalLM(config)
    fill_seeded(model, seed)
    return model.eval()


_TOKENIZER_DIR = None


def tiny_tokenizer():
    """A byte-level CLIP tokenizer with no merges, written offline (the pipeline needs one; it is never timed)."""
    global _TOKENIZER_DIR
    from transformers import CLIPTokenizer

    if _TOKENIZER_DIR is None:
        _TOKENIZER_DIR = tempfile.mkdtemp(prefix="bench-clip-tok-")
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs, extra = bs[:], 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + extra)
                extra += 1
        units = [chr(c) for c in cs]
        vocab = units + [u + "</w>" for u in units] + ["<|startoftext|>", "<|endoftext|>"]
        with open(os.path.join(_TOKENIZER_DIR, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
        with open(os.path.join(_TOKENIZER_DIR, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(_TOKENIZER_DIR, model_max_length=77)


def make_pipeline(unet, text_encoder):
    """A StableDiffusionPipeline around the given UNet and text encoder (a tiny VAE: it is never run)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=16,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# -- LoRA files ------------------------------------------------------------------------------------------


def kohya_targets(unet, text_encoder) -> list[tuple[str, nn.Module]]:
    """(Kohya module name, module) for every layer a full SD 1.5 LoRA covers, as sd-scripts names them."""
    out = []
    for name, module in unet.named_modules():
        if UNET_TARGETS.fullmatch(name):
            out.append(("lora_unet_" + name.replace(".", "_"), module))
    for name, module in text_encoder.named_modules():
        if TEXT_TARGETS.fullmatch(name):
            full = name if name.startswith("text_model.") else "text_model." + name  # transformers 5 dropped it
            out.append(("lora_te_" + full.replace(".", "_"), module))
    return out


def write_kohya(path: str, targets, rank: int, alpha: float, seed: int) -> int:
    """A Kohya/sd-scripts file: fp16 lora_down / lora_up (4-D for 1x1 convs) and fp16 .alpha, plus ss_ metadata."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, module in targets:
        if isinstance(module, nn.Conv2d):
            fan_in, fan_out = module.in_channels, module.out_channels
            down_shape, up_shape = (rank, fan_in, 1, 1), (fan_out, rank, 1, 1)
        else:
            fan_in, fan_out = module.in_features, module.out_features
            down_shape, up_shape = (rank, fan_in), (fan_out, rank)
        tensors[f"{key}.lora_down.weight"] = (torch.randn(down_shape, generator=g) * fan_in**-0.5).half()
        tensors[f"{key}.lora_up.weight"] = (torch.randn(up_shape, generator=g) * 0.02).half()
        tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha), "ss_base_model_version": "sd_v1"}
    save_file(tensors, path, metadata=meta)
    return len(targets)


def write_peft_adapters(model, folders: list[str], rank: int, seed: int) -> None:
    """PEFT adapter folders made by peft itself (get_peft_model + save_pretrained), rank ``rank`` on all linear layers."""
    from peft import LoraConfig, get_peft_model

    for i, folder in enumerate(folders):
        torch.manual_seed(seed + i)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        with torch.no_grad():  # init_lora_weights=False gives B a kaiming init: scale it to a realistic strength
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.05)
        peft_model.save_pretrained(folder)
        peft_model.unload()  # the base modules back in place, weights untouched
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if hasattr(model, attr):
                with contextlib.suppress(AttributeError):
                    delattr(model, attr)


# -- measuring -----------------------------------------------------------------------------------------


def timed(fn) -> tuple[float, object]:
    gc.collect()
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def time_each(calls: dict) -> dict[str, float]:
    """Seconds per call, run in order, after one gc.collect() so no collection lands inside them."""
    gc.collect()
    out = {}
    for name, call in calls.items():
        t0 = time.perf_counter()
        call()
        out[name] = time.perf_counter() - t0
    return out


def minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def read_safetensors(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def rounds(n: int):
    """Round r, and the library order for it: alternates every round."""
    for r in range(n):
        yield r, (LL, "other") if r % 2 == 0 else ("other", LL)


@dataclass
class Row:
    figure: str
    what: str
    unit: str  # "s", "ms", "%", "x", "MiB", "count"
    ll: list | None
    other: list | None
    other_name: str
    target: str = ""
    met: bool | None = None
    verdict: str = ""
    kind: str = "time"  # "time": ratio = other / ll (times faster); "plain": no ratio
    profile: list = field(default_factory=list)  # lines: where lora_loader's time goes (cProfile), shown for missed targets


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print("  " + format_row_text(row), flush=True)
        return row


def med(xs):
    return statistics.median(xs) if xs else float("nan")


SCALE = {"s": (1.0, "s"), "ms": (1e3, "ms"), "us": (1e6, "µs"), "%": (1.0, "%"), "x": (1.0, "x"), "MiB": (1.0, "MiB"), "count": (1, "")}


def fmt_value(v, unit: str) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if unit == "count":
        return str(int(v))
    if unit in ("s", "ms"):  # pick ms or s by magnitude; samples are stored in seconds
        if v < 1e-3:
            return f"{v * 1e6:.0f} µs"
        if v < 1.0:
            return f"{v * 1e3:.3g} ms"
        return f"{v:.3g} s"
    if unit == "%":
        return f"{v:+.1f}%"
    if unit == "x":
        return f"{v:.2f}x"
    return f"{v:.1f} {SCALE[unit][1]}"


def fmt_stats(xs, unit: str) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt_value(xs[0], unit)
    return f"{fmt_value(med(xs), unit)} [{fmt_value(min(xs), unit)} – {fmt_value(max(xs), unit)}]"


def ratio_text(row: Row) -> str:
    if row.kind != "time" or not row.other or not row.ll:
        return "-"
    r = med(row.other) / med(row.ll)
    return f"{r:.1f}x faster" if r >= 1 else f"{1 / r:.1f}x slower"


def format_row_text(row: Row) -> str:
    other = f"{row.other_name} {fmt_stats(row.other, row.unit)}" if row.other else ""
    verdict = f" | {row.verdict}" if row.verdict else ""
    mine = f"{LL} {fmt_stats(row.ll, row.unit)} | " if row.ll else ""
    return f"[{row.figure}] {row.what}: {mine}{other} | {ratio_text(row)}{verdict}"


def verdict(met: bool, text: str) -> str:
    return ("MET: " if met else "MISSED: ") + text


def faster_text(speed: float, target: float = 5.0) -> str:
    if speed >= target:
        return f"{speed:.1f}x faster"
    now = f"{speed:.1f}x faster" if speed >= 1 else f"{1 / speed:.1f}x slower"
    return f"{now} (target {target:g}x faster: {target / speed:.1f}x short)"


def profile(fn, calls: int = 1) -> dict:
    """cProfile of ``calls`` calls of fn: {label: (own seconds, cumulative seconds)} per call."""
    gc.collect()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    out = {}
    for (path, line, func), (_, _, tt, ct, _) in pstats.Stats(prof).stats.items():
        if "/lora_loader/" in path:
            label = "lora_loader/" + path.split("/lora_loader/", 1)[1] + f":{line} {func}"
        elif path == "~":
            label = func
        else:
            label = f"{Path(path).parent.name}/{Path(path).name}:{line} {func}"
        out[label] = (tt / calls, ct / calls)
    return out


def profile_lines(prof: dict, n_own: int = 7, n_other: int = 4) -> list[str]:
    """The lora_loader functions with the most cumulative time, and the other functions with the most own time."""
    own = sorted(((ct, k) for k, (tt, ct) in prof.items() if k.startswith("lora_loader/")), reverse=True)[:n_own]
    other = sorted(((tt, k) for k, (tt, ct) in prof.items() if not k.startswith("lora_loader/")), reverse=True)[:n_other]
    lines = [f"cumulative {ct * 1e3:9.2f} ms  {k}" for ct, k in own]
    lines += [f"own        {tt * 1e3:9.2f} ms  {k}" for tt, k in other]
    return lines


def profile_compare(a: dict, b: dict, label_a: str, label_b: str, n: int = 8) -> list[str]:
    """The lora_loader functions whose cumulative time grew most from profile a to profile b."""
    keys = [k for k in b if k.startswith("lora_loader/")]
    keys.sort(key=lambda k: b[k][1] - a.get(k, (0, 0))[1], reverse=True)
    lines = [f"{'cumulative ms':>13} {label_a:>8} -> {label_b:<8}"]
    for k in keys[:n]:
        lines.append(f"{'':>13} {a.get(k, (0, 0))[1] * 1e3:8.2f} -> {b[k][1] * 1e3:<8.2f} {k}")
    other = sorted((k for k in b if not k.startswith("lora_loader/")), key=lambda k: b[k][0] - a.get(k, (0, 0))[0], reverse=True)
    lines.append(f"{'own ms':>13}")
    for k in other[:4]:
        lines.append(f"{'':>13} {a.get(k, (0, 0))[0] * 1e3:8.2f} -> {b[k][0] * 1e3:<8.2f} {k}")
    return lines


# -- lora_loader / diffusers helpers ------------------------------------------------------------------


def peft_layer_counts(pipe_or_model, adapter: str, components=("unet", "text_encoder")) -> dict[str, int]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for component in components:
        model = getattr(pipe_or_model, component, None) if component != "model" else pipe_or_model
        if model is None:
            continue
        n = sum(1 for m in model.modules() if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {}))
        if n:
            out[component] = n
    return out


def remove_peft(model: nn.Module) -> None:
    """Every PEFT layer of a transformers model replaced by its base layer (transformers has no unload)."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(model)
    for attr in ("peft_config",):
        if hasattr(model, attr):
            delattr(model, attr)
    model._hf_peft_config_loaded = False


def no_lora_left(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from lora_loader.layers import LoraLayer

    return not any(isinstance(m, (BaseTunerLayer, LoraLayer)) for m in model.modules())


def changed_weights(model: nn.Module, reference: dict[str, torch.Tensor]) -> int:
    """How many of the reference's tensors differ (not bit-equal) from the model's; PEFT's base_layer unwrapped."""
    live = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        live[name.replace(".base_layer.", ".")] = p.detach()
    missing = [k for k in reference if k not in live]
    if missing:
        raise RuntimeError(f"changed_weights: {len(missing)} reference tensors not found, e.g. {missing[:3]}")
    return sum(1 for k, ref in reference.items() if not torch.equal(live[k], ref))


# -- the SD figures ------------------------------------------------------------------------------------


class SDBench:
    def __init__(self, size: Size, args, report: Report, workdir: Path):
        import lora_loader

        self.size, self.args, self.report, self.workdir = size, args, report, workdir
        self.repeats = args.repeats or size.repeats
        t0 = time.perf_counter()
        print(f"building SD 1.5 UNet + text encoder x3 ({size.name}) ...", flush=True)
        self.base_unet = build_unet(size, 0)
        self.base_te = build_text_encoder(size, 1)
        self.n_unet = sum(p.numel() for p in self.base_unet.parameters())
        self.n_te = sum(p.numel() for p in self.base_te.parameters())
        self.ll = lora_loader.attach(make_pipeline(copy.deepcopy(self.base_unet), copy.deepcopy(self.base_te)))
        self.dp = make_pipeline(copy.deepcopy(self.base_unet), copy.deepcopy(self.base_te))
        self.pipes = {LL: self.ll, "other": self.dp}
        print(f"  built in {time.perf_counter() - t0:.1f} s: UNet {self.n_unet / 1e6:.0f} M, text encoder {self.n_te / 1e6:.0f} M params", flush=True)
        t0 = time.perf_counter()
        targets = kohya_targets(self.base_unet, self.base_te)
        self.n_targets = {"unet": sum(k.startswith("lora_unet_") for k, _ in targets), "text_encoder": sum(k.startswith("lora_te_") for k, _ in targets)}
        self.files = []
        for i in range(size.n_load):
            path = str(workdir / f"kohya_sd15_r{size.kohya_rank}_{i}.safetensors")
            write_kohya(path, targets, size.kohya_rank, size.kohya_alpha, seed=100 + i)
            self.files.append(path)
        self.small_files = []
        if "switch" in args.figures:
            for i in range(size.n_small):
                path = str(workdir / f"kohya_sd15_r{size.small_rank}_{i}.safetensors")
                write_kohya(path, targets, size.small_rank, float(size.small_rank), seed=1000 + i)
                self.small_files.append(path)
        self.file_mib = os.path.getsize(self.files[0]) / 2**20
        for path in self.files + self.small_files:  # warm the page cache for every reader
            read_safetensors(path)
        print(
            f"  wrote {len(self.files)} Kohya files ({self.file_mib:.1f} MiB each, rank {size.kohya_rank}, "
            f"{self.n_targets['unet']} UNet + {self.n_targets['text_encoder']} text-encoder modules) and "
            f"{len(self.small_files)} rank-{size.small_rank} files in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )

    # loading -------------------------------------------------------------------------
    def load(self, lib: str, path: str, name: str) -> float:
        pipe = self.pipes[lib]
        faults = minor_faults()
        dt, result = timed(lambda: pipe.load_lora_weights(path, adapter_name=name))
        self.last_faults = minor_faults() - faults  # pages the kernel had to map (and zero) during the load
        if lib == LL:
            self.last_report = result
        return dt

    def unload(self, lib: str) -> None:
        pipe = self.pipes[lib]
        pipe.unload_lora_weights()
        gc.collect()
        for component in (pipe.unet, pipe.text_encoder):
            assert no_lora_left(component), f"{lib}: unload_lora_weights left LoRA layers"

    def check_same_modules(self, name: str) -> None:
        ll_counts = dict(self.last_report.modules)  # the load report of the last lora_loader load ("a0" here)
        dp_counts = peft_layer_counts(self.dp, name)
        line = f"adapter modules injected: {LL} {ll_counts}, {DP} {dp_counts}, file {self.n_targets}"
        self.report.checks.append(line)
        print("  " + line, flush=True)

    def fig_load(self) -> None:
        size, n = self.size, self.size.n_load
        print(f"\n== load: load_lora_weights of a {self.file_mib:.0f} MiB Kohya SD 1.5 file, adapters 1..{n}, {self.repeats} rounds", flush=True)
        times = {LL: [], "other": []}
        faults = {LL: [], "other": []}  # per round: minor page faults of the 1st and the nth load
        reads = []
        # An untimed warm-up round: the first loads in a process pay for imports, first-call caches and
        # fresh (page-faulted) memory. They are reported on their own row.
        cold = {}
        for lib in (LL, "other"):
            cold[lib] = [self.load(lib, path, f"a{i}") for i, path in enumerate(self.files[:2])]
            if lib == LL:
                first_report = self.last_report
        self.last_report = first_report
        self.check_same_modules("a0")
        for lib in (LL, "other"):
            self.unload(lib)
        print(f"  warm-up: {LL} 1st {cold[LL][0]:.3f} s | {DP} 1st {cold['other'][0]:.3f} s", flush=True)
        for r, order in rounds(self.repeats):
            reads.append(timed(lambda: read_safetensors(self.files[0]))[0])
            for lib in order:
                ts, fs = [], []
                for i, path in enumerate(self.files):
                    ts.append(self.load(lib, path, f"a{i}"))
                    fs.append(self.last_faults)
                times[lib].append(ts)
                faults[lib].append((fs[0], fs[-1]))
            for lib in order:
                self.unload(lib)
            reads.append(timed(lambda: read_safetensors(self.files[0]))[0])
            print(f"  round {r + 1}: {LL} 1st {times[LL][-1][0]:.3f} s, {n}th {times[LL][-1][-1]:.3f} s | "
                  f"{DP} 1st {times['other'][-1][0]:.3f} s, {n}th {times['other'][-1][-1]:.3f} s | read {reads[-1]:.3f} s", flush=True)
        first = {lib: [ts[0] for ts in times[lib]] for lib in times}
        last = {lib: [ts[-1] for ts in times[lib]] for lib in times}
        growth = {lib: [ts[-1] / ts[0] for ts in times[lib]] for lib in times}
        rep = self.report
        rep.add(Row("load", "reference: safetensors read of the same file (warm)", "s", None, reads, "safetensors", kind="plain"))
        ll1, dp1, st = med(first[LL]), med(first["other"]), med(reads)
        ok_read, ok_speed = ll1 <= 2 * st, dp1 / ll1 >= 5
        first_row = rep.add(Row(
            "load", f"load_lora_weights, 1st adapter ({self.file_mib:.0f} MiB Kohya SD 1.5, rank {size.kohya_rank})", "s",
            first[LL], first["other"], DP,
            target="<= 2x the safetensors read, and >= 5x faster than diffusers+peft",
            met=ok_read and ok_speed,
            verdict="; ".join([
                verdict(ok_read, f"{ll1 / st:.2f}x the read" + ("" if ok_read else f" (target 2x: {ll1 / (2 * st):.2f}x over)")),
                verdict(ok_speed, faster_text(dp1 / ll1) + f" than {DP}"),
            ]),
        ))
        rep.add(Row("load", f"load_lora_weights, {n}th adapter ({n - 1} already loaded)", "s", last[LL], last["other"], DP))
        rep.add(Row("load", "the very first load in the process (warm-up round, not in the medians)", "s", [cold[LL][0]], [cold["other"][0]], DP))
        for which, label in ((0, "1st"), (1, f"{n}th")):
            rep.add(Row("load", f"minor page faults during the {label} load (fresh memory the kernel maps and zeroes)",
                        "count", [f[which] for f in faults[LL]], [f[which] for f in faults["other"]], DP, kind="plain"))
        # Where the time goes: one profiled sequence of lora_loader loads (1st and nth profiled).
        prof_first = profile(lambda: self.ll.load_lora_weights(self.files[0], adapter_name="a0"))
        for i in range(1, n - 1):
            self.load(LL, self.files[i], f"a{i}")
        prof_last = profile(lambda: self.ll.load_lora_weights(self.files[n - 1], adapter_name=f"a{n - 1}"))
        self.unload(LL)
        first_row.profile = ["one load_lora_weights into a model with no adapter:"] + profile_lines(prof_first)
        g = med(growth[LL])
        rep.add(Row(
            "load", f"{n}th load / 1st load (per round)", "x", growth[LL], growth["other"], DP, kind="plain",
            target="within 10% of the first (<= 1.10x)", met=g <= 1.10,
            verdict=verdict(g <= 1.10, f"{g:.2f}x" + ("" if g <= 1.10 else f" ({(g - 1.10) * 100:.0f} points over)")),
            profile=[f"what grows from the 1st load to the {n}th (one profiled sequence):"] + profile_compare(prof_first, prof_last, "1st", f"{n}th"),
        ))

    # set_adapters / disable / enable -----------------------------------------------------------
    def fig_switch(self) -> None:
        size = self.size
        print(f"\n== switch: set_adapters / disable_lora / enable_lora with 1 and {size.n_small} loaded (rank-{size.small_rank} adapters)", flush=True)
        inner = 10
        loads = {LL: [], "other": []}
        for lib in (LL, "other"):
            loads[lib].append(self.load(lib, self.small_files[0], "s0"))
        results = {}

        def measure(loaded: int) -> None:
            samples = {lib: {"set_adapters": [], "disable_lora": [], "enable_lora": []} for lib in (LL, "other")}
            for lib in (LL, "other"):  # untimed warm-up calls
                for _ in range(2):
                    self.pipes[lib].set_adapters(["s0"], [1.0])
                    self.pipes[lib].disable_lora()
                    self.pipes[lib].enable_lora()
            for r, order in rounds(self.repeats):
                for lib in order:
                    pipe = self.pipes[lib]
                    for i in range(inner):
                        w = 0.5 if i % 2 else 1.0
                        times = time_each({"set_adapters": lambda: pipe.set_adapters(["s0"], [w]),
                                           "disable_lora": pipe.disable_lora, "enable_lora": pipe.enable_lora})
                        for name, dt in times.items():
                            samples[lib][name].append(dt)
            results[loaded] = samples

        measure(1)
        for i in range(1, size.n_small):  # the other 49, alternating libraries adapter by adapter
            for lib in ((LL, "other") if i % 2 else ("other", LL)):
                loads[lib].append(self.load(lib, self.small_files[i], f"s{i}"))
        n = size.n_small
        print(f"  loaded {n} small adapters: {LL} 1st {loads[LL][0]:.3f} s, {n}th {loads[LL][-1]:.3f} s | "
              f"{DP} 1st {loads['other'][0]:.3f} s, {n}th {loads['other'][-1]:.3f} s", flush=True)
        measure(n)
        profiles = {
            "set_adapters": profile(lambda: self.ll.set_adapters(["s0"], [0.5]), calls=10),
            "disable_lora": profile(lambda: (self.ll.disable_lora(), self.ll.enable_lora()), calls=10),
        }
        profiles["enable_lora"] = profiles["disable_lora"]
        for call in ("set_adapters", "disable_lora", "enable_lora"):
            for loaded in (1, n):
                s = results[loaded]
                ll_med = med(s[LL][call])
                row = Row("switch", f"{call}, {loaded} loaded", "ms", s[LL][call], s["other"][call], DP)
                if loaded == n:
                    growth = ll_med / med(results[1][LL][call])
                    fast, flat = ll_med <= 1e-3, growth <= 1.2
                    row.target = f"<= 1 ms, flat up to {n} loaded (flat read as <= 1.2x the 1-loaded time)"
                    row.met = fast and flat
                    row.verdict = "; ".join([
                        verdict(fast, f"{ll_med * 1e3:.3g} ms" + ("" if fast else f" ({ll_med / 1e-3:.1f}x the 1 ms target)")),
                        verdict(flat, f"{growth:.2f}x the 1-loaded time ({DP}: {med(s['other'][call]) / med(results[1]['other'][call]):.2f}x)"),
                    ])
                    what = "set_adapters(['s0'], [0.5])" if call == "set_adapters" else "disable_lora() + enable_lora()"
                    row.profile = [f"per call of {what}, {n} loaded:"] + profile_lines(profiles[call])
                self.report.add(row)
        self.report.add(Row("switch", f"loading the {n}th small adapter / the 1st", "x",
                            [loads[LL][-1] / loads[LL][0]], [loads["other"][-1] / loads["other"][0]], DP, kind="plain"))
        for lib in (LL, "other"):
            self.unload(lib)

    # UNet forward ------------------------------------------------------------------------------
    def ensure_ab(self) -> None:
        for lib, pipe in self.pipes.items():
            loaded = pipe.get_list_adapters().get("unet", [])
            for name, path in (("A", self.files[0]), ("B", self.files[1])):
                if name not in loaded:
                    self.load(lib, path, name)

    def fig_forward(self) -> None:
        size = self.size
        lat = size.latent
        print(f"\n== forward: UNet forward on 1x4x{lat}x{lat} latents, unfused, 1 and 2 adapters", flush=True)
        self.ensure_ab()
        g = torch.Generator().manual_seed(7)
        hidden = size.text["hidden_size"]
        x = torch.randn(1, 4, lat, lat, generator=g)
        ehs = torch.randn(1, 77, hidden, generator=g)
        t = torch.tensor([500])
        unets = {"base": self.base_unet, LL: self.ll.unet, "other": self.dp.unet}

        def forward(which: str):
            with torch.no_grad():
                return unets[which](x, t, encoder_hidden_states=ehs).sample

        for k, names, weights in ((1, ["A"], [1.0]), (2, ["A", "B"], [0.7, 0.5])):
            for pipe in self.pipes.values():
                pipe.set_adapters(names, weights)
            outs = {w: forward(w) for w in ("base", LL, "other")}  # warm-up (and lora_loader's concatenation)
            diff = (outs[LL] - outs["other"]).abs().max().item()
            moved = (outs[LL] - outs["base"]).abs().max().item()
            line = f"UNet output with {k} adapter(s): max |{LL} - {DP}| = {diff:.2e} (the LoRA moves it by {moved:.2e})"
            self.report.checks.append(line)
            print("  " + line, flush=True)
            samples = {"base": [], LL: [], "other": []}
            overhead = {LL: [], "other": []}
            perms = [("base", LL, "other"), ("other", "base", LL), (LL, "other", "base")]
            for r in range(self.repeats):
                for which in perms[r % 3]:
                    samples[which].append(timed(lambda: forward(which))[0])
                for lib in (LL, "other"):
                    overhead[lib].append((samples[lib][-1] / samples["base"][-1] - 1) * 100)
                print(f"  round {r + 1}: base {samples['base'][-1]:.3f} s, {LL} {samples[LL][-1]:.3f} s, {DP} {samples['other'][-1]:.3f} s", flush=True)
            self.report.add(Row("forward", f"reference: UNet forward 1x4x{lat}x{lat}, base model (no LoRA)", "s", None, samples["base"], "base model", kind="plain"))
            self.report.add(Row("forward", f"UNet forward, {k} adapter(s) unfused", "s", samples[LL], samples["other"], DP))
            row = Row("forward", f"overhead over base, {k} adapter(s) (per round)", "%", overhead[LL], overhead["other"], DP, kind="plain")
            if k == 2:
                o = med(overhead[LL])
                row.target, row.met = "two adapters <= +15%", o <= 15
                row.verdict = verdict(o <= 15, f"{o:+.1f}%" + ("" if o <= 15 else f" ({o - 15:.1f} points over)"))
            self.report.add(row)

    # fuse / unfuse -----------------------------------------------------------------------------
    def fig_fuse(self) -> None:
        print("\n== fuse: fuse_lora + unfuse_lora of one adapter (UNet + text encoder), bit-exactness", flush=True)
        self.ensure_ab()
        reference = {"unet": {k: v.detach().clone() for k, v in self.base_unet.named_parameters()},
                     "text_encoder": {k: v.detach().clone() for k, v in self.base_te.named_parameters()}}
        fuse, unfuse = {LL: [], "other": []}, {LL: [], "other": []}
        changed_first, changed_last = {}, {}
        for pipe in self.pipes.values():
            pipe.set_adapters(["A"], [1.0])
        # The floor for any bit-exact fuse: the originals of every targeted weight must survive the
        # fuse, so that many bytes of fresh memory are written once per cycle. Timed in the same rounds.
        targeted = [m.weight for _, m in kohya_targets(self.base_unet, self.base_te)]
        targeted_mib = sum(w.numel() * w.element_size() for w in targeted) / 2**20
        floor = []

        def fresh_copy() -> None:
            copies = [w.detach().clone() for w in targeted]
            del copies

        for r, order in rounds(self.repeats):
            floor.append(timed(fresh_copy)[0])
            for lib in order:
                pipe = self.pipes[lib]
                fuse[lib].append(timed(lambda: pipe.fuse_lora())[0])
                unfuse[lib].append(timed(lambda: pipe.unfuse_lora())[0])
                if r == 0 or r == self.repeats - 1:
                    counts = {c: changed_weights(getattr(pipe, c), reference[c]) for c in ("unet", "text_encoder")}
                    (changed_first if r == 0 else changed_last)[lib] = counts
            print(f"  round {r + 1}: {LL} {fuse[LL][-1]:.3f} + {unfuse[LL][-1]:.3f} s | {DP} {fuse['other'][-1]:.3f} + {unfuse['other'][-1]:.3f} s", flush=True)
        total = {lib: [a + b for a, b in zip(fuse[lib], unfuse[lib])] for lib in fuse}
        rep = self.report
        rep.add(Row("fuse", "fuse_lora", "s", fuse[LL], fuse["other"], DP))
        rep.add(Row("fuse", "unfuse_lora", "s", unfuse[LL], unfuse["other"], DP))
        rep.add(Row(
            "fuse", f"floor: a fresh copy of the {len(targeted)} targeted weights ({targeted_mib:.0f} MiB) that a bit-exact unfuse must keep",
            "s", None, floor, "fresh copy", kind="plain",
            verdict=f"diffusers+peft's fuse+unfuse is {med(total['other']) / med(floor):.1f}x this floor; lora_loader's is {med(total[LL]) / med(floor):.1f}x",
        ))
        speed = med(total["other"]) / med(total[LL])
        exact = changed_first[LL]["unet"] == 0 and changed_first[LL]["text_encoder"] == 0
        rep.add(Row(
            "fuse", "fuse_lora + unfuse_lora", "s", total[LL], total["other"], DP,
            target=">= 5x faster, and bit-exact", met=speed >= 5 and exact,
            verdict=verdict(speed >= 5, faster_text(speed)),
        ))
        if speed < 5:
            rep.notes.append(
                f"Why fuse_lora + unfuse_lora misses 5x: a bit-exact unfuse needs the original values of every targeted "
                f"weight ({targeted_mib:.0f} MiB here), so each fuse writes that many bytes of freshly allocated memory. "
                f"On this machine that alone (the 'floor' row, measured in the same rounds) takes {fmt_value(med(floor), 's')}, "
                f"{med(total['other']) / med(floor) * 100:.0f}% of diffusers+peft's whole fuse+unfuse; 5x faster than diffusers+peft "
                f"would be {fmt_value(med(total['other']) / 5, 's')}, below the floor. lora_loader's fuse is the floor plus one addmm per "
                f"layer; its unfuse is a pointer swap ({fmt_value(med(unfuse[LL]), 's')}). diffusers+peft avoids the fresh memory by "
                f"subtracting a recomputed delta, which is why it is not bit-exact (the 'not bit-equal' rows)."
            )
            prof = profile(lambda: (self.ll.fuse_lora(), self.ll.unfuse_lora()))
            rep.rows[-1].profile = ["one fuse_lora() + unfuse_lora() of adapter A:"] + profile_lines(prof)
        n_unet = len(reference["unet"])
        n_te = len(reference["text_encoder"])
        rep.add(Row(
            "fuse", f"UNet weights not bit-equal to the base after 1 cycle (of {n_unet})", "count",
            [changed_first[LL]["unet"]], [changed_first["other"]["unet"]], DP, kind="plain",
            target="0 (bit-exact)", met=changed_first[LL]["unet"] == 0,
            verdict=verdict(changed_first[LL]["unet"] == 0, f"{changed_first[LL]['unet']} changed"),
        ))
        rep.add(Row("fuse", f"text-encoder weights not bit-equal after 1 cycle (of {n_te})", "count",
                    [changed_first[LL]["text_encoder"]], [changed_first["other"]["text_encoder"]], DP, kind="plain",
                    target="0 (bit-exact)", met=changed_first[LL]["text_encoder"] == 0,
                    verdict=verdict(changed_first[LL]["text_encoder"] == 0, f"{changed_first[LL]['text_encoder']} changed")))
        if self.repeats > 1:
            rep.add(Row("fuse", f"UNet weights not bit-equal after {self.repeats} cycles", "count",
                        [changed_last[LL]["unet"]], [changed_last["other"]["unet"]], DP, kind="plain"))

    def close(self) -> None:
        for lib in list(self.pipes):
            with contextlib.suppress(Exception):
                self.pipes[lib].unload_lora_weights()
        self.pipes.clear()
        self.ll = self.dp = self.base_unet = self.base_te = None
        gc.collect()
        trim()


# -- peak RSS (in a child process per measurement) -------------------------------------------------------


def trim() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def proc_status(field_name: str) -> int:
    """A /proc/self/status field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field_name)


def rss_child(lib: str, size_name: str, path: str, warm_path: str) -> None:
    """Build the pipeline, warm the code paths with a small adapter, then measure one load: prints JSON."""
    torch.set_num_threads(1)
    quiet_libraries()
    size = FULL if size_name == "full" else QUICK
    pipe = make_pipeline(build_unet(size, 0, fill=False), build_text_encoder(size, 1, fill=False))
    if lib == LL:
        import lora_loader

        lora_loader.attach(pipe)
    pipe.load_lora_weights(warm_path, adapter_name="warm")  # imports and first-call caches, not measured
    pipe.unload_lora_weights()
    gc.collect()
    trim()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = proc_status("VmRSS")
    pipe.load_lora_weights(path, adapter_name="x")
    peak = proc_status("VmHWM")
    after = proc_status("VmRSS")
    print("RSS-JSON " + json.dumps({"before": before, "peak": peak, "after": after}), flush=True)


def fig_rss(size: Size, args, report: Report, workdir: Path) -> None:
    repeats = min(args.repeats, size.rss_repeats) if args.repeats else size.rss_repeats
    print(f"\n== rss: peak RSS increase while loading one Kohya file, a fresh process per measurement, {repeats} round(s)", flush=True)
    from transformers import CLIPTextConfig  # noqa: F401  (fail early if missing)

    # The files are written against freshly built shapes (values do not matter here).
    unet, te = build_unet(size, 0, fill=False), build_text_encoder(size, 1, fill=False)
    targets = kohya_targets(unet, te)
    path = str(workdir / "rss_kohya.safetensors")
    warm = str(workdir / "rss_warm.safetensors")
    write_kohya(path, targets, size.kohya_rank, size.kohya_alpha, seed=5)
    write_kohya(warm, targets[:4], 2, 2.0, seed=6)
    del unet, te, targets
    gc.collect()
    trim()
    read_safetensors(path)
    file_mib = os.path.getsize(path) / 2**20
    peak, kept = {LL: [], "other": []}, {LL: [], "other": []}
    for r, order in rounds(repeats):
        for lib in order:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", lib, "--rss-size", size.name, "--rss-file", path, "--rss-warm", warm]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = next((l for l in out.stdout.splitlines() if l.startswith("RSS-JSON ")), None)
            if line is None:
                raise RuntimeError(f"RSS child for {lib} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
            m = json.loads(line[len("RSS-JSON "):])
            peak[lib].append((m["peak"] - m["before"]) / 2**20)
            kept[lib].append((m["after"] - m["before"]) / 2**20)
            print(f"  round {r + 1} {lib if lib == LL else DP}: peak +{peak[lib][-1]:.1f} MiB, kept +{kept[lib][-1]:.1f} MiB", flush=True)
    ll = med(peak[LL])
    ok = ll <= 1.3 * file_mib
    report.add(Row(
        "rss", f"peak RSS increase loading one {file_mib:.1f} MiB (fp16) file into the fp32 pipeline", "MiB", peak[LL], peak["other"], DP,
        kind="plain", target=f"<= 1.3x the file ({1.3 * file_mib:.1f} MiB)", met=ok,
        verdict=verdict(ok, f"{ll / file_mib:.2f}x the file" + ("" if ok else f" ({ll - 1.3 * file_mib:.1f} MiB over)")),
    ))
    report.add(Row("rss", "RSS kept after the load (the adapter's resident cost)", "MiB", kept[LL], kept["other"], DP, kind="plain"))
    transient = med(peak[LL]) - med(kept[LL])
    report.rows[-2].profile = [
        f"file {file_mib:.1f} MiB of fp16 factors; the pipeline is fp32, so the factors stored in the model's dtype take {2 * file_mib:.1f} MiB (2.00x the file):",
        f"kept after the load: {med(kept[LL]):.1f} MiB ({med(kept[LL]) / file_mib:.2f}x the file)",
        f"transient on top of that at the peak: {transient:.1f} MiB ({transient / file_mib:.2f}x the file: the file's tensors, read whole before conversion)",
    ]


# -- the LM figures ------------------------------------------------------------------------------------


def fig_lm(size: Size, args, report: Report, workdir: Path) -> None:
    import lora_loader

    repeats = args.repeats or size.repeats
    t0 = time.perf_counter()
    print(f"\n== lm: Llama ({size.name}), PEFT adapter rank {size.lm_rank} on all linear layers; building 3 copies ...", flush=True)
    base = build_llama(size, 3)
    n_params = sum(p.numel() for p in base.parameters())
    folders = [str(workdir / f"peft_llama_{name}") for name in ("x", "y")]
    write_peft_adapters(base, folders, size.lm_rank, seed=40)
    assert no_lora_left(base)
    ll = lora_loader.attach(copy.deepcopy(base))
    tp = copy.deepcopy(base)
    models = {LL: ll, "other": tp}
    adapter_file = os.path.join(folders[0], "adapter_model.safetensors")
    file_mib = os.path.getsize(adapter_file) / 2**20
    for folder in folders:
        read_safetensors(os.path.join(folder, "adapter_model.safetensors"))
    print(f"  built in {time.perf_counter() - t0:.1f} s: {n_params / 1e9:.2f} B params; adapter file {file_mib:.1f} MiB (fp32)", flush=True)
    what = f"{n_params / 1e9:.2f} B Llama"

    reports = {}

    def load(lib, folder, name):
        dt, reports[lib] = timed(lambda: models[lib].load_adapter(folder, adapter_name=name))
        return dt

    def unload(lib):
        if lib == LL:
            ll.unload_lora_weights()
        else:
            remove_peft(tp)
        gc.collect()
        assert no_lora_left(models[lib])

    # load_adapter
    times, reads = {LL: [], "other": []}, []
    cold = {lib: load(lib, folders[0], "x") for lib in (LL, "other")}  # untimed warm-up round
    counts = {LL: sum(reports[LL].modules.values()), "other": peft_layer_counts(tp, "x", ("model",)).get("model", 0)}
    line = f"LM adapter modules injected: {LL} {counts[LL]}, {TP} {counts['other']}"
    report.checks.append(line)
    print("  " + line, flush=True)
    for lib in (LL, "other"):
        unload(lib)
    for r, order in rounds(repeats):
        reads.append(timed(lambda: read_safetensors(adapter_file))[0])
        for lib in order:
            times[lib].append(load(lib, folders[0], "x"))
        for lib in order:
            unload(lib)
        print(f"  round {r + 1}: {LL} {times[LL][-1]:.3f} s | {TP} {times['other'][-1]:.3f} s | read {reads[-1]:.3f} s", flush=True)
    report.add(Row("lm", f"reference: safetensors read of the adapter file ({file_mib:.1f} MiB, warm)", "s", None, reads, "safetensors", kind="plain"))
    l1, o1, st = med(times[LL]), med(times["other"]), med(reads)
    ok_read, ok_speed = l1 <= 2 * st, o1 / l1 >= 5
    report.add(Row(
        "lm", f"load_adapter, {what}", "s", times[LL], times["other"], TP,
        target="<= 2x the safetensors read, and >= 5x faster than transformers+peft", met=ok_read and ok_speed,
        verdict="; ".join([
            verdict(ok_read, f"{l1 / st:.2f}x the read" + ("" if ok_read else f" (target 2x: {l1 / (2 * st):.2f}x over)")),
            verdict(ok_speed, faster_text(o1 / l1)),
        ]),
    ))
    if not (ok_read and ok_speed):
        prof = profile(lambda: ll.load_adapter(folders[0], adapter_name="x"))
        unload(LL)
        report.rows[-1].profile = ["one load_adapter of the PEFT folder:"] + profile_lines(prof)
    report.add(Row("lm", "the very first load_adapter in the process (warm-up, not in the medians)", "s", [cold[LL]], [cold["other"]], TP))

    # switch: set_adapter between two loaded adapters, disable / enable
    for lib in (LL, "other"):
        load(lib, folders[0], "x")
        load(lib, folders[1], "y")
    samples = {lib: {"set_adapter": [], "disable_adapters": [], "enable_adapters": []} for lib in (LL, "other")}
    for lib in (LL, "other"):  # untimed warm-up calls
        for name in ("x", "y"):
            models[lib].set_adapter(name)
            models[lib].disable_adapters()
            models[lib].enable_adapters()
    for r, order in rounds(repeats):
        for lib in order:
            model = models[lib]
            for i in range(10):
                name = "x" if i % 2 else "y"
                times = time_each({"set_adapter": lambda: model.set_adapter(name),
                                   "disable_adapters": model.disable_adapters, "enable_adapters": model.enable_adapters})
                for what, dt in times.items():
                    samples[lib][what].append(dt)
    lm_profiles = {
        "set_adapter": profile(lambda: ll.set_adapter("x"), calls=10),
        "disable_adapters": profile(lambda: ll.disable_adapters(), calls=10),
        "enable_adapters": profile(lambda: ll.enable_adapters(), calls=10),
    }
    for call in ("set_adapter", "disable_adapters", "enable_adapters"):
        m = med(samples[LL][call])
        report.add(Row("lm", f"{call} (2 loaded)", "ms", samples[LL][call], samples["other"][call], TP,
                       target="<= 1 ms", met=m <= 1e-3, verdict=verdict(m <= 1e-3, f"{m * 1e3:.3g} ms" + ("" if m <= 1e-3 else f" ({m / 1e-3:.1f}x the target)")),
                       profile=[f"per call of {call}:"] + profile_lines(lm_profiles[call])))

    # forward with 1 and 2 adapters
    ids = torch.randint(0, size.llama["vocab_size"], (1, size.lm_tokens), generator=torch.Generator().manual_seed(9))
    runners = {"base": base, LL: ll, "other": tp}

    def forward(which):
        with torch.no_grad():
            return runners[which](input_ids=ids).logits

    for k, active in ((1, "x"), (2, ["x", "y"])):
        for model in models.values():
            model.set_adapter(active)
        outs = {w: forward(w) for w in ("base", LL, "other")}
        diff = (outs[LL] - outs["other"]).abs().max().item()
        moved = (outs[LL] - outs["base"]).abs().max().item()
        line = f"LM logits with {k} adapter(s): max |{LL} - {TP}| = {diff:.2e} (the LoRA moves them by {moved:.2e})"
        report.checks.append(line)
        print("  " + line, flush=True)
        fw = {"base": [], LL: [], "other": []}
        overhead = {LL: [], "other": []}
        perms = [("base", LL, "other"), ("other", "base", LL), (LL, "other", "base")]
        for r in range(repeats):
            for which in perms[r % 3]:
                fw[which].append(timed(lambda: forward(which))[0])
            for lib in (LL, "other"):
                overhead[lib].append((fw[lib][-1] / fw["base"][-1] - 1) * 100)
            print(f"  round {r + 1}: base {fw['base'][-1]:.3f} s, {LL} {fw[LL][-1]:.3f} s, {TP} {fw['other'][-1]:.3f} s", flush=True)
        if k == 1:
            report.add(Row("lm", f"reference: LM forward 1x{size.lm_tokens} tokens, base model", "s", None, fw["base"], "base model", kind="plain"))
        report.add(Row("lm", f"LM forward, {k} adapter(s) unfused", "s", fw[LL], fw["other"], TP))
        row = Row("lm", f"LM forward overhead over base, {k} adapter(s)", "%", overhead[LL], overhead["other"], TP, kind="plain")
        if k == 2:
            o = med(overhead[LL])
            row.target, row.met = "two adapters <= +15%", o <= 15
            row.verdict = verdict(o <= 15, f"{o:+.1f}%" + ("" if o <= 15 else f" ({o - 15:.1f} points over)"))
        report.add(row)
    models.clear()
    del ll, tp, base, runners
    gc.collect()
    trim()


# -- the machine and the report ------------------------------------------------------------------------


def machine() -> dict:
    import diffusers
    import peft
    import safetensors
    import transformers

    cpu = "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    mem = "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    commit = "unknown"
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "lora_loader"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        if dirty:
            commit += " (lora_loader/ has uncommitted changes)"
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "memory": mem,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "lora_loader commit": commit,
        "torch threads": torch.get_num_threads(),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def markdown(report: Report, info: dict, size: Size, args, elapsed: float) -> str:
    lines = [
        "# Benchmarks: lora_loader vs diffusers+peft / transformers+peft",
        "",
        f"Written by `{' '.join(['python', 'benchmarks/run.py'] + args.argv)}` "
        f"({size.name} sizes, {args.repeats or size.repeats} rounds, {elapsed / 60:.1f} min). "
        "Both libraries run in the same process, in alternating rounds (the order flips every round); "
        "each cell is the median [min – max] over the rounds. Ratio: how many times faster lora_loader is than the other library (medians). "
        "See `benchmarks/README.md` for what each figure measures.",
        "",
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    lines += [
        "",
        "## Results (CPU, fp32)",
        "",
        f"| figure | what | {LL} | other library | other | ratio | target | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report.rows:
        lines.append(
            f"| {row.figure} | {row.what} | {fmt_stats(row.ll, row.unit) if row.ll else '-'} | {row.other_name or '-'} | "
            f"{fmt_stats(row.other, row.unit) if row.other else '-'} | {ratio_text(row)} | {row.target or ''} | {row.verdict or ''} |"
        )
    missed = [row for row in report.rows if row.met is False]
    lines += ["", "## Targets", ""]
    if not missed:
        lines.append("Every target measured in this run is met.")
    else:
        lines.append("Missed in this run (by how much is in the verdict column):")
        lines.append("")
        for row in missed:
            lines.append(f"- **{row.figure}: {row.what}**: target {row.target}; {row.verdict}.")
        profiled = [row for row in missed if row.profile]
        if profiled:
            lines += ["", "### Where lora_loader's time goes (cProfile, taken after the timed rounds)", "",
                      "Profiler overhead inflates these numbers; read them for proportions. `cumulative`: the function and "
                      "what it calls; `own`: time inside that function itself.", ""]
            for row in profiled:
                lines += [f"**{row.figure}: {row.what}**", "", "```"] + row.profile + ["```", ""]
    if report.checks:
        lines += ["", "## Sanity checks (same work on both sides)", ""]
        lines += [f"- {c}" for c in report.checks]
    if report.notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {n}" for n in report.notes]
    lines += ["", f"Load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}.", ""]
    return "\n".join(lines)


def print_table(report: Report) -> None:
    print("\n" + "=" * 100)
    for row in report.rows:
        print(format_row_text(row))
        if row.target:
            print(f"    target: {row.target}")
    print("=" * 100)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller models and 2 rounds: a smoke run (~3 min)")
    p.add_argument("--repeats", type=int, default=None, help="rounds per figure (default 5, --quick 2)")
    p.add_argument("--only", default=None, help=f"comma-separated figures to run, from {','.join(FIGURES)}")
    p.add_argument("--out", default=None, help="where to write the markdown (default benchmarks/RESULTS.md for a full run of every figure; "
                   "partial runs (--quick, --only) write only when --out is given)")
    p.add_argument("--workdir", default=None, help="where to write the LoRA files (default: a temporary folder, removed at the end)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest and least noisy on a shared 2-core box)")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rss-size", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rss-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rss-warm", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(argv)
    args.figures = FIGURES if args.only is None else tuple(f.strip() for f in args.only.split(",") if f.strip())
    unknown = set(args.figures) - set(FIGURES)
    if unknown:
        p.error(f"--only: unknown figure(s) {sorted(unknown)}; choose from {','.join(FIGURES)}")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child, args.rss_size, args.rss_file, args.rss_warm)
        return 0
    torch.set_num_threads(args.threads)
    quiet_libraries()
    size = QUICK if args.quick else FULL
    started = time.perf_counter()
    info = machine()
    print("machine: " + ", ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    report = Report()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lora-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        sd_figures = [f for f in ("load", "switch", "forward", "fuse") if f in args.figures]
        if sd_figures:
            sd = SDBench(size, args, report, workdir)
            for figure in sd_figures:
                t_fig = time.perf_counter()
                getattr(sd, f"fig_{figure}")()
                print(f"  ({figure}: {time.perf_counter() - t_fig:.0f} s)", flush=True)
            report.notes.append(
                f"SD 1.5: UNet {sd.n_unet / 1e6:.0f} M and text encoder {sd.n_te / 1e6:.0f} M parameters, fp32, seeded random weights. "
                f"Kohya file: {sd.n_targets['unet']} UNet modules (attn1/attn2 to_q/k/v/out.0, proj_in/proj_out, ff.net.0.proj, ff.net.2) "
                f"and {sd.n_targets['text_encoder']} text-encoder modules (q/k/v/out_proj, fc1, fc2), rank {size.kohya_rank}, alpha {size.kohya_alpha:g}, fp16."
            )
            if "switch" in sd_figures:
                report.notes.append(
                    f"switch: the {size.n_small} adapters of that figure are small (rank {size.small_rank}) Kohya files on the same "
                    f"{sum(sd.n_targets.values())} modules as the big one, so every layer carries {size.n_small} adapters; "
                    "each call is timed on its own (10 per round), the active set being one adapter."
                )
            if "forward" in sd_figures:
                report.notes.append(
                    f"forward: UNet only, batch 1, 1x4x{size.latent}x{size.latent} latents ({size.latent * 8}x{size.latent * 8} px), "
                    "77 text tokens, torch.no_grad(); one untimed warm-up forward per state; the base model is a separate copy with no LoRA code in it; "
                    "overhead is computed per round against the base forward timed in the same round."
                )
            sd.close()
            del sd
            gc.collect()
            trim()
        if "rss" in args.figures:
            fig_rss(size, args, report, workdir)
        if "lm" in args.figures:
            fig_lm(size, args, report, workdir)
            report.notes.append(
                f"lm: {TP} is transformers' own `load_adapter` / `set_adapter` (PeftAdapterMixin, backed by peft); between load rounds its "
                "PEFT layers are removed with diffusers' `recurse_remove_peft_layers` (transformers has no unload), lora_loader's with "
                f"`unload_lora_weights`. Forward: 1x{size.lm_tokens} tokens, no KV cache, torch.no_grad()."
            )
        report.notes.append(
            "Load rounds start from a model with no LoRA in it: each library's `unload_lora_weights` (checked: no LoRA layer left) "
            "instead of a new model per round, because building a fresh 1 B-parameter model costs ~20 s of page faults on this VM."
        )
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.perf_counter() - started
    print_table(report)
    out = args.out
    if out is None and not args.quick and args.only is None:
        out = str(HERE / "RESULTS.md")
    if out:
        text = markdown(report, info, size, args, elapsed)
        kept = _many_adapters_section(Path(out))
        Path(out).write_text(text + ("\n" + kept if kept else ""))
        print(f"wrote {out}" + (" (kept its 50-adapter section from many_adapters.py)" if kept else ""))
    print(f"total {elapsed / 60:.1f} min")
    return 0


def _many_adapters_section(path: Path) -> str:
    """The section ``many_adapters.py`` wrote into ``path`` (between its markers), to keep on a rewrite."""
    start, end = "<!-- many_adapters:start -->", "<!-- many_adapters:end -->"
    old = path.read_text() if path.exists() else ""
    if start not in old or end not in old:
        return ""
    return start + old.split(start, 1)[1].split(end, 1)[0] + end + "\n"


if __name__ == "__main__":
    sys.exit(main())
