"""The ``load`` figure: ``load_lora_weights`` of a Kohya SD 1.5 file, adapters 1..10, against the file read."""

from __future__ import annotations

from harness import DP, LL, profile, profile_compare, profile_lines, read_safetensors, read_safetensors_owned, rounds, timed
from report import read_target_note, Row, faster_text, med, verdict
from sd_setup import SDBench


def fig_load(sd: SDBench) -> None:
    size, n = sd.size, sd.size.n_load
    print(f"\n== load: load_lora_weights of a {sd.file_mib:.0f} MiB Kohya SD 1.5 file, adapters 1..{n}, {sd.repeats} rounds", flush=True)
    times = {LL: [], "other": []}
    faults = {LL: [], "other": []}  # per round: minor page faults of the 1st and the nth load
    reads, owned_reads = [], []
    # An untimed warm-up round: the first loads in a process pay for imports, first-call caches and
    # fresh (page-faulted) memory. They are reported on their own row.
    cold = {}
    for lib in (LL, "other"):
        cold[lib] = [sd.load(lib, path, f"a{i}") for i, path in enumerate(sd.files[:2])]
        if lib == LL:
            first_report = sd.last_report
    sd.last_report = first_report
    sd.check_same_modules("a0")
    for lib in (LL, "other"):
        sd.unload(lib)
    print(f"  warm-up: {LL} 1st {cold[LL][0]:.3f} s | {DP} 1st {cold['other'][0]:.3f} s", flush=True)
    for r, order in rounds(sd.repeats):
        reads.append(timed(lambda: read_safetensors(sd.files[0]))[0])
        for lib in order:
            ts, fs = [], []
            for i, path in enumerate(sd.files):
                ts.append(sd.load(lib, path, f"a{i}"))
                fs.append(sd.last_faults)
            times[lib].append(ts)
            faults[lib].append((fs[0], fs[-1]))
        for lib in order:
            sd.unload(lib)
        reads.append(timed(lambda: read_safetensors(sd.files[0]))[0])
        owned_reads.append(timed(lambda: read_safetensors_owned(sd.files[0]))[0])
        print(f"  round {r + 1}: {LL} 1st {times[LL][-1][0]:.3f} s, {n}th {times[LL][-1][-1]:.3f} s | "
              f"{DP} 1st {times['other'][-1][0]:.3f} s, {n}th {times['other'][-1][-1]:.3f} s | read {reads[-1]:.3f} s", flush=True)
    first = {lib: [ts[0] for ts in times[lib]] for lib in times}
    last = {lib: [ts[-1] for ts in times[lib]] for lib in times}
    growth = {lib: [ts[-1] / ts[0] for ts in times[lib]] for lib in times}
    rep = sd.report
    rep.add(Row("load", "reference: safetensors read of the same file (warm)", "s", None, reads, "safetensors", kind="plain"))
    rep.add(Row("load", "reference: the same read with each tensor copied into memory the process owns (the bytes read, not mapped)",
                "s", None, owned_reads, "safetensors + copy", kind="plain"))
    ll1, dp1, st, owned = med(first[LL]), med(first["other"]), med(reads), med(owned_reads)
    ok_read, ok_speed = ll1 <= 2 * st, dp1 / ll1 >= 5
    first_row = rep.add(Row(
        "load", f"load_lora_weights, 1st adapter ({sd.file_mib:.0f} MiB Kohya SD 1.5, rank {size.kohya_rank})", "s",
        first[LL], first["other"], DP,
        target="<= 2x the safetensors read, and >= 5x faster than diffusers+peft",
        met=ok_read and ok_speed,
        verdict="; ".join([
            verdict(ok_read, f"{ll1 / st:.2f}x the read" + ("" if ok_read else f" (target 2x: {ll1 / (2 * st):.2f}x over)")
                    + f" ({ll1 / owned:.2f}x the read that copies the bytes)"),
            verdict(ok_speed, faster_text(dp1 / ll1) + f" than {DP}"),
        ]),
    ))
    if not ok_read:
        rep.notes.append(read_target_note("the 1st load", ll1, st, owned, sum(sd.last_report.modules.values())))
    rep.add(Row("load", f"load_lora_weights, {n}th adapter ({n - 1} already loaded)", "s", last[LL], last["other"], DP))
    rep.add(Row("load", "the very first load in the process (warm-up round, not in the medians)", "s", [cold[LL][0]], [cold["other"][0]], DP))
    for which, label in ((0, "1st"), (1, f"{n}th")):
        rep.add(Row("load", f"minor page faults during the {label} load (fresh memory the kernel maps and zeroes)",
                    "count", [f[which] for f in faults[LL]], [f[which] for f in faults["other"]], DP, kind="plain"))
    # Where the time goes: one profiled sequence of lora_loader loads (1st and nth profiled).
    prof_first = profile(lambda: sd.ll.load_lora_weights(sd.files[0], adapter_name="a0"))
    for i in range(1, n - 1):
        sd.load(LL, sd.files[i], f"a{i}")
    prof_last = profile(lambda: sd.ll.load_lora_weights(sd.files[n - 1], adapter_name=f"a{n - 1}"))
    sd.unload(LL)
    first_row.profile = ["one load_lora_weights into a model with no adapter:"] + profile_lines(prof_first)
    g = med(growth[LL])
    if g > 1.10:
        rep.notes.append(
            f"Why the {n}th load is {g:.2f}x the 1st: each round's 1st load reuses memory the previous round's unload freed "
            f"(median {med([f[0] for f in faults[LL]]):.0f} minor page faults); the {n}th, with {n - 1} adapters held, gets part of "
            f"its memory fresh from the kernel, which maps and zeroes it (median {med([f[1] for f in faults[LL]]):.0f} page faults, "
            f"the page-fault rows). The rest is in the profile comparison: a load makes the new adapter the only active one, as "
            f"diffusers does, so the {n}th load also takes the previous adapter off its layers (`push`) where the 1st only "
            f"extends empty lists. diffusers+peft's {n}th load "
            f"is {med(growth['other']):.2f}x its 1st on the same sequence."
        )
    rep.add(Row(
        "load", f"{n}th load / 1st load (per round)", "x", growth[LL], growth["other"], DP, kind="plain",
        target="within 10% of the first (<= 1.10x)", met=g <= 1.10,
        verdict=verdict(g <= 1.10, f"{g:.2f}x" + ("" if g <= 1.10 else f" ({(g - 1.10) * 100:.0f} points over)")),
        profile=[f"what grows from the 1st load to the {n}th (one profiled sequence):"] + profile_compare(prof_first, prof_last, "1st", f"{n}th"),
    ))
