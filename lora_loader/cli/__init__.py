"""The ``lora-loader`` command: inspect, convert, merge, generate, demo.

    lora-loader inspect FILE [--json [--compact]]
    lora-loader convert IN OUT --to kohya|diffusers|peft [--model MODEL] [--dtype keep|fp16|bf16|fp32] [--force]
    lora-loader merge FILE[:WEIGHT]... --to OUT [--combination-type linear|cat|svd|ties|dare_linear|...] [--density D]
                      [--svd-rank R] [--format kohya|diffusers|peft] [--model MODEL] [--seed N] [--force]
    lora-loader generate --model REPO_OR_FOLDER --prompt TEXT [--lora FILE[:WEIGHT]]... [--negative-prompt TEXT]
                         [--steps N] [--seed N] [--width W] [--height H] [--guidance-scale G] [--num-images N]
                         [--out PATH] [--device DEV] [--dtype fp16|bf16|fp32]
    lora-loader demo [--out gallery/] [--steps N] [--seed N]
    lora-loader demo --llm [--max-new-tokens N] [--threads N] [--out DIR]

Every command also takes ``--debug`` (show the traceback of an error). Errors
are one line on stderr, ``lora-loader: error: ...``, and a non-zero exit code.
``python -m lora_loader`` is the same command.

diffusers, transformers and accelerate are imported only by the command that
needs them (the lora_loader package itself brings torch).

One module per command: `inspect_cmd`, `convert_cmd`, `merge_cmd`, `generate_cmd`, `demo_cmd`,
each with its arguments (``add_*_parser``) and its ``cmd_*`` function; this
module builds the parser and turns every failure into one line.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Sequence

from .. import __version__
from ..families import FAMILY_LABELS, detect_family
from ..skeletons import SKELETONS, SkeletonPipeline, build_skeleton, skeleton_from_pretrained
from .convert_cmd import add_convert_parser, convert_lora
from .demo_cmd import add_demo_parser
from .generate_cmd import add_generate_parser, generate_images, parse_lora_arg
from .inspect_cmd import add_inspect_parser, format_inspection, inspect_lora
from .merge_cmd import add_merge_parser, merge_loras

# Besides main and build_parser, the public names `lora_loader.cli` held when it was one module (family
# detection and the skeletons now live in lora_loader.families and lora_loader.skeletons), so imports keep working.
__all__ = [
    "main", "build_parser", "inspect_lora", "format_inspection", "convert_lora", "merge_loras", "generate_images", "parse_lora_arg",
    "FAMILY_LABELS", "detect_family", "SKELETONS", "SkeletonPipeline", "build_skeleton", "skeleton_from_pretrained",
]  # fmt: skip

PROG = "lora-loader"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``lora-loader: error: ...``), as every other error is."""

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``lora-loader`` argument parser (one sub-command per task).

    >>> build_parser().parse_args(["inspect", "style.safetensors"]).file
    'style.safetensors'
    """
    parser = _Parser(prog=PROG, description="Inspect, convert and try LoRA adapters (lora_loader, no peft needed).")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    debug = dict(action="store_true", default=argparse.SUPPRESS, help="show the full traceback of an error")
    add_inspect_parser(sub, debug)
    add_convert_parser(sub, debug)
    add_merge_parser(sub, debug)
    add_generate_parser(sub, debug)
    add_demo_parser(sub, debug)
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError)) and err.filename and err.filename not in text:
        text = f"{text}: {err.filename}"
    if not text:
        text = type(err).__name__
    from_us = type(err).__module__.startswith("lora_loader") or isinstance(err, (OSError, ValueError))
    return text if from_us else f"{type(err).__name__}: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lora-loader`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    >>> main(["--version"])
    lora-loader ...
    0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors: argparse already printed
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    debug = bool(getattr(args, "debug", False))

    def show_warning(message, category, filename, lineno, file=None, line=None):
        # One line per warning (what lora_loader skipped, deprecations), not Python's two-line format.
        print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = show_warning
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            return int(args.func(args) or 0)
        except BrokenPipeError:
            # The reader went away (``lora-loader inspect x | head``): not an error of ours. Point stdout at
            # devnull so the interpreter's final flush does not raise again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 0
        except KeyboardInterrupt:
            if debug:
                raise
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except Exception as err:  # every failure is one line unless --debug: LoraError, OSError, ValueError, ...
            if debug:
                raise
            print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
            return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
