#!/usr/bin/env python3
"""50 adapters on an SD 1.5 UNet: lora_loader against diffusers+peft, and lora_loader's residency cap.

One command builds the real SD 1.5 UNet (860 M parameters, from its config, seeded random
weights, nothing downloaded), writes 50 rank-8 LoRA files in the diffusers/PEFT layout
(``unet.<module>.lora_A.weight`` / ``lora_B.weight``, fp16, seeded random factors) on every
attention projection (``to_q/k/v/out.0`` of attn1 and attn2: the targets of diffusers' SD
LoRA training script), and loads them into two identical pipelines in the same process, one
with lora_loader and one with diffusers+peft, with ``torch.set_num_threads(1)``.

    python benchmarks/many_adapters.py            # full run (~9 min on a 2-core CPU); writes the
                                                  # "50 adapters" section of benchmarks/RESULTS.md
    python benchmarks/many_adapters.py --quick    # smaller UNet, 12 adapters: a smoke run; prints only

What it reports (medians [min - max]; ratio: how many times faster lora_loader is):

- load: ``load_lora_weights`` of adapter k (k = 1, 10, 25, 50) while k - 1 are loaded,
  each load followed by an untimed ``set_adapters([new])`` so one adapter is active, as a
  server switching per request keeps it. k = 1 is the first load into a model without
  LoRA; k = 10, 25, 50 are medians over the loads k-2..k+2 (k-4..k for the last).
  lora_loader repeats the 50 loads in several rounds (``unload_lora_weights`` between
  them), without and with the residency cap; diffusers+peft loads them once (``--peft-rounds``).
- switch: ``set_adapters([x])`` alternating between two adapters, each call timed, with 2
  and with 50 loaded; with lora_loader's cap on, between two resident adapters and in a
  round-robin over 2 x cap adapters (every switch brings one back and parks one).
- forward: one UNet forward (batch 1, 1x4x32x32 latents, 77 tokens, no_grad), adapter
  ``a0`` active, with 1 and with 50 loaded, against the base UNet in the same rounds.
- memory: summed bytes of each adapter's tensors, the RSS each load keeps (VmRSS after
  minus before, after gc and malloc_trim), and the bytes the cap keeps on the model's device.
"""

from __future__ import annotations

import argparse
import copy
import gc
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import DP, LL, machine, proc_status, quiet_libraries, read_safetensors, timed, trim  # noqa: E402  (first: the path and environment)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from report import Row, fmt_stats, fmt_value, format_row_text, med, ratio_text, write_section  # noqa: E402
from workloads import FULL, QUICK, Size, build_text_encoder, build_unet, make_pipeline, no_lora_left  # noqa: E402

TARGETS = re.compile(r".*\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)")
START, END = "<!-- many_adapters:start -->", "<!-- many_adapters:end -->"


@dataclass
class Config:
    name: str
    size: Size
    adapters: int
    rank: int
    latent: int
    ll_rounds: int  # lora_loader load rounds without the cap (the first alternates with diffusers+peft)
    cap_rounds: int  # lora_loader load rounds with the cap
    peft_rounds: int
    forward_repeats: int
    switch_calls: int  # timed set_adapters calls per state and library
    cap: int


def configs(args) -> Config:
    if args.quick:
        size = QUICK
        cfg = Config("quick", size, adapters=12, rank=8, latent=16, ll_rounds=2, cap_rounds=1, peft_rounds=1,
                     forward_repeats=2, switch_calls=10, cap=3)
    else:
        size = FULL
        cfg = Config("full", size, adapters=50, rank=8, latent=32, ll_rounds=4, cap_rounds=3, peft_rounds=1,
                     forward_repeats=3, switch_calls=20, cap=4)
    for field in ("adapters", "rank", "peft_rounds", "forward_repeats", "cap"):
        value = getattr(args, field, None)
        if value is not None:
            setattr(cfg, field, value)
    return cfg


# -- files -----------------------------------------------------------------------------------------------


def write_files(unet: nn.Module, folder: Path, n: int, rank: int) -> tuple[list[str], int]:
    """n diffusers/PEFT-layout files (fp16, seeded): returns their names and the number of target modules."""
    from safetensors.torch import save_file

    targets = [(name, m) for name, m in unet.named_modules() if TARGETS.fullmatch(name)]
    names = []
    for i in range(n):
        g = torch.Generator().manual_seed(5000 + i)
        tensors = {}
        for name, m in targets:
            tensors[f"unet.{name}.lora_A.weight"] = (torch.randn(rank, m.in_features, generator=g) * m.in_features**-0.5).half()
            tensors[f"unet.{name}.lora_B.weight"] = (torch.randn(m.out_features, rank, generator=g) * 0.05).half()
        file = f"lora_{i:02d}.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        names.append(file)
    return names, len(targets)


# -- measuring helpers ------------------------------------------------------------------------------------


def rss() -> int:
    gc.collect()
    trim()
    return proc_status("VmRSS")


def ll_bytes(unet: nn.Module, name: str) -> int:
    from lora_loader.layers import LoraLayer

    total = 0
    for m in unet.modules():
        if isinstance(m, LoraLayer) and name in m.lora_adapters:
            adapter = m.lora_adapters[name]
            total += sum(t.numel() * t.element_size() for t in list(adapter.parameters()) + list(adapter.buffers()))
    return total


def peft_bytes(unet: nn.Module, name: str) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    total = 0
    for m in unet.modules():
        if isinstance(m, BaseTunerLayer):
            for attr in ("lora_A", "lora_B", "lora_magnitude_vector"):
                holder = getattr(m, attr, None)
                if holder is not None and name in holder:
                    total += sum(t.numel() * t.element_size() for t in holder[name].parameters())
    return total


def window(k: int, n: int) -> list[int]:
    """The load indices (1-based) a figure for adapter k takes its median over."""
    if k == 1:
        return [1]
    lo, hi = max(2, k - 2), min(n, k + 2)
    while hi - lo < 4 and lo > 2:
        lo -= 1
    return list(range(lo, hi + 1))


class Bench:
    def __init__(self, cfg: Config, workdir: Path):
        import lora_loader

        self.cfg, self.workdir = cfg, workdir
        self.rows: list[Row] = []
        self.checks: list[str] = []
        self.outputs: dict[str, torch.Tensor] = {}  # lora_loader's UNet output with a0 active, per state
        t0 = time.perf_counter()
        print(f"building the SD 1.5 UNet x3 ({cfg.name}) ...", flush=True)
        self.base = build_unet(cfg.size, 0)
        self.n_params = sum(p.numel() for p in self.base.parameters())
        te_size = QUICK  # the files touch only the UNet: a small text encoder, never run
        self.pipes = {
            LL: lora_loader.attach(make_pipeline(copy.deepcopy(self.base), build_text_encoder(te_size, 1))),
            DP: make_pipeline(copy.deepcopy(self.base), build_text_encoder(te_size, 1)),
        }
        print(f"  built in {time.perf_counter() - t0:.0f} s: UNet {self.n_params / 1e6:.0f} M params", flush=True)
        t0 = time.perf_counter()
        self.files, self.n_targets = write_files(self.base, workdir, cfg.adapters, cfg.rank)
        self.file_mib = (workdir / self.files[0]).stat().st_size / 2**20
        for file in self.files:  # warm the page cache for both readers
            read_safetensors(str(workdir / file))
        print(f"  wrote {cfg.adapters} files ({self.file_mib:.2f} MiB each, rank {cfg.rank}, {self.n_targets} modules) "
              f"in {time.perf_counter() - t0:.0f} s", flush=True)
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(1, 4, cfg.latent, cfg.latent, generator=g)
        self.ehs = torch.randn(1, 77, cfg.size.unet["cross_attention_dim"], generator=g)
        self.t = torch.tensor([500])

    # -- calls ---------------------------------------------------------------------------------------
    def load(self, lib: str, i: int) -> float:
        pipe = self.pipes[lib]
        gc.collect()
        t0 = time.perf_counter()
        pipe.load_lora_weights(str(self.workdir), weight_name=self.files[i], adapter_name=f"a{i}")
        return time.perf_counter() - t0

    def switch(self, lib: str, name: str) -> float:
        pipe = self.pipes[lib]
        t0 = time.perf_counter()
        pipe.set_adapters([name], [1.0])
        return time.perf_counter() - t0

    def unload(self, lib: str) -> None:
        pipe = self.pipes[lib]
        pipe.unload_lora_weights()
        gc.collect()
        assert no_lora_left(pipe.unet), f"{lib}: unload_lora_weights left LoRA layers"

    def forward(self, which: str) -> torch.Tensor:
        unet = self.base if which == "base" else self.pipes[which].unet
        with torch.no_grad():
            return unet(self.x, self.t, encoder_hidden_states=self.ehs).sample

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print("  " + format_row_text(row), flush=True)

    # -- figures ---------------------------------------------------------------------------------------
    def switch_samples(self, names: list[str], libs=(LL, DP)) -> dict[str, list[float]]:
        out = {lib: [] for lib in libs}
        for lib in libs:  # untimed warm-up
            for name in names[:2]:
                self.switch(lib, name)
        gc.collect()
        for i in range(self.cfg.switch_calls):
            for lib in (libs if i % 2 == 0 else libs[::-1]):
                out[lib].append(self.switch(lib, names[i % len(names)]))
        return out

    def forward_samples(self, label: str) -> dict[str, list[float]]:
        outs = {w: self.forward(w) for w in ("base", LL, DP)}  # warm-up, and the outputs for the checks
        diff = (outs[LL] - outs[DP]).abs().max().item()
        moved = (outs[LL] - outs["base"]).abs().max().item()
        self.checks.append(f"UNet output, a0 active, {label}: max |{LL} - {DP}| = {diff:.2e} (the adapter moves it by {moved:.2e})")
        print("  " + self.checks[-1], flush=True)
        self.outputs[label] = outs[LL]
        samples = {"base": [], LL: [], DP: []}
        perms = [("base", LL, DP), (DP, "base", LL), (LL, DP, "base")]
        for r in range(self.cfg.forward_repeats):
            for which in perms[r % 3]:
                samples[which].append(timed(lambda: self.forward(which))[0])
        return samples

    def run(self) -> None:
        cfg, n = self.cfg, self.cfg.adapters
        started = time.perf_counter()
        # Warm-up: imports and first-call caches of both libraries, on the same pipelines.
        for lib in (LL, DP):
            self.load(lib, 0)
            self.unload(lib)
        loads = {LL: [], DP: [], "cap": []}  # per round: [seconds for load 1..n]
        kept = {LL: [], DP: []}  # RSS kept by each load (bytes)
        switch2 = None
        # Round 1: both libraries, adapter by adapter, alternating which goes first.
        print(f"\n== loading {n} adapters into both pipelines, alternating", flush=True)
        ts = {LL: [], DP: []}
        for i in range(n):
            for lib in ((LL, DP) if i % 2 == 0 else (DP, LL)):
                before = rss()
                ts[lib].append(self.load(lib, i))
                kept[lib].append(rss() - before)
                self.pipes[lib].set_adapters([f"a{i}"], [1.0])
            if i == 0:
                print("  1 loaded: forward", flush=True)
                fwd1 = self.forward_samples("1 loaded")
            if i == 1:
                switch2 = self.switch_samples(["a0", "a1"])
            if (i + 1) % 10 == 0:
                print(f"  {i + 1} loaded: {LL} {ts[LL][-1] * 1e3:.0f} ms, {DP} {ts[DP][-1] * 1e3:.0f} ms per load "
                      f"({time.perf_counter() - started:.0f} s so far)", flush=True)
        for lib in (LL, DP):
            loads[lib].append(ts[lib])
        bytes_per = {LL: [ll_bytes(self.pipes[LL].unet, f"a{i}") for i in range(n)],
                     DP: [peft_bytes(self.pipes[DP].unet, f"a{i}") for i in range(n)]}
        print(f"\n== {n} loaded: switch and forward", flush=True)
        switch50 = self.switch_samples(["a0", "a1"])
        for lib in (LL, DP):
            self.pipes[lib].set_adapters(["a0"], [1.0])
        fwd50 = self.forward_samples(f"{n} loaded")
        same = torch.equal(self.outputs["1 loaded"], self.outputs[f"{n} loaded"])
        self.checks.append(f"{LL}: UNet output with a0 active is bit-identical with 1 and with {n} loaded: {same}")
        print("  " + self.checks[-1], flush=True)
        # The cap, with the 50 loaded: switching between two resident adapters, and round-robin.
        ll = self.pipes[LL]
        ll.set_max_resident_adapters(cfg.cap)
        resident_bytes = self._resident_bytes(bytes_per[LL])
        cap_two = self.switch_samples(["a0", "a1"], libs=(LL,))[LL]
        ring = [f"a{i}" for i in range(2 * cfg.cap)]
        cap_ring = self.switch_samples(ring, libs=(LL,))[LL]
        state = ll.lora_residency()
        self.checks.append(f"{LL} with max_resident_adapters={cfg.cap}: {len(state['resident'])} resident, "
                           f"{len(state['parked'])} parked after the round-robin")
        print("  " + self.checks[-1], flush=True)
        ll.set_max_resident_adapters(None)
        # More lora_loader load rounds: without the cap, then with it.
        for r in range(cfg.ll_rounds - 1 + cfg.cap_rounds):
            capped = r >= cfg.ll_rounds - 1
            self.unload(LL)
            ll.set_max_resident_adapters(cfg.cap if capped else None)
            ts = []
            for i in range(n):
                ts.append(self.load(LL, i))
                ll.set_adapters([f"a{i}"], [1.0])
            loads["cap" if capped else LL].append(ts)
            print(f"  {LL} round {r + 2}{' (cap ' + str(cfg.cap) + ')' if capped else ''}: 1st {ts[0] * 1e3:.0f} ms, "
                  f"{n}th {ts[-1] * 1e3:.0f} ms", flush=True)
            if capped:
                state = ll.lora_residency()
                assert len(state["resident"]) == cfg.cap, state
        ll.set_max_resident_adapters(None)
        for r in range(cfg.peft_rounds - 1):
            self.unload(DP)
            ts = []
            for i in range(n):
                ts.append(self.load(DP, i))
                self.pipes[DP].set_adapters([f"a{i}"], [1.0])
            loads[DP].append(ts)
        self.report(loads, kept, bytes_per, resident_bytes, switch2, switch50, cap_two, cap_ring, fwd1, fwd50)

    def _resident_bytes(self, per: list[int]) -> dict[str, int]:
        state = self.pipes[LL].lora_residency()
        index = {f"a{i}": b for i, b in enumerate(per)}
        return {"resident": sum(index[n] for n in state["resident"]), "parked": sum(index[n] for n in state["parked"]),
                "n_resident": len(state["resident"])}

    # -- the table ------------------------------------------------------------------------------------------
    def report(self, loads, kept, bytes_per, resident_bytes, switch2, switch50, cap_two, cap_ring, fwd1, fwd50) -> None:
        cfg, n = self.cfg, self.cfg.adapters
        ks = [k for k in (1, 10, 25, 50) if k <= n] if n >= 50 else sorted({1, max(2, n // 2), n})

        def at(rounds_, k):
            return [ts[i - 1] for ts in rounds_ for i in window(k, n)]

        for k in ks:
            self.add(Row("load", f"load_lora_weights of adapter {k} ({k - 1} loaded)", "ms", at(loads[LL], k), at(loads[DP], k), DP))
        for k in ks[1:]:
            self.add(Row("load", f"with max_resident_adapters={cfg.cap}: adapter {k}", "ms", at(loads["cap"], k), None, ""))
        mid = ks[1]
        flat = {lib: [med([ts[i - 1] for i in window(n, n)]) / med([ts[i - 1] for i in window(mid, n)]) for ts in loads[lib]]
                for lib in (LL, DP, "cap")}
        self.add(Row("load", f"load of adapter {n} / load of adapter {mid} (per round)", "x", flat[LL], flat[DP], DP, kind="plain"))
        self.add(Row("load", f"the same with max_resident_adapters={cfg.cap}", "x", flat["cap"], None, "", kind="plain"))
        self.add(Row("switch", "set_adapters between two adapters, 2 loaded", "ms", switch2[LL], switch2[DP], DP))
        self.add(Row("switch", f"set_adapters between two adapters, {n} loaded", "ms", switch50[LL], switch50[DP], DP))
        self.add(Row("switch", f"{n} loaded / 2 loaded (medians)", "x", [med(switch50[LL]) / med(switch2[LL])],
                     [med(switch50[DP]) / med(switch2[DP])], DP, kind="plain"))
        self.add(Row("switch", f"with max_resident_adapters={cfg.cap}: between two resident adapters, {n} loaded", "ms", cap_two, None, ""))
        self.add(Row("switch", f"with max_resident_adapters={cfg.cap}: round-robin over {2 * cfg.cap} (each call brings one "
                     "back and parks one)", "ms", cap_ring, None, ""))
        self.add(Row("forward", f"reference: base UNet forward 1x4x{cfg.latent}x{cfg.latent}", "s", None, fwd1["base"] + fwd50["base"], "base model", kind="plain"))
        self.add(Row("forward", "UNet forward, a0 active, 1 loaded", "s", fwd1[LL], fwd1[DP], DP))
        self.add(Row("forward", f"UNet forward, a0 active, {n} loaded", "s", fwd50[LL], fwd50[DP], DP))
        self.add(Row("forward", f"{n} loaded / 1 loaded (medians)", "x", [med(fwd50[LL]) / med(fwd1[LL])],
                     [med(fwd50[DP]) / med(fwd1[DP])], DP, kind="plain"))
        mib = 2**20
        self.add(Row("memory", "tensor bytes of one adapter (MiB)", "MiB", [b / mib for b in bytes_per[LL]],
                     [b / mib for b in bytes_per[DP]], DP, kind="plain"))
        early, late = slice(1, 11), slice(n - 10, n)
        self.add(Row("memory", "RSS kept per load, loads 2-11 (MiB)", "MiB", [b / mib for b in kept[LL][early]],
                     [b / mib for b in kept[DP][early]], DP, kind="plain"))
        self.add(Row("memory", f"RSS kept per load, loads {n - 9}-{n} (MiB)", "MiB", [b / mib for b in kept[LL][late]],
                     [b / mib for b in kept[DP][late]], DP, kind="plain"))
        self.add(Row("memory", f"RSS kept by all {n} loads (MiB)", "MiB", [sum(kept[LL]) / mib], [sum(kept[DP]) / mib], DP, kind="plain"))
        total = sum(bytes_per[LL])
        self.add(Row("memory", f"adapter bytes on the model's device, {n} loaded, no cap (MiB)", "MiB", [total / mib], None, "", kind="plain"))
        self.add(Row("memory", f"the same with max_resident_adapters={cfg.cap}: {resident_bytes['n_resident']} resident (MiB)", "MiB",
                     [resident_bytes["resident"] / mib], None, "", kind="plain"))
        self.file_total = total

    def markdown(self, info: dict, argv: list[str], elapsed: float) -> str:
        cfg, n = self.cfg, self.cfg.adapters
        lines = [
            START,
            f"## {n} adapters",
            "",
            f"Written by `{' '.join(['python', 'benchmarks/many_adapters.py'] + argv)}` ({cfg.name} sizes, {elapsed / 60:.1f} min) on "
            f"{info['date']}: {info['cpu']}, {info['nproc']} cores, {info['memory']}, torch {info['torch']} with "
            f"{info['torch threads']} thread, diffusers {info['diffusers']}, peft {info['peft']}, lora_loader {info['lora_loader commit']}, "
            f"load average at start {info['load average at start']}.",
            "",
            f"The SD 1.5 UNet ({self.n_params / 1e6:.0f} M parameters, fp32, seeded random weights) in a StableDiffusionPipeline, "
            f"and {n} LoRA files in the diffusers/PEFT layout (`unet.*.lora_A/lora_B.weight`, fp16, rank {cfg.rank}, "
            f"{self.file_mib:.2f} MiB each) on the {self.n_targets} attention projections (`to_q/k/v/out.0` of attn1 and attn2), "
            f"loaded by both libraries into identical pipelines in one process. Each cell: median [min – max]; ratio: how many "
            f"times faster lora_loader is. See `benchmarks/README.md`.",
            "",
            f"| figure | what | {LL} | other library | other | ratio |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for row in self.rows:
            lines.append(
                f"| {row.figure} | {row.what} | {fmt_stats(row.ll, row.unit) if row.ll else '-'} | {row.other_name or '-'} | "
                f"{fmt_stats(row.other, row.unit) if row.other else '-'} | {ratio_text(row)} |"
            )
        lines += ["", "Checks:", ""] + [f"- {c}" for c in self.checks]
        lines += [
            "",
            "How it was measured:",
            "",
            f"- load: each load is followed by an untimed `set_adapters([new])`, so one adapter is active when the next "
            f"loads. Adapter 1 is the first load into a UNet without LoRA (both libraries wrap or inject the layers then); "
            f"adapter k > 1 is the median over loads {window(10, n)[0]}..{window(10, n)[-1]} for k = 10 and likewise k-2..k+2 "
            f"(the last five for k = {n}). {LL}: {cfg.ll_rounds} rounds without the cap (`unload_lora_weights` between rounds) "
            f"and {cfg.cap_rounds} with it; {DP}: {cfg.peft_rounds} round, alternating with {LL}'s first round adapter by adapter "
            f"({DP}'s {n} loads take minutes, so it is not repeated).",
            f"- switch: `set_adapters([x], [1.0])`, x alternating between two adapters, {cfg.switch_calls} calls per library "
            f"and state, each timed on its own, the libraries alternating call by call.",
            f"- forward: UNet only, batch 1, 1x4x{cfg.latent}x{cfg.latent} latents, 77 tokens, `torch.no_grad()`, one untimed "
            f"warm-up per state, {cfg.forward_repeats} rounds rotating the order of base / {LL} / {DP}.",
            "- memory: tensor bytes are summed over each adapter's tensors (lora_loader keeps the file's fp16 factors, which "
            "convert exactly to the fp32 model; peft holds them in fp32). RSS kept per load is VmRSS after the load minus "
            "before it, each after `gc.collect()` and `malloc_trim`.",
            f"- the cap (`set_max_resident_adapters({cfg.cap}, park_device='cpu')`): this machine has no GPU, so the park device "
            "is the device the model computes on and a park or a return moves no bytes; the switch rows with the cap show the "
            "policy's own cost (the LRU bookkeeping and the per-layer `.to()` calls, which are no-ops here), and the last memory "
            "row is what the cap would keep on an accelerator (the resident adapters' bytes), not a measured RSS change. On a "
            "GPU each return also copies one adapter's bytes from the CPU (here "
            f"{fmt_value(self.file_total / n / 2**20, 'MiB')}).",
            END,
        ]
        return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller UNet and 12 adapters: a smoke run (prints only)")
    p.add_argument("--adapters", type=int, default=None, help="how many adapters (default 50)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank of the files (default 8)")
    p.add_argument("--cap", type=int, default=None, help="max_resident_adapters for the cap figures (default 4)")
    p.add_argument("--peft-rounds", dest="peft_rounds", type=int, default=None, help="diffusers+peft load rounds (default 1)")
    p.add_argument("--forward-repeats", dest="forward_repeats", type=int, default=None, help="forward rounds per state (default 3)")
    p.add_argument("--out", default=None, help="markdown file whose '50 adapters' section to write "
                   "(default benchmarks/RESULTS.md for a full run; --quick writes only with --out)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    args.argv = list(argv)
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_libraries()
    cfg = configs(args)
    started = time.perf_counter()
    info = machine()
    print("machine: " + ", ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="lora-many-"))
    try:
        b = Bench(cfg, workdir)
        b.run()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.perf_counter() - started
    text = b.markdown(info, args.argv, elapsed)
    print("\n" + text)
    out = args.out or (None if args.quick else str(HERE / "RESULTS.md"))
    if out:
        write_section(Path(out), text, START, END)
        print(f"wrote the section into {out}")
    print(f"total {elapsed / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
