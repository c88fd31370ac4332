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

# This file is the entry point (arguments, the order of the figures, RESULTS.md). Shared with
# many_adapters.py: harness.py (environment, rounds, timing, profiles, the machine), report.py (rows,
# formatting, the markdown) and workloads.py (models, LoRA files). One module per figure:
# bench_load.py, bench_switch.py, bench_forward.py and bench_fuse.py (all on sd_setup.py's
# pipelines), bench_rss.py (with its child process) and bench_lm.py.

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

from harness import HERE, TP, machine, quiet_libraries, trim  # first: sets up the path and environment

import torch  # noqa: E402

from bench_forward import fig_forward  # noqa: E402
from bench_fuse import fig_fuse  # noqa: E402
from bench_lm import fig_lm  # noqa: E402
from bench_load import fig_load  # noqa: E402
from bench_rss import fig_rss, rss_child  # noqa: E402
from bench_switch import fig_switch  # noqa: E402
from report import Report, kept_sections, markdown, print_table  # noqa: E402
from sd_setup import SDBench  # noqa: E402
from workloads import FULL, QUICK, Size  # noqa: E402

FIGURES = ("load", "switch", "forward", "fuse", "rss", "lm")
SD_FIGURES = {"load": fig_load, "switch": fig_switch, "forward": fig_forward, "fuse": fig_fuse}


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
        run_sd_figures(size, args, report, workdir)
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
        kept = kept_sections(Path(out))
        Path(out).write_text(text + ("\n" + kept if kept else ""))
        print(f"wrote {out}" + (" (kept the sections many_adapters.py and bench_dit.py wrote)" if kept else ""))
    print(f"total {elapsed / 60:.1f} min")
    return 0


def run_sd_figures(size: Size, args, report: Report, workdir: Path) -> None:
    """The load, switch, forward and fuse figures asked for, in that order, on one `SDBench`; then its notes."""
    sd_figures = [f for f in ("load", "switch", "forward", "fuse") if f in args.figures]
    if not sd_figures:
        return
    sd = SDBench(size, args, report, workdir)
    for figure in sd_figures:
        t_fig = time.perf_counter()
        SD_FIGURES[figure](sd)
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


if __name__ == "__main__":
    sys.exit(main())
