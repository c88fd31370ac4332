"""The ``lm`` figures: a 1.1 B Llama, lora_loader against transformers' own ``load_adapter`` (peft underneath).

`load_adapter` of a PEFT folder against the file read, switching between two
loaded adapters, and a forward with 1 and 2 adapters, on one `LMBench`.
"""

from __future__ import annotations

import copy
import gc
import os
import time
from pathlib import Path

import torch

from harness import LL, TP, profile, profile_lines, read_safetensors, read_safetensors_owned, rounds, time_each, timed, trim
from report import read_target_note, Report, Row, faster_text, med, verdict
from workloads import Size, build_llama, no_lora_left, peft_layer_counts, remove_peft, write_peft_adapters


def fig_lm(size: Size, args, report: Report, workdir: Path) -> None:
    lm = LMBench(size, args, report, workdir)
    lm_load(lm)
    lm_switch(lm)
    lm_forward(lm)
    lm.close()
    del lm
    gc.collect()
    trim()


class LMBench:
    """The base Llama, a lora_loader copy and a transformers+peft copy, and two PEFT adapter folders made by peft."""

    def __init__(self, size: Size, args, report: Report, workdir: Path):
        import lora_loader

        self.size, self.report = size, report
        self.repeats = args.repeats or size.repeats
        t0 = time.perf_counter()
        print(f"\n== lm: Llama ({size.name}), PEFT adapter rank {size.lm_rank} on all linear layers; building 3 copies ...", flush=True)
        self.base = build_llama(size, 3)
        n_params = sum(p.numel() for p in self.base.parameters())
        self.folders = [str(workdir / f"peft_llama_{name}") for name in ("x", "y")]
        write_peft_adapters(self.base, self.folders, size.lm_rank, seed=40)
        assert no_lora_left(self.base)
        self.ll = lora_loader.attach(copy.deepcopy(self.base))
        self.tp = copy.deepcopy(self.base)
        self.models = {LL: self.ll, "other": self.tp}
        self.adapter_file = os.path.join(self.folders[0], "adapter_model.safetensors")
        self.file_mib = os.path.getsize(self.adapter_file) / 2**20
        for folder in self.folders:
            read_safetensors(os.path.join(folder, "adapter_model.safetensors"))
        print(f"  built in {time.perf_counter() - t0:.1f} s: {n_params / 1e9:.2f} B params; adapter file {self.file_mib:.1f} MiB (fp32)", flush=True)
        self.what = f"{n_params / 1e9:.2f} B Llama"
        self.reports = {}

    def load(self, lib, folder, name):
        dt, self.reports[lib] = timed(lambda: self.models[lib].load_adapter(folder, adapter_name=name))
        return dt

    def unload(self, lib):
        if lib == LL:
            self.ll.unload_lora_weights()
        else:
            remove_peft(self.tp)
        gc.collect()
        assert no_lora_left(self.models[lib])

    def close(self) -> None:
        self.models.clear()
        self.ll = self.tp = self.base = None


def lm_load(lm: LMBench) -> None:
    """``load_adapter`` of the PEFT folder, against the safetensors read of its file."""
    ll, tp, folders, report, repeats = lm.ll, lm.tp, lm.folders, lm.report, lm.repeats
    load, unload, reports = lm.load, lm.unload, lm.reports
    adapter_file, file_mib, what = lm.adapter_file, lm.file_mib, lm.what
    times, reads, owned_reads = {LL: [], "other": []}, [], []
    cold = {lib: load(lib, folders[0], "x") for lib in (LL, "other")}  # untimed warm-up round
    counts = {LL: sum(reports[LL].modules.values()), "other": peft_layer_counts(tp, "x", ("model",)).get("model", 0)}
    line = f"LM adapter modules injected: {LL} {counts[LL]}, {TP} {counts['other']}"
    report.checks.append(line)
    print("  " + line, flush=True)
    for lib in (LL, "other"):
        unload(lib)
    for r, order in rounds(repeats):
        reads.append(timed(lambda: read_safetensors(adapter_file))[0])
        owned_reads.append(timed(lambda: read_safetensors_owned(adapter_file))[0])
        for lib in order:
            times[lib].append(load(lib, folders[0], "x"))
        for lib in order:
            unload(lib)
        print(f"  round {r + 1}: {LL} {times[LL][-1]:.3f} s | {TP} {times['other'][-1]:.3f} s | read {reads[-1]:.3f} s", flush=True)
    report.add(Row("lm", f"reference: safetensors read of the adapter file ({file_mib:.1f} MiB, warm)", "s", None, reads, "safetensors", kind="plain"))
    report.add(Row("lm", "reference: the same read with each tensor copied into memory the process owns (the bytes read, not mapped)",
                   "s", None, owned_reads, "safetensors + copy", kind="plain"))
    l1, o1, st, owned = med(times[LL]), med(times["other"]), med(reads), med(owned_reads)
    ok_read, ok_speed = l1 <= 2 * st, o1 / l1 >= 5
    report.add(Row(
        "lm", f"load_adapter, {what}", "s", times[LL], times["other"], TP,
        target="<= 2x the safetensors read, and >= 5x faster than transformers+peft", met=ok_read and ok_speed,
        verdict="; ".join([
            verdict(ok_read, f"{l1 / st:.2f}x the read" + ("" if ok_read else f" (target 2x: {l1 / (2 * st):.2f}x over)")
                    + f" ({l1 / owned:.2f}x the read that copies the bytes)"),
            verdict(ok_speed, faster_text(o1 / l1)),
        ]),
    ))
    if not ok_read:
        report.notes.append(read_target_note("the LM load_adapter", l1, st, owned, sum(reports[LL].modules.values())))
    if not (ok_read and ok_speed):
        prof = profile(lambda: ll.load_adapter(folders[0], adapter_name="x"))
        unload(LL)
        report.rows[-1].profile = ["one load_adapter of the PEFT folder:"] + profile_lines(prof)
    report.add(Row("lm", "the very first load_adapter in the process (warm-up, not in the medians)", "s", [cold[LL]], [cold["other"]], TP))


def lm_switch(lm: LMBench) -> None:
    """``set_adapter`` between two loaded adapters, ``disable_adapters``, ``enable_adapters``."""
    ll, models, folders, report, repeats, load = lm.ll, lm.models, lm.folders, lm.report, lm.repeats, lm.load
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


def lm_forward(lm: LMBench) -> None:
    """A forward with 1 and with 2 adapters active, against the base model in the same rounds."""
    size, base, ll, tp, models, report, repeats = lm.size, lm.base, lm.ll, lm.tp, lm.models, lm.report, lm.repeats
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
