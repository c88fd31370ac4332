"""Hotswap adapters under torch.compile: swap a LoRA's tensors in place, no recompilation.

Runs offline on the embedded shapes model (``--model`` takes a diffusers folder or Hub id
and ``--lora`` two files of your own instead). ``lora_loader.prepare_hotswap`` pads the loaded
adapter to ``--max-rank`` before compiling, so any file up to that rank swaps in with
``load_lora_weights(..., hotswap=True)``; torch._dynamo's counters show nothing recompiled.

Run:  python examples/hotswap_compile.py [--backend inductor|aot_eager|eager]
"""

from __future__ import annotations

import argparse

import torch
from torch._dynamo.utils import counters

import lora_loader
from lora_loader import embedded


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor needs a C++ compiler)")
    parser.add_argument("--max-rank", type=int, default=16)
    parser.add_argument("--model", help="a diffusers folder or Hub id (default: the embedded model)")
    parser.add_argument("--lora", nargs=2, metavar=("FIRST", "SECOND"), help="two LoRA files (default: the embedded adapters)")
    parser.add_argument("--prompt", default="a red circle on a blue background")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)

    if args.model:
        from diffusers import DiffusionPipeline

        pipe = lora_loader.attach(DiffusionPipeline.from_pretrained(args.model))
    else:
        pipe = embedded.load_pipeline()
    first, second = args.lora or (embedded.adapter_path("neon"), embedded.adapter_path("pastel"))

    pipe.load_lora_weights(first, adapter_name="style")
    lora_loader.prepare_hotswap(pipe, max_rank=args.max_rank)  # before compiling
    pipe.unet = torch.compile(pipe.unet, backend=args.backend)

    def render():
        return pipe(args.prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0)).images[0]

    before = render()  # compiles
    frames = counters["frames"]["total"]
    pipe.load_lora_weights(second, adapter_name="style", hotswap=True)  # same slot, new tensors
    after = render()
    recompiled = counters["frames"]["total"] - frames
    changed = before.tobytes() != after.tobytes()
    print(f"frames compiled after the swap: {recompiled} | the image changed: {changed}")
    return {"recompiled_frames": recompiled, "changed": changed}


if __name__ == "__main__":
    main()
