"""The shared harness of the benchmarks: environment, alternating rounds, timing, profiles, the machine.

Importing it first sets up what every benchmark needs before torch and the
libraries load: this checkout's lora_loader on the path, no Hub access, quiet
libraries. Both libraries always run in the same process, in `rounds` whose
order flips every round.
"""

from __future__ import annotations

import contextlib
import cProfile
import ctypes
import datetime
import gc
import os
import platform
import pstats
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # the lora_loader of this checkout, installed or not

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402


def quiet_libraries() -> None:
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for log in (dlog, tlog):
        log.set_verbosity_error()
        log.disable_progress_bar()


LL = "lora_loader"
DP = "diffusers+peft"
TP = "transformers+peft"
ST = "safetensors read"

# -- timing -------------------------------------------------------------------------------------------


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
    """safetensors' own read. In safetensors 0.8 its tensors are views of a memory map of the file: no byte
    is read until one is used."""
    from safetensors.torch import load_file

    return load_file(path)


def read_safetensors_owned(path: str) -> dict:
    """The same read with every tensor copied into memory the process owns, as a loaded adapter must hold
    it (a file rewritten or truncated later must not change or crash it): the bytes read, not mapped."""
    return {key: tensor.clone() for key, tensor in read_safetensors(path).items()}


def rounds(n: int):
    """Round r, and the library order for it: alternates every round."""
    for r in range(n):
        yield r, (LL, "other") if r % 2 == 0 else ("other", LL)


# -- profiles -----------------------------------------------------------------------------------------


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


# -- memory ---------------------------------------------------------------------------------------------


def trim() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim), so RSS readings see what is really held."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def proc_status(field_name: str) -> int:
    """A /proc/self/status field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field_name)


# -- the machine ----------------------------------------------------------------------------------------


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
