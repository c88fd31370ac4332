"""The ``switch`` figure: ``set_adapters`` / ``disable_lora`` / ``enable_lora`` with 1 and with 50 adapters loaded."""

from __future__ import annotations

from harness import DP, LL, profile, profile_lines, rounds, time_each
from report import Row, med, verdict
from sd_setup import SDBench


def fig_switch(sd: SDBench) -> None:
    size = sd.size
    print(f"\n== switch: set_adapters / disable_lora / enable_lora with 1 and {size.n_small} loaded (rank-{size.small_rank} adapters)", flush=True)
    inner = 10
    loads = {LL: [], "other": []}
    for lib in (LL, "other"):
        loads[lib].append(sd.load(lib, sd.small_files[0], "s0"))
    results = {}

    def measure(loaded: int) -> None:
        samples = {lib: {"set_adapters": [], "disable_lora": [], "enable_lora": []} for lib in (LL, "other")}
        for lib in (LL, "other"):  # untimed warm-up calls
            for _ in range(2):
                sd.pipes[lib].set_adapters(["s0"], [1.0])
                sd.pipes[lib].disable_lora()
                sd.pipes[lib].enable_lora()
        for r, order in rounds(sd.repeats):
            for lib in order:
                pipe = sd.pipes[lib]
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
            loads[lib].append(sd.load(lib, sd.small_files[i], f"s{i}"))
    n = size.n_small
    print(f"  loaded {n} small adapters: {LL} 1st {loads[LL][0]:.3f} s, {n}th {loads[LL][-1]:.3f} s | "
          f"{DP} 1st {loads['other'][0]:.3f} s, {n}th {loads['other'][-1]:.3f} s", flush=True)
    measure(n)
    profiles = {
        "set_adapters": profile(lambda: sd.ll.set_adapters(["s0"], [0.5]), calls=10),
        "disable_lora": profile(lambda: (sd.ll.disable_lora(), sd.ll.enable_lora()), calls=10),
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
            sd.report.add(row)
    sd.report.add(Row("switch", f"loading the {n}th small adapter / the 1st", "x",
                        [loads[LL][-1] / loads[LL][0]], [loads["other"][-1] / loads["other"][0]], DP, kind="plain"))
    for lib in (LL, "other"):
        sd.unload(lib)
