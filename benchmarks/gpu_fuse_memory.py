"""Peak accelerator memory of ``fuse_lora`` with each ``keep_originals`` mode, on a GPU machine (issue 22 item 2).

```bash
python benchmarks/gpu_fuse_memory.py                 # CUDA: fp16 and bf16, ~1 min on one GPU
python benchmarks/gpu_fuse_memory.py --smoke         # CPU, tiny: checks the script runs (no GPU figures)
```

A stand-in for a DiT's targeted linears at Flux.1-dev's width (hidden 3072, MLP 12288):
``--blocks`` blocks of q, k, v, out (3072x3072) and the MLP's two (3072x12288, 12288x3072),
rank-32 LoRA on each, on one CUDA device. For each dtype and mode it prints the bytes
``torch.cuda.max_memory_allocated`` rose to above the model during the fuse (the fused
copies with ``"device"``; one layer's temporary with ``"cpu"`` / ``"disk"``), the fuse and
unfuse times, and whether unfuse gave every weight back bit for bit (``torch.equal``, also
after fuse -> disable_lora -> enable_lora). Last, ``"auto"`` on a card made short: a filler
tensor leaves free less than the fused copies need, and the fuse must park the originals
in CPU memory rather than run out of memory. Prints only; nothing is written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's lora_loader

import torch  # noqa: E402

import lora_loader  # noqa: E402
from lora_loader import fuse  # noqa: E402


def build(blocks: int, hidden: int, mlp: int, dtype: torch.dtype, device: str, rank: int = 32):
    shapes = [(hidden, hidden)] * 4 + [(mlp, hidden), (hidden, mlp)]
    layers = [torch.nn.Linear(i, o, bias=True, device=device, dtype=dtype) for _ in range(blocks) for o, i in shapes]
    model = lora_loader.attach(torch.nn.Sequential(*layers))
    g = torch.Generator(device="cpu").manual_seed(0)
    lora = {}
    for n, layer in enumerate(layers):
        lora[f"{n}.lora_A.weight"] = (torch.randn(rank, layer.in_features, generator=g) / layer.in_features**0.5).to(dtype)
        lora[f"{n}.lora_B.weight"] = (torch.randn(layer.out_features, rank, generator=g) * 0.01).to(dtype)
    model.load_lora_weights(lora, adapter_name="a")
    return model


def weights(model) -> list[torch.Tensor]:
    return [m.weight for m in model]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(model, mode: str, device: str, originals: list[torch.Tensor]) -> dict:
    """One fuse, its peak memory over the model's, one disable/enable, one unfuse; bit-exactness checked."""
    sync(device)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    model.fuse_lora(keep_originals=mode)
    sync(device)
    t_fuse = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - before if device == "cuda" else float("nan")
    held = torch.cuda.memory_allocated() - before if device == "cuda" else float("nan")
    kept = {m.__dict__["_lora_fusion"].kept for m in model}
    model.disable_lora()
    disabled_exact = all(torch.equal(w.cpu(), o) for w, o in zip(weights(model), originals))
    model.enable_lora()
    sync(device)
    t0 = time.perf_counter()
    model.unfuse_lora()
    sync(device)
    t_unfuse = time.perf_counter() - t0
    exact = all(torch.equal(w.cpu(), o) for w, o in zip(weights(model), originals))
    return dict(kept="/".join(sorted(kept)), peak=peak, held=held, fuse=t_fuse, unfuse=t_unfuse, exact=exact and disabled_exact)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: check the script runs")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("needs CUDA (use --smoke to check the script on CPU)")
    hidden, mlp, blocks = (64, 256, 2) if args.smoke else (3072, 12288, args.blocks)
    gib = 2**30
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}")
    print(f"{blocks} blocks x (4 x {hidden}x{hidden} + {mlp}x{hidden} + {hidden}x{mlp}), rank-32 LoRA on each\n")
    print("| dtype | keep_originals | kept | targeted | peak over the model during fuse | held after fuse | fuse | unfuse | bit-exact |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for dtype in (torch.float16, torch.bfloat16):
        model = build(blocks, hidden, mlp, dtype, device)
        originals = [w.detach().cpu().clone() for w in weights(model)]
        targeted = sum(w.numel() * w.element_size() for w in weights(model))
        for mode in ("device", "cpu", "disk", "auto"):
            r = measure(model, mode, device, originals)
            print(f"| {str(dtype).split('.')[-1]} | {mode} | {r['kept']} | {targeted / gib:.2f} GiB | {r['peak'] / gib:.2f} GiB "
                  f"| {r['held'] / gib:.2f} GiB | {r['fuse']:.2f} s | {r['unfuse']:.3f} s | {r['exact']} |", flush=True)
        if device == "cuda":  # "auto" on a card without room for the fused copies
            torch.cuda.empty_cache()
            free, _ = torch.cuda.mem_get_info()
            filler = torch.empty(max(0, free - targeted // 2), dtype=torch.uint8, device=device)
            print(f"| {str(dtype).split('.')[-1]} | auto, {torch.cuda.mem_get_info()[0] / gib:.2f} GiB free (filler) | ", end="")
            try:
                r = measure(model, "auto", device, originals)
                print(f"{r['kept']} | {targeted / gib:.2f} GiB | {r['peak'] / gib:.2f} GiB | {r['held'] / gib:.2f} GiB "
                      f"| {r['fuse']:.2f} s | {r['unfuse']:.3f} s | {r['exact']} |", flush=True)
            except torch.OutOfMemoryError as e:
                print(f"OUT OF MEMORY: {str(e).splitlines()[0]} |", flush=True)
            del filler
        del model, originals
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"\nauto's margin: max({fuse.AUTO_MARGIN_BYTES / gib:.0f} GiB, {fuse.AUTO_MARGIN_FRACTION:.0%} of the fused copies)")


if __name__ == "__main__":
    main()
