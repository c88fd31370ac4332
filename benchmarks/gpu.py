#!/usr/bin/env python3
"""Every figure of run.py's table, and the DiT section, on a CUDA machine in fp16 / bf16: one prepared script.

    python benchmarks/gpu.py                     # on a CUDA machine (~2.5 min): writes $OUT/gpu.md, or --out
    python benchmarks/gpu.py --dry-run           # tiny sizes on the CPU (~2 min): checks the script end to end
    python benchmarks/gpu.py --only sd,lm --out /tmp/gpu.md

The same workloads as run.py and bench_dit.py (nothing downloaded, seeded weights, the same Kohya, PEFT,
ai-toolkit, sd-scripts and LyCORIS files), moved to the accelerator, with fewer rounds so that the whole
script runs twice in the few minutes a lent GPU machine gives. Both libraries run in one process, in
alternating rounds; every timed call ends with ``torch.cuda.synchronize()``; 2 rounds by default. Groups (``--only``):

- ``sd``: the SD 1.5 UNet + CLIP text encoder in fp16 and the 36 MiB Kohya rank-32 file: load (1st and 10th
  adapter, against the safetensors read), switch (``set_adapters`` / ``disable_lora`` / ``enable_lora`` with 1
  and with ``--small`` rank-4 adapters loaded), forward (UNet 1x4x64x64, 77 tokens, 1 and 2 adapters),
  fuse + unfuse (and bit-exactness), and the accelerator memory a load and a fuse add (run.py's ``rss``
  figure, measured where it matters on a GPU).
- ``lm``: the 1.1 B Llama in bf16 against transformers' ``load_adapter`` (peft): load, set_adapter, forward.
- ``dit``: benchmarks/bench_dit.py with ``--device cuda --dtype bf16`` and the CPU run's blocks (Flux 1 double +
  2 single, Wan 2), so the two tables compare row by row; the extrapolation column scales them.

No GPU is needed for ``--dry-run``: it runs every group at tiny sizes on the CPU (fp32 where the CPU lacks
the half-precision kernels), to check the script before the device time is spent.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import DP, LL, TP, machine, quiet_libraries, read_safetensors  # noqa: E402  (first: path, environment)

import torch  # noqa: E402

from report import Row, fmt_stats, med, ratio_text, verdict  # noqa: E402
from workloads import (  # noqa: E402
    FULL, QUICK, build_llama, build_text_encoder, build_unet, kohya_targets, make_pipeline, no_lora_left, remove_peft,
    write_kohya, write_peft_adapters,
)  # fmt: skip

GROUPS = ("sd", "lm", "dit")


class Gpu:
    """Device, dtypes, synchronised timing, accelerator memory readings."""

    def __init__(self, dry_run: bool):
        self.cuda = torch.cuda.is_available() and not dry_run
        if not self.cuda and not dry_run:
            raise SystemExit("no CUDA device: run with --dry-run to check the script on the CPU")
        self.device = "cuda" if self.cuda else "cpu"
        self.half = torch.float16 if self.cuda else torch.float32  # the CPU lacks fast fp16 convolutions
        self.bf16 = torch.bfloat16

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn) -> float:
        gc.collect()
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def mem(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else 0

    def reset_peak(self) -> int:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        return self.mem()

    def peak_since(self, before: int) -> float:
        return (torch.cuda.max_memory_allocated() - before) / 2**20 if self.cuda else float("nan")


class Table:
    def __init__(self):
        self.rows: list[Row] = []
        self.checks: list[str] = []

    def add(self, row: Row) -> None:
        self.rows.append(row)
        other = f"{row.other_name} {fmt_stats(row.other, row.unit)}" if row.other else ""
        mine = f"{LL} {fmt_stats(row.ll, row.unit)} | " if row.ll else ""
        print(f"  [{row.figure}] {row.what}: {mine}{other} | {ratio_text(row)}" + (f" | {row.verdict}" if row.verdict else ""), flush=True)

    def check(self, text: str) -> None:
        self.checks.append(text)
        print("  " + text, flush=True)


def alternate(repeats: int):
    for r in range(repeats):
        yield r, (LL, DP) if r % 2 == 0 else (DP, LL)


# -- SD 1.5 -----------------------------------------------------------------------------------------------------


def sd_group(g: Gpu, t: Table, args, workdir: Path) -> None:
    import lora_loader

    size = QUICK if args.dry_run else FULL
    repeats, n_load, n_small = args.repeats, (3 if args.dry_run else 10), args.small
    print(f"\n== sd: SD 1.5 ({size.name}) in {g.half}, on {g.device}", flush=True)
    base_unet, base_te = build_unet(size, 0), build_text_encoder(size, 1)
    pipes = {
        LL: lora_loader.attach(make_pipeline(copy.deepcopy(base_unet), copy.deepcopy(base_te))),
        DP: make_pipeline(copy.deepcopy(base_unet), copy.deepcopy(base_te)),
    }
    for pipe in pipes.values():
        pipe.to(g.device, g.half)
    base_unet.to(g.device, g.half)
    targets = kohya_targets(base_unet, base_te)
    files = [str(workdir / f"sd_kohya_{i}.safetensors") for i in range(n_load)]
    for i, path in enumerate(files):
        write_kohya(path, targets, size.kohya_rank, size.kohya_alpha, seed=100 + i)
        read_safetensors(path)
    small = [str(workdir / f"sd_small_{i}.safetensors") for i in range(n_small)]
    for i, path in enumerate(small):
        write_kohya(path, targets, size.small_rank, float(size.small_rank), seed=1000 + i)
    mib = os.path.getsize(files[0]) / 2**20

    def unload(lib):
        pipes[lib].unload_lora_weights()
        gc.collect()
        assert no_lora_left(pipes[lib].unet) and no_lora_left(pipes[lib].text_encoder), lib

    # load: 1st .. n_load-th adapter, the accelerator memory of the 1st
    for lib in (LL, DP):  # warm-up
        pipes[lib].load_lora_weights(files[0], adapter_name="w")
        unload(lib)
    loads = {LL: [], DP: []}
    reads, peak, kept = [], {LL: [], DP: []}, {LL: [], DP: []}
    for r, order in alternate(repeats):
        reads.append(g.time(lambda: read_safetensors(files[0])))
        for lib in order:
            ts = []
            for i, path in enumerate(files):
                before = g.reset_peak()
                ts.append(g.time(lambda: pipes[lib].load_lora_weights(path, adapter_name=f"a{i}")))
                if i == 0:
                    peak[lib].append(g.peak_since(before))
                    kept[lib].append((g.mem() - before) / 2**20)
            loads[lib].append(ts)
            unload(lib)
    first = {lib: [ts[0] for ts in loads[lib]] for lib in loads}
    last = {lib: [ts[-1] for ts in loads[lib]] for lib in loads}
    ratio = {lib: [ts[-1] / ts[0] for ts in loads[lib]] for lib in loads}
    t.add(Row("load", f"reference: safetensors read of the {mib:.0f} MiB Kohya file", "ms", None, reads, "safetensors", kind="plain"))
    speed, x_read = med(first[DP]) / med(first[LL]), med(first[LL]) / med(reads)
    t.add(Row("load", "load_lora_weights, 1st adapter", "ms", first[LL], first[DP], DP, target="<= 2x the read, >= 5x faster",
              met=x_read <= 2 and speed >= 5, verdict=f"{verdict(x_read <= 2, f'{x_read:.2f}x the read')}; {verdict(speed >= 5, f'{speed:.1f}x faster')}"))
    t.add(Row("load", f"load_lora_weights, adapter {n_load} ({n_load - 1} loaded)", "ms", last[LL], last[DP], DP))
    t.add(Row("load", f"adapter {n_load} / adapter 1 (per round)", "x", ratio[LL], ratio[DP], DP, kind="plain", target="<= 1.10x",
              met=med(ratio[LL]) <= 1.1, verdict=verdict(med(ratio[LL]) <= 1.1, f"{med(ratio[LL]):.2f}x")))
    if g.cuda:
        t.add(Row("memory", "peak accelerator memory added by the 1st load (MiB)", "MiB", peak[LL], peak[DP], DP, kind="plain"))
        t.add(Row("memory", "accelerator memory kept by the 1st load (MiB)", "MiB", kept[LL], kept[DP], DP, kind="plain"))

    # switch: 1 and n_small small adapters loaded
    sw = {n: {lib: {"set": [], "disable": [], "enable": []} for lib in (LL, DP)} for n in ("1", "n")}
    for lib in (LL, DP):
        for i, path in enumerate(small):
            pipes[lib].load_lora_weights(path, adapter_name=f"s{i}")
            if i == 0 or i == n_small - 1:
                key = "1" if i == 0 else "n"
                for c in range(2 + 2 * repeats):
                    times = {
                        "set": g.time(lambda: pipes[lib].set_adapters([f"s{c % (i + 1)}"], [0.5])),
                        "disable": g.time(lambda: pipes[lib].disable_lora()),
                        "enable": g.time(lambda: pipes[lib].enable_lora()),
                    }
                    if c >= 2:
                        for k, v in times.items():
                            sw[key][lib][k].append(v)
        unload(lib)
    for call in ("set", "disable", "enable"):
        name = {"set": "set_adapters", "disable": "disable_lora", "enable": "enable_lora"}[call]
        t.add(Row("switch", f"{name}, 1 loaded", "ms", sw["1"][LL][call], sw["1"][DP][call], DP))
        v, flat = med(sw["n"][LL][call]), med(sw["n"][LL][call]) / med(sw["1"][LL][call])
        t.add(Row("switch", f"{name}, {n_small} loaded", "ms", sw["n"][LL][call], sw["n"][DP][call], DP, target="<= 1 ms, <= 1.2x the 1-loaded",
                  met=v <= 1e-3 and flat <= 1.2, verdict=f"{verdict(v <= 1e-3, f'{v * 1e3:.3f} ms')}; {verdict(flat <= 1.2, f'{flat:.2f}x the 1-loaded')}"))

    # forward: A, A+B against the base UNet
    for lib in (LL, DP):
        pipes[lib].load_lora_weights(files[0], adapter_name="A")
        pipes[lib].load_lora_weights(files[1], adapter_name="B")
    gen = torch.Generator().manual_seed(7)
    side = 16 if args.dry_run else 64
    x = torch.randn(1, 4, side, side, generator=gen).to(g.device, g.half)
    ehs = torch.randn(1, 77, size.unet["cross_attention_dim"], generator=gen).to(g.device, g.half)
    tt = torch.tensor([500], device=g.device)
    unets = {"base": base_unet, LL: pipes[LL].unet, DP: pipes[DP].unet}

    def fwd(w):
        with torch.no_grad():
            return unets[w](x, tt, encoder_hidden_states=ehs).sample

    for label, names, weights in (("1 adapter", ["A"], [1.0]), ("2 adapters", ["A", "B"], [0.7, 0.5])):
        for pipe in pipes.values():
            pipe.set_adapters(names, weights)
        outs = {w: fwd(w) for w in unets}
        t.check(f"sd forward, {label}: max |{LL} - {DP}| = {(outs[LL] - outs[DP]).abs().max().item():.2e} "
                f"(moved from the base by {(outs[LL] - outs['base']).abs().max().item():.2e})")
        samples = {w: [] for w in unets}
        for r in range(max(3, repeats)):
            for w in [("base", LL, DP), (DP, "base", LL), (LL, DP, "base")][r % 3]:
                samples[w].append(g.time(lambda: fwd(w)))
        over = {lib: [100 * (a / b - 1) for a, b in zip(samples[lib], samples["base"])] for lib in (LL, DP)}
        t.add(Row("forward", f"UNet forward 1x4x{side}x{side}, {label} (base {fmt_stats(samples['base'], 'ms')})", "ms", samples[LL], samples[DP], DP))
        ok = med(over[LL]) <= 15
        t.add(Row("forward", f"overhead over base, {label}", "%", over[LL], over[DP], DP, kind="plain",
                  target="<= +15%" if label == "2 adapters" else "", met=ok if label == "2 adapters" else None,
                  verdict=verdict(ok, f"{med(over[LL]):+.1f}%") if label == "2 adapters" else ""))

    # fuse + unfuse of A, bit-exactness, accelerator memory
    for pipe in pipes.values():
        pipe.set_adapters(["A"], [1.0])
    reference = {k: v.detach().clone() for k, v in base_unet.named_parameters()}
    fuse, unfuse, fpeak, changed = {LL: [], DP: []}, {LL: [], DP: []}, {LL: [], DP: []}, {}
    for r, order in alternate(repeats):
        for lib in order:
            before = g.reset_peak()
            fuse[lib].append(g.time(lambda: pipes[lib].fuse_lora()))
            unfuse[lib].append(g.time(lambda: pipes[lib].unfuse_lora()))
            fpeak[lib].append(g.peak_since(before))
            if r == 0:
                live = {k.replace(".base_layer.", "."): p for k, p in pipes[lib].unet.named_parameters() if "lora_" not in k}
                changed[lib] = sum(not torch.equal(live[k], v) for k, v in reference.items())
    total = {lib: [a + b for a, b in zip(fuse[lib], unfuse[lib])] for lib in fuse}
    t.add(Row("fuse", "fuse_lora", "ms", fuse[LL], fuse[DP], DP))
    t.add(Row("fuse", "unfuse_lora", "ms", unfuse[LL], unfuse[DP], DP))
    speed = med(total[DP]) / med(total[LL])
    t.add(Row("fuse", "fuse_lora + unfuse_lora", "ms", total[LL], total[DP], DP, target=">= 5x faster, bit-exact",
              met=speed >= 5 and changed[LL] == 0, verdict=verdict(speed >= 5, f"{speed:.1f}x faster")))
    t.add(Row("fuse", f"UNet weights not bit-equal after one cycle (of {len(reference)})", "count", [changed[LL]], [changed[DP]], DP,
              kind="plain", target="0", met=changed[LL] == 0, verdict=verdict(changed[LL] == 0, f"{changed[LL]} changed")))
    if g.cuda:
        t.add(Row("memory", "peak accelerator memory added by fuse + unfuse (MiB)", "MiB", fpeak[LL], fpeak[DP], DP, kind="plain"))
    pipes.clear()
    del base_unet, base_te, reference, unets
    gc.collect()


# -- the LM --------------------------------------------------------------------------------------------------------


def lm_group(g: Gpu, t: Table, args, workdir: Path) -> None:
    import lora_loader

    size = QUICK if args.dry_run else FULL
    print(f"\n== lm: Llama ({size.name}) in {g.bf16}, on {g.device}", flush=True)
    base = build_llama(size, 3)
    folders = [str(workdir / f"peft_{n}") for n in "xy"]
    write_peft_adapters(base, folders, size.lm_rank, seed=40)
    models = {LL: lora_loader.attach(copy.deepcopy(base)), DP: copy.deepcopy(base)}
    for m in (base, *models.values()):
        m.to(g.device, g.bf16)
    adapter_file = os.path.join(folders[0], "adapter_model.safetensors")

    def unload(lib):
        if lib == LL:
            models[LL].unload_lora_weights()
        else:
            remove_peft(models[DP])
        gc.collect()
        assert no_lora_left(models[lib])

    for lib in (LL, DP):
        models[lib].load_adapter(folders[0], adapter_name="x")
        unload(lib)
    loads, reads = {LL: [], DP: []}, []
    for r, order in alternate(args.repeats):
        reads.append(g.time(lambda: read_safetensors(adapter_file)))
        for lib in order:
            loads[lib].append(g.time(lambda: models[lib].load_adapter(folders[0], adapter_name="x")))
            unload(lib)
    t.add(Row("lm", "reference: safetensors read of the adapter file", "ms", None, reads, "safetensors", kind="plain"))
    x_read, speed = med(loads[LL]) / med(reads), med(loads[DP]) / med(loads[LL])
    t.add(Row("lm", "load_adapter (PEFT folder)", "ms", loads[LL], loads[DP], TP, target="<= 2x the read, >= 5x faster",
              met=x_read <= 2 and speed >= 5, verdict=f"{verdict(x_read <= 2, f'{x_read:.2f}x the read')}; {verdict(speed >= 5, f'{speed:.1f}x faster')}"))
    for lib in (LL, DP):
        models[lib].load_adapter(folders[0], adapter_name="x")
        models[lib].load_adapter(folders[1], adapter_name="y")
    sw = {LL: [], DP: []}
    for c in range(2 + 4 * args.repeats):
        for lib in ((LL, DP) if c % 2 == 0 else (DP, LL)):
            dt = g.time(lambda: models[lib].set_adapter("x" if c % 2 == 0 else "y"))
            if c >= 2:
                sw[lib].append(dt)
    v = med(sw[LL])
    t.add(Row("lm", "set_adapter (2 loaded)", "ms", sw[LL], sw[DP], TP, target="<= 1 ms", met=v <= 1e-3, verdict=verdict(v <= 1e-3, f"{v * 1e3:.3f} ms")))
    ids = torch.randint(0, size.llama["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(5)).to(g.device)
    nets = {"base": base, LL: models[LL], DP: models[DP]}

    def fwd(w):
        with torch.no_grad():
            return nets[w](input_ids=ids, use_cache=False).logits

    for lib in (LL, DP):
        models[lib].set_adapter("x")
    outs = {w: fwd(w) for w in nets}
    t.check(f"lm forward, adapter x: max |{LL} - {TP}| = {(outs[LL] - outs[DP]).abs().max().item():.2e}")
    samples = {w: [] for w in nets}
    for r in range(max(3, args.repeats)):
        for w in [("base", LL, DP), (DP, "base", LL), (LL, DP, "base")][r % 3]:
            samples[w].append(g.time(lambda: fwd(w)))
    over = {lib: [100 * (a / b - 1) for a, b in zip(samples[lib], samples["base"])] for lib in (LL, DP)}
    t.add(Row("lm", f"LM forward 1x64 tokens, 1 adapter (base {fmt_stats(samples['base'], 'ms')})", "ms", samples[LL], samples[DP], TP))
    t.add(Row("lm", "LM forward overhead over base, 1 adapter", "%", over[LL], over[DP], TP, kind="plain"))
    models.clear()
    del base, nets
    gc.collect()


# -- the DiT section ---------------------------------------------------------------------------------------------------


def dit_group(g: Gpu, args) -> str:
    import bench_dit

    argv = ["--device", g.device, "--dtype", "bf16" if g.cuda else "fp32", "--repeats", str(args.repeats), "--forward-repeats", "3"]
    argv += ["--quick", "--forward-repeats", "1"] if args.dry_run else ["--flux-blocks", "1,2", "--wan-blocks", "2"]
    print(f"\n== dit: bench_dit.py {' '.join(argv)}", flush=True)
    dit_args = bench_dit.parse_args(argv)
    text, _ = bench_dit.run(dit_args)
    return text.replace(bench_dit.START + "\n", "").replace(bench_dit.END + "\n", "").replace("## DiT at real widths", "## DiT at real widths (GPU)")


# -- the report ---------------------------------------------------------------------------------------------------------


def markdown(t: Table, info: dict, g: Gpu, args, elapsed: float, dit: str) -> str:
    dev = torch.cuda.get_device_name(0) if g.cuda else "CPU (--dry-run: tiny sizes, not GPU figures)"
    lines = [
        f"# lora_loader vs diffusers+peft / transformers+peft on {dev}",
        "",
        f"Written by `{' '.join(['python', 'benchmarks/gpu.py'] + args.argv)}` ({elapsed / 60:.1f} min), {args.repeats} rounds, "
        f"SD in {str(g.half).split('.')[-1]}, the LM in bf16, the DiTs in {'bf16' if g.cuda else 'fp32'}. Each cell: median [min – max]; ratio: how many times faster "
        "lora_loader is (medians). Every timed call ends with a device synchronize.",
        "",
        "| | |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    if g.cuda:
        lines.append(f"| gpu | {dev}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda} |")
    if t.rows:
        lines += ["", "## run.py's figures", "", f"| figure | what | {LL} | other library | other | ratio | target | verdict |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in t.rows:
            lines.append(f"| {row.figure} | {row.what} | {fmt_stats(row.ll, row.unit) if row.ll else '-'} | {row.other_name or '-'} | "
                         f"{fmt_stats(row.other, row.unit) if row.other else '-'} | {ratio_text(row)} | {row.target or ''} | {row.verdict or ''} |")
        if t.checks:
            lines += ["", "Checks:", ""] + [f"- {c}" for c in t.checks]
    if dit:
        lines += ["", dit]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: check the script without a GPU")
    p.add_argument("--only", default=None, help=f"comma-separated groups from {','.join(GROUPS)} (default all)")
    p.add_argument("--repeats", type=int, default=None, help="rounds per figure (default 2, so two runs fit a lent machine's minutes; --dry-run 1)")
    p.add_argument("--small", type=int, default=None, help="small adapters loaded for the switch figure (default 20, --dry-run 4)")
    p.add_argument("--out", default=None, help="markdown file (default $OUT/gpu.md when $OUT is set, else benchmarks/RESULTS-gpu.md; "
                   "--dry-run prints only unless --out is given)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own on a GPU machine, 1 for --dry-run)")
    args = p.parse_args(argv)
    args.argv = list(argv)
    args.repeats = args.repeats or (1 if args.dry_run else 2)
    args.small = args.small or (4 if args.dry_run else 20)
    args.groups = GROUPS if args.only is None else tuple(x.strip() for x in args.only.split(",") if x.strip())
    if set(args.groups) - set(GROUPS):
        p.error(f"--only: choose from {','.join(GROUPS)}")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    g = Gpu(args.dry_run)
    if args.threads or args.dry_run:
        torch.set_num_threads(args.threads or 1)
    quiet_libraries()
    started = time.perf_counter()
    info = machine()
    print("machine: " + ", ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    t = Table()
    dit = ""
    workdir = Path(tempfile.mkdtemp(prefix="lora-gpu-"))
    try:
        if "sd" in args.groups:
            sd_group(g, t, args, workdir)
        if "lm" in args.groups:
            lm_group(g, t, args, workdir)
        if "dit" in args.groups:
            dit = dit_group(g, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.perf_counter() - started
    text = markdown(t, info, g, args, elapsed, dit)
    print("\n" + text)
    out = args.out or (os.path.join(os.environ["OUT"], "gpu.md") if os.environ.get("OUT") else None)
    if out is None and not args.dry_run:
        out = str(HERE / "RESULTS-gpu.md")
    if out:
        Path(out).write_text(text)
        print(f"wrote {out}")
    print(f"total {elapsed / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
