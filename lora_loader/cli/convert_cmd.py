"""``lora-loader convert IN OUT --to kohya|diffusers|peft``: rewrite a LoRA in another layout.

The file is loaded onto a model (``--model``, or the built-in skeleton of the
detected family, `lora_loader.skeletons`), saved with
``save_lora_weights(format=...)``, then reloaded and compared with the source.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from collections import Counter
from typing import Any

import torch

from ..errors import LoraError
from ..families import detect_family
from ..formats import convert
from ..hub import read_source
from ..skeletons import SKELETONS, build_skeleton, skeleton_from_pretrained
from .dtypes import TORCH_DTYPE_NAMES


def add_convert_parser(sub, debug: dict) -> None:
    """The ``convert`` sub-command's arguments."""
    p = sub.add_parser("convert", help="rewrite a LoRA in the Kohya, diffusers or PEFT layout",
                       description="Load IN onto a model (--model, or a built-in SD 1.5 / SD 2.1 / SDXL skeleton for "
                                   "the detected family) and save it with save_lora_weights(format=...). The result is "
                                   "reloaded and checked against the source before the command succeeds.")
    p.add_argument("input", metavar="IN", help="LoRA file or PEFT folder")
    p.add_argument("output", metavar="OUT", help="a .safetensors path, or a folder (PEFT: adapter_config.json + adapter_model.safetensors for a model)")
    p.add_argument("--to", required=True, choices=("kohya", "diffusers", "peft"), help="layout to write")
    p.add_argument("--model", help="diffusers pipeline or transformers model (folder or repo id in the HF cache) whose module names to use")
    p.add_argument("--dtype", default="keep", choices=("keep", "fp16", "bf16", "fp32"), help="tensor dtype of OUT (keep: the source's)")
    p.add_argument("--force", action="store_true", help="overwrite OUT")
    p.add_argument("--debug", **debug)
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    """``lora-loader convert``: `convert_lora`, and one line saying what was written."""
    result = convert_lora(args.input, args.output, args.to, model=args.model, dtype=args.dtype, force=args.force)
    modules = ", ".join(f"{c}: {n}" for c, n in result["modules"].items())
    print(f"wrote {result['written']} ({result['format_in']} -> {result['format_out']}, {modules}; "
          f"names resolved on the {result['model']}; reloaded and checked identical)")
    return 0


def convert_lora(src: str, dst: str, to: str, model: str | None = None, dtype: str = "keep", force: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Convert a LoRA between the Kohya, diffusers and PEFT layouts; returns what was done.

    Layouts name modules differently (Kohya mangles paths with underscores, SDXL
    Kohya files use Stability's block names), so the file is loaded onto a model
    and written back with ``save_lora_weights(format=to)``, which resolves every
    name through the live modules. The model is ``model`` (a pipeline or
    transformers model, built from its configs) or a built-in SD 1.5 / SD 2.1 /
    SDXL skeleton for the detected family. The written file is loaded back onto
    the same model and compared, factor by factor, with the source.

    Example (``style.safetensors``: a Kohya LoRA for SD 1.5, SD 2.1 or SDXL)::

        result = convert_lora("style.safetensors", "style-diffusers.safetensors", to="diffusers")
        result["format_in"], result["format_out"], result["verified"]  # ('kohya', 'diffusers', True)
    """
    if to not in ("kohya", "diffusers", "peft"):
        raise ValueError(f"--to {to!r}; expected kohya, diffusers or peft")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"OUT is the same path as IN ({dst}); write the conversion elsewhere")
    if os.path.exists(dst) and not force and not (os.path.isdir(dst) and not os.listdir(dst)):
        raise FileExistsError(f"{dst} exists; pass --force to overwrite it")
    timings: dict[str, float] = {}
    bar = _progress_bar(4, "convert") if progress else None
    try:
        return _convert(src, dst, to, model, dtype, timings, lambda name: _step(bar, name, timings))
    finally:
        if bar is not None:
            bar.close()


def _convert(src: str, dst: str, to: str, model: str | None, dtype: str, timings: dict[str, float], step) -> dict[str, Any]:
    """`convert_lora`'s work, one timed ``step`` each: read, build the model and load, save, verify."""
    with step("read"):
        source = read_source(src)
        converted = convert(source.tensors, source.metadata, source.adapter_config)
        family, _ = detect_family(converted.deltas, source.metadata, source.adapter_config)
    if converted.is_not_lora():  # the library's one decision, and its message
        raise converted.not_lora_error(source.name, source.tensors)
    if not converted.deltas and not converted.module_copies:  # LoRA keys, but no module to write out
        sample = sorted(source.tensors)[:3]
        raise LoraError(f"{source.name}: nothing to convert: no LoRA module among its {len(source.tensors)} keys (first: {sample})")
    if model is None and family == "causal-lm":
        model = (source.adapter_config or {}).get("base_model_name_or_path")
        if not model:
            raise ValueError(f"{src} is a causal-LM adapter without base_model_name_or_path; pass --model (a model folder or repo id)")
    with step("build model + load"):
        if model is not None:
            host = skeleton_from_pretrained(model, with_weights=bool(converted.base_weights))
            model_name = f"model {model}"
            report = host.load_lora_weights(src, adapter_name="source")
        else:
            host, model_name, report = _load_on_builtin(src, family)
    with step("save"):
        written = _save(host, dst, to, dtype, converted.deltas)
    with step("verify"):
        _verify(host, src, written, to, dtype, converted.deltas, model_name)
    return {
        "source": src,
        "written": written,
        "format_in": converted.format,
        "format_out": to,
        "family": family,
        "model": model_name,
        "modules": dict(report.modules),
        "verified": True,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
    }


def _load_on_builtin(src: str, family: str):
    """``(host, description, report)``: ``src`` loaded on the built-in skeleton of ``family``.

    A file whose widths did not tell SD 1.x from 2.x ("sd1/sd2") is tried on SD 1.5, then on
    SD 2.1 (their module names agree; shapes such as SD 2's linear ``proj_in`` do not).
    """
    first = None
    for candidate in ("sd1", "sd2") if family == "sd1/sd2" else (family,):
        host = build_skeleton(candidate)
        name = f"built-in {SKELETONS[candidate]['repo']} skeleton"
        try:
            return host, name, host.load_lora_weights(src, adapter_name="source")
        except LoraError as err:
            first = first or LoraError(f"{err} [converting against the {name}; pass --model if the file is for another model]")
    raise first


def _save(host, dst: str, to: str, dtype: str, source_deltas: dict) -> str:
    """Write the "source" adapter as ``to`` (in ``dtype``, or the source's factor dtype); returns the written path."""
    written = host.save_lora_weights(dst, adapter_name="source", format=to)
    # lora_loader keeps fp16/bf16 LoRA factors as they are, but LyCORIS kinds are held in the model's
    # dtype (fp32 here): store the output in the source's dtype, so a conversion does not grow the file.
    target = getattr(torch, TORCH_DTYPE_NAMES[dtype]) if dtype != "keep" else _factor_dtype(source_deltas)
    if target is not None:
        _rewrite_dtype(_weights_file(written), target)
    return written


def _verify(host, src: str, written: str, to: str, dtype: str, source_deltas: dict, model_name: str) -> None:
    """Load ``written`` back as adapter "written" and check it is the source's adapter; if not, remove it and raise."""
    try:
        host.load_lora_weights(written, adapter_name="written")
    except Exception as err:
        # lora_loader wrote a file it cannot read back (seen: format='diffusers' from a transformers model
        # writes 'model.<path>' keys that no reader resolves): never leave such a file behind.
        _remove_written(written)
        raise LoraError(
            f"lora_loader wrote {written} as {to!r} but cannot load it back, so it was removed "
            f"(a lora_loader bug; try another --to): {' '.join(str(err).split())[:300]}"
        ) from err
    # Module kinds of the model must be the file's: a Linear LoRA written for a 1x1 Conv2d model (or back)
    # would load in lora_loader but not in diffusers/peft. The down factors are the same in every layout.
    reread = read_source(written)
    written_deltas = convert(reread.tensors, reread.metadata, reread.adapter_config).deltas
    if _down_shapes(written_deltas) != _down_shapes(source_deltas):
        _remove_written(written)
        raise LoraError(
            f"the {model_name} has other module kinds than {src} was made for (Linear vs Conv2d factor shapes "
            "changed); removed the output; pass --model with the file's base model"
        )
    registry = host._lora_registry_to_read()
    first, second = registry.adapters["source"], registry.adapters["written"]
    paths_a = {(c, p) for c, p, _ in first.layers}
    paths_b = {(c, p) for c, p, _ in second.layers}
    if paths_a != paths_b:
        missing = sorted(f"{c}.{p}" for c, p in paths_a - paths_b)[:5]
        extra = sorted(f"{c}.{p}" for c, p in paths_b - paths_a)[:5]
        _remove_written(written)
        raise LoraError(f"the written file targets other modules than the source (missing {missing}, extra {extra}); removed it")
    exact = dtype == "keep"
    for component, path, module in first.layers:
        why = _same_adapter(module.lora_adapters["source"], module.lora_adapters["written"], exact)
        if why is not None:
            _remove_written(written)
            raise LoraError(f"the written file differs from the source on {component}.{path}: {why}; removed it")


def _factor_dtype(deltas: dict):
    """The one floating dtype of a file's LoRA factors, or None when they mix dtypes."""
    dtypes = {t.dtype for d in deltas.values() for t in (d.tensors() if hasattr(d, "tensors") else []) if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _rewrite_dtype(path: str, dtype) -> None:
    """Store every non-scalar floating tensor of a safetensors file in ``dtype`` (scalars are Kohya alphas: kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    changed = {k: (v.to(dtype) if v.is_floating_point() and v.dim() > 0 else v) for k, v in tensors.items()}
    if any(changed[k].dtype != tensors[k].dtype for k in tensors):
        save_file({k: v.contiguous() for k, v in changed.items()}, path, metadata=metadata)


def _weights_file(path: str) -> str:
    if os.path.isdir(path):
        for name in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
    return path


def _same_adapter(a, b, exact: bool) -> str | None:
    """None if two adapters on one layer hold the same delta (kind, scale, every factor); else what differs."""
    da, db = a.to_delta(), b.to_delta()
    kind_a, kind_b = getattr(da, "kind", "lora"), getattr(db, "kind", "lora")
    if kind_a != kind_b:
        return f"kind {kind_a} became {kind_b}"
    if kind_a == "lora" and da.down.shape != db.down.shape and da.down.dim() == db.down.dim() == 2:
        # A DiT's original names join q, k and v trained apart into one LoRA (stacked lora_down,
        # block-diagonal lora_up, as sd-scripts writes them): other factors and scale, the same product.
        pa, pb = da.scale * (da.up.float() @ da.down.float()), db.scale * (db.up.float() @ db.down.float())
        if not torch.allclose(pa, pb, rtol=1e-5 if exact else 1e-2, atol=1e-6 if exact else 1e-3):
            return f"its product up @ down differs (max abs {float((pa - pb).abs().max()):.3g})"
        return None
    if not math.isclose(da.scale, db.scale, rel_tol=1e-6):
        return f"scale {da.scale:g} became {db.scale:g}"
    if hasattr(da, "factors"):  # a LyCORIS kind: its factors by name, and dora_scale
        if set(da.factors) != set(db.factors):
            return f"factors {sorted(da.factors)} became {sorted(db.factors)}"
        pairs = [(da.factors[k], db.factors[k]) for k in da.factors] + [(da.dora_scale, db.dora_scale)]
    else:
        pairs = [(da.down, db.down), (da.up, db.up), (da.magnitude, db.magnitude), (da.bias, db.bias)]
    for x, y in pairs:
        if x is None or y is None:
            if x is not y:
                return "a tensor (DoRA magnitude or bias) was lost or added"
            continue
        if x.shape != y.shape and x.numel() == y.numel():
            y = y.reshape(x.shape)  # a Conv up saved [out, r, 1, 1] and read back [out, r]
        if x.shape != y.shape:
            return f"shape {list(x.shape)} became {list(y.shape)}"
        x, y = x.float(), y.float()
        if not (torch.equal(x, y) if exact else torch.allclose(x, y, rtol=1e-2, atol=1e-3)):
            return f"values differ (max abs {float((x - y).abs().max()):.3g})"
    return None


def _down_shapes(deltas: dict) -> Counter:
    """How many modules have each ``lora_down`` shape but the rank (LyCORIS kinds: each factor's shape):
    the module kinds (Linear, Conv2d and its kernel), whatever the layout (joined fused parts change the rank)."""
    shapes: Counter = Counter()
    for delta in deltas.values():
        if hasattr(delta, "factors"):
            shapes.update((name, tuple(t.shape)) for name, t in delta.factors.items())
        else:
            shapes[("down", tuple(delta.down.shape[1:]))] += 1
    return shapes


def _remove_written(path: str) -> None:
    """Delete a conversion's output (a file, or the files save_adapter wrote into a folder)."""
    if os.path.isdir(path):
        for name in ("adapter_model.safetensors", "adapter_config.json", "pytorch_lora_weights.safetensors"):
            if os.path.isfile(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
    elif os.path.isfile(path):
        os.remove(path)


def _progress_bar(total: int, desc: str):
    """A tqdm bar on stderr when tqdm is installed and stderr is a terminal (``disable=None``); else None."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar
        return None
    return tqdm(total=total, desc=desc, unit="step", disable=None, leave=False, file=sys.stderr)


@contextlib.contextmanager
def _step(bar, name: str, timings: dict[str, float]):
    """Time one named step of a command into ``timings`` and advance the bar."""
    if bar is not None:
        bar.set_postfix_str(name)
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = time.perf_counter() - start
        if bar is not None:
            bar.update(1)
