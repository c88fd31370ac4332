#!/usr/bin/env python3
"""DiTs at real widths: lora_loader against diffusers+peft on Flux.1-dev- and Wan 2.1 14B-sized blocks.

One command builds diffusers' ``FluxTransformer2DModel`` at FLUX.1-dev's widths (3072 = 24 heads x 128,
MLP 4x, T5 width 4096, pooled 768, 64 input channels) and ``WanTransformer3DModel`` at Wan 2.1 14B's
(5120 = 40 heads x 128, FFN 13824, text width 4096, 16 input channels) with fewer blocks, seeded random
weights, nothing downloaded; writes the files trainers write for them (see dit_workloads.py: ai-toolkit
rank 16 and 32 on every block linear, sd-scripts' Kohya Flux file in BFL names, a LyCORIS LoKr file); and
times both libraries in one process, in alternating rounds, with ``torch.set_num_threads(1)``.

    python benchmarks/bench_dit.py            # full run (~35 min on a shared 2-core CPU); writes the
                                              # "DiT at real widths" section of benchmarks/RESULTS.md
    python benchmarks/bench_dit.py --quick    # 512-wide models, 1 round (< 3 min): a smoke run; prints only
    python benchmarks/bench_dit.py --flux-blocks 2,4 --wan-blocks 3 --out /tmp/dit.md

Per family and file: ``load_lora_weights`` into a model without LoRA (1st load) and of a second adapter
while the first is loaded (2nd load), against the plain safetensors read of the file; ``set_adapters``
between the two; ``fuse_lora`` and ``unfuse_lora`` of one (and whether unfuse gives the weights back bit
for bit); the forward overhead of one block of each kind with one and two adapters (fp32 on CPU: bf16
matmuls are 2-9x slower than fp32 on this CPU); the peak RSS a load adds (a fresh process per library).
Every figure of the reduced model is also scaled to the full model, in its own column: the blocks hold
every targeted layer, so the work grows with the block count (an upper bound where part of a call is a
fixed cost); the forward overhead is per block and the same at any depth.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import DP, LL, machine, proc_status, profile, profile_lines, quiet_libraries, read_safetensors, trim  # noqa: E402  (first: path, environment)

import torch  # noqa: E402

from dit_workloads import (  # noqa: E402
    DitSize, block_inputs, build, changed, fingerprints, flux_size, forward_blocks, layout_text, pipeline, wan_size, write_file,
)  # fmt: skip
from report import Row, fmt_stats, fmt_value, med, ratio_text, write_section  # noqa: E402

START, END = "<!-- dit:start -->", "<!-- dit:end -->"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Settings:
    repeats: int  # rounds of load / switch / fuse (the library order flips every round)
    switch_calls: int  # timed set_adapters calls per library and round
    forward_repeats: int
    rss: bool
    device: str
    dtype: torch.dtype  # the models' storage dtype
    forward_dtype: torch.dtype  # the forward figure's (fp32 on CPU)


@dataclass
class DitRow(Row):
    model: str = ""
    scale: float | None = None  # multiply the medians by this for the full model; None: no extrapolation
    scale_text: str = ""  # what to show in the extrapolation column when it is not a product


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_call(fn, device: str) -> float:
    gc.collect()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def lora_layer_count(model) -> dict[str, int]:
    """Layers each library put LoRA into (lora_loader's LoraLayer, peft's BaseTunerLayer)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from lora_loader.layers import LoraLayer

    return {LL: sum(isinstance(m, LoraLayer) for m in model.modules()), DP: sum(isinstance(m, BaseTunerLayer) for m in model.modules())}


class FamilyBench:
    """One family's reduced transformer, a lora_loader pipeline and a diffusers+peft one around identical copies, the files."""

    def __init__(self, size: DitSize, st: Settings, workdir: Path, quick: bool = False):
        self.size, self.st, self.workdir = size, st, workdir
        self.rows: list[DitRow] = []
        self.checks: list[str] = []
        self.notes: list[str] = []
        self.profiles: dict[str, list[str]] = {}
        t0 = time.perf_counter()
        print(f"\n## {size.label}: building 2 x {size.blocks_text()} ({str(st.dtype).split('.')[-1]}) ...", flush=True)
        import lora_loader

        ll_model = build(size, 0, st.dtype)
        self.n_params = sum(p.numel() for p in ll_model.parameters())
        self.reference = fingerprints(ll_model)  # before anything touches it
        dp_model = build(size, 0, st.dtype)
        assert fingerprints(dp_model) == self.reference, "the two copies differ"
        self.pipes = {LL: lora_loader.attach(pipeline(size, ll_model.to(st.device))), DP: pipeline(size, dp_model.to(st.device))}
        print(f"  built in {time.perf_counter() - t0:.0f} s: {self.n_params / 1e9:.2f} B parameters each", flush=True)
        # The files: two of each (A and B: different seeds) per layout and rank.
        t0 = time.perf_counter()
        self.entries = []  # (layout, rank)
        for layout in size.layouts:
            for rank in (size.ranks if layout == "aitk" and not quick else (16,) if layout != "aitk" else (32,)):
                self.entries.append((layout, rank))
        self.files, self.info = {}, {}
        for k, (layout, rank) in enumerate(self.entries):
            for j, tag in enumerate("AB"):
                path = str(workdir / f"{size.family}_{layout}_r{rank}_{tag}.safetensors")
                self.info[(layout, rank)] = write_file(size, ll_model, layout, path, rank, seed=100 + 10 * k + j)
                self.files[(layout, rank, tag)] = path
                read_safetensors(path)  # warm the page cache for every reader
        desc = ", ".join(f"{layout} r{rank}: {self.info[(layout, rank)]['modules']} modules, "
                         f"{os.path.getsize(self.files[(layout, rank, 'A')]) / 2**20:.1f} MiB" for layout, rank in self.entries)
        print(f"  wrote {2 * len(self.entries)} files in {time.perf_counter() - t0:.0f} s ({desc})", flush=True)
        self.main = ("aitk", 32) if ("aitk", 32) in self.entries else self.entries[0]  # switch and fuse run on this one
        self.refused: dict[tuple, str] = {}  # (layout, rank) -> diffusers+peft's error

    def add(self, row: DitRow) -> None:
        row.model = self.size.label
        self.rows.append(row)
        print("  " + text_row(row), flush=True)

    # -- one library, one file: load A, load B, (switch, fuse), unload ------------------------------------
    def cycle(self, lib: str, entry: tuple, out: dict, first_round: bool) -> None:
        pipe, dev = self.pipes[lib], self.st.device
        a, b = self.files[(*entry, "A")], self.files[(*entry, "B")]
        if lib == DP and entry in self.refused:
            return
        try:
            out["load1"][lib].append(timed_call(lambda: pipe.load_lora_weights(a, adapter_name="a"), dev))
        except Exception as e:  # diffusers+peft has no reader for this layout: say so in the table
            if lib != DP:
                raise
            self.refused[entry] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
            print(f"  {DP} cannot load {entry}: {self.refused[entry]}", flush=True)
            try:
                pipe.unload_lora_weights()
            except Exception:  # nothing was loaded
                pass
            return
        if first_round and lora_layer_count(pipe.transformer)[lib] == 0:  # read, but nothing applied
            if lib != DP:
                raise RuntimeError(f"{LL} put LoRA into no layer from {a}")
            self.refused[entry] = "loads nothing: no layer gets LoRA, only a warning ('No LoRA keys associated to ...')"
            print(f"  {DP}: {entry} {self.refused[entry]}", flush=True)
            out["load1"][lib].pop()
            pipe.unload_lora_weights()
            return
        out["load2"][lib].append(timed_call(lambda: pipe.load_lora_weights(b, adapter_name="b"), dev))
        if first_round:
            counts = lora_layer_count(pipe.transformer)
            out.setdefault("layers", {})[lib] = counts[lib]
        if entry == self.main:
            for i in range(self.st.switch_calls + 2):  # two untimed warm-up calls
                name = "a" if i % 2 == 0 else "b"
                dt = timed_call(lambda: pipe.set_adapters([name], [1.0]), dev)
                if i >= 2:
                    out["switch"][lib].append(dt)
            pipe.set_adapters(["a"], [1.0])
            if dev.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() if dev.startswith("cuda") else 0
            out["fuse"][lib].append(timed_call(lambda: pipe.fuse_lora(), dev))
            out["unfuse"][lib].append(timed_call(lambda: pipe.unfuse_lora(), dev))
            if dev.startswith("cuda"):
                out["fuse_peak"][lib].append((torch.cuda.max_memory_allocated() - before) / 2**20)
            if first_round or lib == LL:
                out["changed"][lib].append(changed(pipe.transformer, self.reference))
        pipe.unload_lora_weights()
        gc.collect()

    def run(self) -> None:
        size, st = self.size, self.st
        # Warm-up: imports and first-call caches of both libraries (tiny work: the rank-16 ai-toolkit file once).
        first = self.entries[0]
        if st.device.startswith("cuda"):  # the first matmul creates the cuBLAS handle: not inside round 1's fuse
            w = torch.ones(64, 64, device=st.device, dtype=st.dtype)
            torch.addmm(w.float(), w.float(), w.float()) @ w.float()
            sync(st.device)
        for lib in (LL, DP):
            self.pipes[lib].load_lora_weights(self.files[(*first, "A")], adapter_name="warm")
            self.pipes[lib].unload_lora_weights()
        results = {e: {k: {LL: [], DP: []} for k in ("load1", "load2", "switch", "fuse", "unfuse", "changed", "fuse_peak")} for e in self.entries}
        reads = {e: [] for e in self.entries}
        for r in range(st.repeats):
            order = (LL, DP) if r % 2 == 0 else (DP, LL)
            t0 = time.perf_counter()
            for entry in self.entries:
                reads[entry].append(timed_call(lambda: read_safetensors(self.files[(*entry, "A")]), "cpu"))
                for lib in order:
                    self.cycle(lib, entry, results[entry], first_round=r == 0)
            m = results[self.main]
            print(f"  round {r + 1}/{st.repeats} ({time.perf_counter() - t0:.0f} s): {self.main} 1st load {LL} {m['load1'][LL][-1] * 1e3:.0f} ms, "
                  f"{DP} {m['load1'][DP][-1] * 1e3:.0f} ms; fuse {LL} {m['fuse'][LL][-1]:.2f} s, {DP} {m['fuse'][DP][-1]:.2f} s", flush=True)
        self.report(results, reads)
        # Where lora_loader's time goes in the biggest load and in the fuse (after the timed rounds).
        ll = self.pipes[LL]
        a = self.files[(*self.main, "A")]
        self.profiles[f"load_lora_weights of {layout_text(size, *self.main)}"] = profile_lines(
            profile(lambda: (ll.load_lora_weights(a, adapter_name="p"), ll.unload_lora_weights())))
        ll.load_lora_weights(a, adapter_name="p")
        self.profiles["fuse_lora + unfuse_lora of that adapter"] = profile_lines(profile(lambda: (ll.fuse_lora(), ll.unfuse_lora())))
        ll.unload_lora_weights()

    def report(self, results: dict, reads: dict) -> None:
        size, scale = self.size, self.size.scale
        for entry in self.entries:
            res, what = results[entry], layout_text(size, *entry)
            mib = os.path.getsize(self.files[(*entry, "A")]) / 2**20
            refused = self.refused.get(entry)
            dp_name = DP if not refused else f"{DP}: cannot load ({refused})"
            self.add(DitRow("load", f"reference: safetensors read, {what}, {mib:.1f} MiB", "ms", None, reads[entry], "safetensors", kind="plain", scale=scale))
            self.add(DitRow("load", f"1st load_lora_weights, {what}", "ms", res["load1"][LL], res["load1"][DP] or None, dp_name, scale=scale,
                            verdict=f"{med(res['load1'][LL]) / med(reads[entry]):.2f}x the read"))
            self.add(DitRow("load", f"2nd load (a second adapter, the first loaded), {what}", "ms", res["load2"][LL], res["load2"][DP] or None,
                            dp_name, scale=scale))
            layers = res.get("layers", {})
            if layers:
                self.checks.append(f"{size.label}, {what}: layers with LoRA after two loads: {LL} {layers.get(LL)}, "
                                   f"{DP} {layers.get(DP, 'none (cannot load)')}")
        m = results[self.main]
        what = layout_text(size, *self.main)
        self.add(DitRow("switch", f"set_adapters between the two, {what}", "ms", m["switch"][LL], m["switch"][DP], DP, scale=scale))
        self.add(DitRow("fuse", f"fuse_lora, {what}", "s", m["fuse"][LL], m["fuse"][DP], DP, scale=scale))
        self.add(DitRow("fuse", "unfuse_lora", "s", m["unfuse"][LL], m["unfuse"][DP], DP, scale=scale))
        total = {lib: [x + y for x, y in zip(m["fuse"][lib], m["unfuse"][lib])] for lib in (LL, DP)}
        self.add(DitRow("fuse", "fuse_lora + unfuse_lora", "s", total[LL], total[DP], DP, scale=scale))
        n_weights = len(self.reference)
        self.add(DitRow("fuse", f"weights not bit-equal to the base after fuse + unfuse (of {n_weights}; {LL}: every round, {DP}: 1st)",
                        "count", [max(m["changed"][LL])], [max(m["changed"][DP])], DP, kind="plain", scale_text="-"))
        if m["fuse_peak"][LL]:
            self.add(DitRow("fuse", "peak accelerator memory added by fuse + unfuse", "MiB", m["fuse_peak"][LL], m["fuse_peak"][DP], DP,
                            kind="plain", scale=scale))

    # -- forward: one block of each kind, fp32 on CPU --------------------------------------------------------
    def forward_figure(self) -> None:
        """Build a base model and a lora_loader copy with only the first block of each kind filled (the only
        ones run); diffusers+peft's model shares the base's tensors (no fuse happens here). The files are this
        family's ai-toolkit A and B files of the main rank, written for the same module names."""
        import lora_loader

        size, st = self.size, self.st
        dev, dt = st.device, st.forward_dtype
        print(f"\n  forward ({str(dt).split('.')[-1]}, {size.img_tokens} image + {size.txt_tokens} text tokens): building ...", flush=True)
        base = build(size, 0, dt, blocks_only=True).to(dev)
        from diffusers import FluxTransformer2DModel, WanTransformer3DModel

        cls = FluxTransformer2DModel if size.family == "flux" else WanTransformer3DModel
        with torch.device("meta"):
            dp_model = cls(**size.config)
        dp_model.load_state_dict(base.state_dict(), assign=True)  # the same tensors as the base
        for name, buf in base.named_buffers():  # non-persistent buffers (the rotary tables) are not in the state dict
            owner, _, leaf = name.rpartition(".")
            dp_model.get_submodule(owner).register_buffer(leaf, buf, persistent=False)
        dp_model.eval()
        ll_model = build(size, 0, dt, blocks_only=True).to(dev)
        pipes = {LL: lora_loader.attach(pipeline(size, ll_model)), DP: pipeline(size, dp_model)}
        a, b = self.files[(*self.main, "A")], self.files[(*self.main, "B")]
        for lib, pipe in pipes.items():
            pipe.load_lora_weights(a, adapter_name="a")
            pipe.load_lora_weights(b, adapter_name="b")
        inputs = block_inputs(size, base, dt, dev)
        models = {"base": base, LL: ll_model, DP: dp_model}
        kinds = "one double + one single block" if size.family == "flux" else "one block"
        for label, names, weights in (("1 adapter", ["a"], [1.0]), ("2 adapters", ["a", "b"], [0.7, 0.5])):
            for pipe in pipes.values():
                pipe.set_adapters(names, weights)
            outs = {w: forward_blocks(size, models[w], inputs) for w in models}  # warm-up, and the outputs for the checks
            diff = (outs[LL] - outs[DP]).abs().max().item()
            moved = (outs[LL] - outs["base"]).abs().max().item()
            self.checks.append(f"{size.label}, {kinds}, {label}: max |{LL} - {DP}| = {diff:.2e} (the adapters move the output by {moved:.2e})")
            print("  " + self.checks[-1], flush=True)
            samples = {w: [] for w in models}
            perms = [("base", LL, DP), (DP, "base", LL), (LL, DP, "base")]
            for r in range(st.forward_repeats):
                for w in perms[r % 3]:
                    samples[w].append(timed_call(lambda: forward_blocks(size, models[w], inputs), dev))
            self.add(DitRow("forward", f"reference: {kinds}, base model (no LoRA)", "s", None, samples["base"], "base model", kind="plain",
                            scale_text="-"))
            self.add(DitRow("forward", f"{kinds}, {label} unfused ({layout_text(size, *self.main)})", "s", samples[LL], samples[DP], DP,
                            scale_text="-"))
            over = {lib: [x / y - 1 for x, y in zip(samples[lib], samples["base"])] for lib in (LL, DP)}
            self.add(DitRow("forward", f"overhead over base, {label} (per round)", "%", [100 * v for v in over[LL]],
                            [100 * v for v in over[DP]], DP, kind="plain", scale_text="the same (per block)"))
        del pipes, models, base, ll_model, dp_model
        gc.collect()
        trim()

    # -- peak RSS of one load, a fresh process per library ------------------------------------------------------
    def rss_figure(self, args) -> None:
        if not self.st.device == "cpu":
            return
        size = self.size
        entry = self.main
        path = self.files[(*entry, "A")]
        warm = str(self.workdir / f"{size.family}_warm.safetensors")
        write_file(size, self.pipes[LL].transformer, entry[0], warm, 2, seed=7, max_blocks=1)
        mib = os.path.getsize(path) / 2**20
        peak, kept, held = {LL: [], DP: []}, {LL: [], DP: []}, {LL: [], DP: []}
        blocks = ",".join(str(b) for b in size.blocks)
        for r in range(args.rss_repeats):
            for lib in ((LL, DP) if r % 2 == 0 else (DP, LL)):
                cmd = [sys.executable, str(HERE / "bench_dit.py"), "--rss-child", lib, "--rss-family", size.family, "--rss-blocks", blocks,
                       "--rss-file", path, "--rss-warm", warm] + (["--quick"] if args.quick else [])
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                line = next((x for x in out.stdout.splitlines() if x.startswith("RSS-JSON ")), None)
                if line is None:
                    raise RuntimeError(f"RSS child for {lib} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
                res = json.loads(line[len("RSS-JSON "):])
                peak[lib].append((res["peak"] - res["before"]) / 2**20)
                kept[lib].append((res["after"] - res["before"]) / 2**20)
                held[lib].append(res["held"] / 2**20)
                print(f"  rss {lib}: peak +{peak[lib][-1]:.1f} MiB, kept +{kept[lib][-1]:.1f} MiB", flush=True)
        what = layout_text(size, *entry)
        self.add(DitRow("rss", f"peak RSS increase of the 1st load, {what} ({mib:.1f} MiB file)", "MiB", peak[LL], peak[DP], DP,
                        kind="plain", scale=size.scale, verdict=f"{LL}: {med(peak[LL]) / mib:.2f}x the file; {DP}: {med(peak[DP]) / mib:.2f}x"))
        self.add(DitRow("rss", "RSS kept after the load", "MiB", kept[LL], kept[DP], DP, kind="plain", scale=size.scale))
        self.add(DitRow("rss", "bytes of the adapter's tensors after the load (RSS can be below it where the load reuses heap "
                        "memory freed earlier)", "MiB", held[LL], held[DP], DP, kind="plain", scale=size.scale))

    def close(self) -> None:
        self.pipes.clear()
        gc.collect()
        trim()


def rss_child(args) -> None:
    """Build the model (values do not matter: every weight made resident), warm the code paths with a small
    file, then measure one load: prints JSON."""
    torch.set_num_threads(1)
    quiet_libraries()
    blocks = tuple(int(x) for x in args.rss_blocks.split(","))
    size = flux_size(*blocks, quick=args.quick) if args.rss_family == "flux" else wan_size(*blocks, quick=args.quick)
    pipe = pipeline(size, build(size, 0, torch.bfloat16, fill=False))
    if args.rss_child == LL:
        import lora_loader

        lora_loader.attach(pipe)
    pipe.load_lora_weights(args.rss_warm, adapter_name="warm")
    pipe.unload_lora_weights()
    gc.collect()
    trim()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = proc_status("VmRSS")
    pipe.load_lora_weights(args.rss_file, adapter_name="x")
    peak = proc_status("VmHWM")
    gc.collect()
    trim()
    after = proc_status("VmRSS")
    from many_adapters import ll_bytes, peft_bytes

    held = (ll_bytes if args.rss_child == LL else peft_bytes)(pipe.transformer, "x")  # what the adapter's tensors take
    print("RSS-JSON " + json.dumps({"before": before, "peak": peak, "after": after, "held": held}), flush=True)


# -- the table ------------------------------------------------------------------------------------------------


def fmt_big(v: float, unit: str) -> str:
    """fmt_value, with minutes for long times and GiB for large sizes (the extrapolations reach both)."""
    if unit in ("s", "ms") and v >= 120:
        return f"{v / 60:.1f} min"
    if unit == "MiB" and v >= 1024:
        return f"{v / 1024:.2f} GiB"
    return fmt_value(v, unit)


def extrapolated(row: DitRow, lib_values) -> str:
    if row.scale_text:
        return row.scale_text
    if row.scale is None or not lib_values:
        return "-"
    return fmt_big(med(lib_values) * row.scale, row.unit)


def extra_cell(row: DitRow) -> str:
    if row.scale_text or row.scale is None:
        return row.scale_text or "-"
    parts = []
    if row.ll:
        parts.append(f"{LL} {extrapolated(row, row.ll)}")
    if row.other:
        parts.append(f"{row.other_name.split(':')[0]} {extrapolated(row, row.other)}")
    return "; ".join(parts) or "-"


def text_row(row: DitRow) -> str:
    other = f"{row.other_name} {fmt_stats(row.other, row.unit)}" if row.other else f"{row.other_name}"
    mine = f"{LL} {fmt_stats(row.ll, row.unit)} | " if row.ll else ""
    extra = f" | full model: {extra_cell(row)}" if row.scale is not None else ""
    return f"[{row.figure}] {row.what}: {mine}{other} | {ratio_text(row)}{extra}" + (f" | {row.verdict}" if row.verdict else "")


def markdown(benches: list[FamilyBench], info: dict, argv: list[str], elapsed: float, st: Settings) -> str:
    lines = [
        START,
        "## DiT at real widths",
        "",
        f"Written by `{' '.join(['python', 'benchmarks/bench_dit.py'] + argv)}` ({elapsed / 60:.1f} min) on {info['date']}: "
        f"{info['cpu']}, {info['nproc']} cores, {info['memory']}, torch {info['torch']} with {info['torch threads']} thread, "
        f"diffusers {info['diffusers']}, peft {info['peft']}, lora_loader {info['lora_loader commit']}, load average at start "
        f"{info['load average at start']}, at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}.",
        "",
        "diffusers' own transformer classes at the real models' widths with fewer blocks (the counts are in each table's title), "
        f"seeded random weights stored in {str(st.dtype).split('.')[-1]} on {st.device} (both libraries get identical copies), and the "
        "files the trainers write for them (see `benchmarks/README.md`). Both libraries run in one process, in alternating rounds "
        f"(the order flips every round); {st.repeats} rounds; each cell: median [min – max]; ratio: how many times faster "
        "lora_loader is (medians). The read reference is `safetensors.torch.load_file`, which in safetensors 0.8 maps the file "
        "and reads no byte; a load copies every byte into memory the adapter owns (see `benchmarks/README.md`, `load`).",
        "",
        "**The last column is an extrapolation, not a measurement**: the reduced model's medians multiplied by how many times its "
        "blocks the full model has (every targeted layer is in a block, so loading, switching and fusing work grows with the block "
        "count; where part of a call is a fixed cost, the product overstates it). The forward overhead is per block, the same at any depth.",
        "",
    ]
    for b in benches:
        size = b.size
        scales = [f"{size.full_label}: x{size.scale:g}"] + [f"{label}: x{f:g}" for label, f in size.extra_full]
        lines += [
            f"### {size.label}: {size.blocks_text()}",
            "",
            f"{b.n_params / 1e9:.2f} B parameters in the reduced model; width {size.width}. Extrapolated to {'; '.join(scales)}"
            + (" (the Wan 2.2 figure is twice the Wan 2.1 one: the same file loaded into each expert)." if size.extra_full else "."),
            "",
            f"| figure | what | {LL} | other library | other | ratio | full model (extrapolated, x{size.scale:g}) |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in b.rows:
            lines.append(
                f"| {row.figure} | {row.what}{(' (' + row.verdict + ')') if row.verdict else ''} | {fmt_stats(row.ll, row.unit) if row.ll else '-'} | "
                f"{row.other_name or '-'} | {fmt_stats(row.other, row.unit) if row.other else '-'} | {ratio_text(row)} | {extra_cell(row)} |"
            )
        for label, factor in size.extra_full:
            keep = [r for r in b.rows if r.scale is not None and not r.scale_text and r.figure in ("load", "fuse", "rss")]
            if keep:
                lines += ["", f"{label}, extrapolated (x{factor:g}):", ""]
                lines += [f"- {r.figure}: {r.what}: " + "; ".join(
                    f"{name} {fmt_big(med(vals) * factor, r.unit)}" for name, vals in ((LL, r.ll), (r.other_name.split(':')[0], r.other)) if vals)
                    for r in keep]
        lines += [""]
        if b.checks:
            lines += ["Checks:", ""] + [f"- {c}" for c in b.checks] + [""]
        if b.profiles:
            lines += [f"Where {LL}'s time goes (cProfile after the timed rounds; profiler overhead inflates it, read it for proportions):", ""]
            for title, prof in b.profiles.items():
                lines += [f"{title}:", "", "```"] + prof + ["```", ""]
    lines += [
        "How it was measured:",
        "",
        "- load: `pipe.load_lora_weights(file, adapter_name=\"a\")` into a model without LoRA (each round ends with "
        "`unload_lora_weights`), then a second file of the same kind as adapter `b`; the reference is `safetensors.torch.load_file` "
        "of the same file with the page cache warm. One untimed warm-up load per library first.",
        f"- switch: `set_adapters([x], [1.0])`, x alternating between `a` and `b`, {st.switch_calls} calls per library and round, each timed on its own.",
        "- fuse: `fuse_lora()` then `unfuse_lora()` with `a` active; bit-equality is checked by the SHA-1 of every weight's bytes "
        "against the model as built.",
        f"- forward: the first block of each kind called directly on seeded inputs (image and text tokens as in the row, the "
        f"model's own rotary table), `torch.no_grad()`, {str(st.forward_dtype).split('.')[-1]}; the base is a separate model with "
        f"no LoRA code (diffusers+peft's model shares its tensors); {st.forward_repeats} rounds rotating the order; overhead per "
        "round against the base timed in the same round.",
        "- rss: peak RSS (VmHWM after resetting it through `/proc/self/clear_refs`) minus the RSS before the load, in a fresh "
        "process per library that built the model and warmed the code paths with a small file of the same layout first.",
        END,
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="512-wide models, 1 round, ai-toolkit rank 32 only, no RSS children: "
                   "a smoke run (prints only; diffusers' Kohya Flux converter assumes 3072 wide and refuses the 512-wide file)")
    p.add_argument("--families", default="flux,wan", help="which models (default flux,wan)")
    p.add_argument("--flux-blocks", default="1,2", help="double,single blocks of the reduced Flux (default 1,2: x19 to the full 19 + 38)")
    p.add_argument("--wan-blocks", type=int, default=2, help="blocks of the reduced Wan (default 2: x20 to the full 40)")
    p.add_argument("--repeats", type=int, default=None, help="rounds of load / switch / fuse (default 3, --quick 1)")
    p.add_argument("--forward-repeats", type=int, default=None, help="forward rounds (default 3, --quick 1)")
    p.add_argument("--rss-repeats", type=int, default=1, help="RSS child processes per library (default 1; 0: skip)")
    p.add_argument("--device", default="cpu", help="where the models live (default cpu; gpu.py passes cuda)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="the models' storage dtype (default bf16)")
    p.add_argument("--forward-dtype", default=None, choices=sorted(DTYPES),
                   help="the forward figure's dtype (default fp32 on cpu, where bf16 matmuls are slow; the storage dtype elsewhere)")
    p.add_argument("--out", default=None, help="markdown file whose 'DiT at real widths' section to write "
                   "(default benchmarks/RESULTS.md for a full run; --quick writes only with --out)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rss-family", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rss-blocks", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rss-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rss-warm", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(argv)
    return args


def sizes(args) -> list[DitSize]:
    out = []
    for family in (f.strip() for f in args.families.split(",") if f.strip()):
        if family == "flux":
            out.append(flux_size(*(int(x) for x in args.flux_blocks.split(",")), quick=args.quick))
        elif family == "wan":
            out.append(wan_size(args.wan_blocks, quick=args.quick))
        else:
            raise SystemExit(f"--families: unknown {family!r} (flux, wan)")
    return out


def run(args) -> tuple[str, float]:
    """Every figure for every family asked for; returns the markdown section and the seconds it took."""
    torch.set_num_threads(args.threads)
    quiet_libraries()
    started = time.perf_counter()
    info = machine()
    print("machine: " + ", ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    on_cpu = args.device == "cpu"
    st = Settings(
        repeats=args.repeats or (1 if args.quick else 3), switch_calls=4 if args.quick else 10,
        forward_repeats=args.forward_repeats or (1 if args.quick else 3), rss=args.rss_repeats > 0 and on_cpu and not args.quick,
        device=args.device, dtype=DTYPES[args.dtype],
        forward_dtype=DTYPES[args.forward_dtype] if args.forward_dtype else (torch.float32 if on_cpu else DTYPES[args.dtype]),
    )  # fmt: skip
    benches = []
    workdir = Path(tempfile.mkdtemp(prefix="lora-dit-"))
    try:
        for size in sizes(args):
            t0 = time.perf_counter()
            b = FamilyBench(size, st, workdir, quick=args.quick)
            b.run()
            if st.rss:
                b.rss_figure(args)
            b.close()  # the bf16 pair goes before the forward models are built
            b.forward_figure()
            benches.append(b)
            print(f"  ({size.label}: {time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.perf_counter() - started
    return markdown(benches, info, args.argv, elapsed, st), elapsed


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.rss_child:
        rss_child(args)
        return 0
    text, elapsed = run(args)
    print("\n" + text)
    out = args.out or (None if args.quick else str(HERE / "RESULTS.md"))
    if out:
        write_section(Path(out), text, START, END)
        print(f"wrote the section into {out}")
    print(f"total {elapsed / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
