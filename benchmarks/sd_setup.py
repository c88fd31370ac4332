"""The SD 1.5 setup the load, switch, forward and fuse figures share: two identical pipelines and the files.

One `SDBench` builds the UNet and text encoder once (seeded weights), wraps
copies in a lora_loader pipeline and a diffusers+peft one, and writes the Kohya
files; the figures (bench_load.py, bench_switch.py, bench_forward.py,
bench_fuse.py) run on it one after another.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import time
from pathlib import Path

from harness import DP, LL, minor_faults, read_safetensors, timed, trim
from report import Report
from workloads import Size, build_text_encoder, build_unet, kohya_targets, make_pipeline, no_lora_left, peft_layer_counts, write_kohya


class SDBench:
    """The base UNet and text encoder, a lora_loader pipeline and a diffusers+peft one on copies of them, the files."""

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

    def ensure_ab(self) -> None:
        for lib, pipe in self.pipes.items():
            loaded = pipe.get_list_adapters().get("unet", [])
            for name, path in (("A", self.files[0]), ("B", self.files[1])):
                if name not in loaded:
                    self.load(lib, path, name)

    def close(self) -> None:
        for lib in list(self.pipes):
            with contextlib.suppress(Exception):
                self.pipes[lib].unload_lora_weights()
        self.pipes.clear()
        self.ll = self.dp = self.base_unet = self.base_te = None
        gc.collect()
        trim()
