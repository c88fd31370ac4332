"""The ``rss`` figure: the peak RSS a load adds, each measurement in a fresh child process (run.py --rss-child)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from harness import DP, HERE, LL, proc_status, quiet_libraries, read_safetensors, rounds, trim
from report import Report, Row, med, verdict
from workloads import FULL, QUICK, Size, build_text_encoder, build_unet, kohya_targets, make_pipeline, write_kohya


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
            cmd = [sys.executable, str(HERE / "run.py"), "--rss-child", lib, "--rss-size", size.name, "--rss-file", path, "--rss-warm", warm]
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
