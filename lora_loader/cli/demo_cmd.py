"""``lora-loader demo [--llm]``: the offline demos (an image gallery; SmolLM2 with a pirate LoRA)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..demo_llm import run_llm_demo


def add_demo_parser(sub, debug: dict) -> None:
    """The ``demo`` sub-command's arguments."""
    p = sub.add_parser("demo", help="run the offline demo (images; --llm: SmolLM2 with a pirate LoRA)")
    p.add_argument("--llm", action="store_true", help="the causal-LM demo: base / adapter / blend / disabled on SmolLM2-135M")
    p.add_argument("--out", help="folder for the demo's output (images: default gallery/; --llm: optional JSON of the results)")
    p.add_argument("--steps", type=int, help="denoising steps (image demo; default: the demo's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per answer (--llm)")
    p.add_argument("--threads", type=int, help="torch threads (default: 1 with --llm, torch's default otherwise)")
    p.add_argument("--debug", **debug)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    """``lora-loader demo``: the image demo (`lora_loader.demo`), or with ``--llm`` the SmolLM2 one."""
    if args.threads is not None or args.llm:
        # SmolLM2 generates fastest on one thread on small shared machines (several threads fight over the
        # cores for such small matmuls), so --llm uses 1 unless told otherwise.
        torch.set_num_threads(args.threads or 1)
    if args.llm:
        run_llm_demo(max_new_tokens=args.max_new_tokens, out=args.out)
        return 0
    # The image demo (lora_loader/demo.py) is imported only when asked for: it brings PIL and the embedded
    # model's code, which the other commands do not need (and tests swap it in sys.modules).
    from ..demo import run_demo

    kwargs: dict[str, Any] = {"out": Path(args.out or "gallery"), "seed": args.seed}
    if args.steps is not None:  # else the demo's own default, tuned to its embedded model
        kwargs["steps"] = args.steps
    run_demo(**kwargs)
    return 0
