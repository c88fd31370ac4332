"""Resolve a source (Hub repo id, folder, file or state dict) to tensors, header metadata and config.

Safetensors files are read straight into their tensors (`_read_safetensors_direct`:
one ``readinto`` per tensor, after checking the header); a header this reader
does not take on is read with safetensors' ``safe_open``, which also words the
error for a broken file. Pickled ``.bin`` files are read only with
``torch.load(weights_only=True)``, which refuses arbitrary objects.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass

import torch

from .config import ADAPTER_CONFIG, read_adapter_config
from .errors import LoraFileError

SAFE_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
PICKLE_NAMES = ("pytorch_lora_weights.bin", "adapter_model.bin")


@dataclass
class LoadedSource:
    """What a source holds: tensors, the safetensors header, PEFT's ``adapter_config.json`` if beside it."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    adapter_config: dict | None
    name: str  # a path, "repo:file", or "<state dict>", for messages
    owned: bool = True  # tensors read from a file are ours to keep; a caller's state dict is not


def read_source(
    src,
    weight_name: str | None = None,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    local_files_only: bool | None = None,
    allow_pickle: bool | None = None,
) -> LoadedSource:
    """Read ``src``: a state dict, a ``.safetensors``/``.bin`` file, a folder, or a Hub repo id.

    ``allow_pickle=False`` (diffusers' flag) refuses pickled files (``.bin``, ``.pt``), even
    weights-only ones; by default they are read with ``torch.load(weights_only=True)``.

    >>> read_source({"x.lora_A.weight": torch.zeros(1, 2)}).name
    '<state dict>'
    """
    if isinstance(src, dict):
        return LoadedSource(_check_tensors(dict(src), "<state dict>"), {}, None, "<state dict>", owned=False)
    if not isinstance(src, (str, os.PathLike)):
        raise LoraFileError(f"expected a Hub repo id, a folder, a file or a state dict, got {type(src).__name__}")
    src = os.fspath(src)
    if os.path.isfile(src):
        if weight_name is not None:
            raise LoraFileError(f"{src} is a file; weight_name={weight_name!r} only applies to a folder or repo")
        return _read_local_file(src, allow_pickle)
    folder = os.path.join(src, subfolder) if subfolder else src
    if os.path.isdir(folder):
        return _read_from_folder(folder, weight_name, allow_pickle)
    if os.path.isdir(src) or _looks_like_path(src):
        raise LoraFileError(f"{folder} does not exist: expected a LoRA file, a folder or a Hub repo id")
    return _read_from_hub(src, weight_name, subfolder, revision, token, cache_dir, local_files_only, allow_pickle)


def _looks_like_path(src: str) -> bool:
    return src.endswith((".safetensors", ".bin", ".pt", ".ckpt")) or src.startswith((".", "/", "~")) or src.count("/") > 1


def _check_tensors(tensors: dict, name: str) -> dict[str, torch.Tensor]:
    for key, value in tensors.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise LoraFileError(f"{name}: entry {key!r} is a {type(value).__name__}; expected a dict of str -> torch.Tensor")
    return tensors


def _read_local_file(path: str, allow_pickle: bool | None = None) -> LoadedSource:
    if path.endswith(".safetensors"):
        tensors, metadata = _read_safetensors(path)
    elif allow_pickle is False:
        raise LoraFileError(
            f"{path} is a pickled file and allow_pickle=False was passed; convert it to .safetensors, "
            "or leave allow_pickle unset to read it with torch.load(weights_only=True)"
        )
    else:
        tensors, metadata = _read_pickle(path), {}
    config = None
    config_path = os.path.join(os.path.dirname(path), ADAPTER_CONFIG)
    if os.path.basename(path).startswith("adapter_model.") and os.path.isfile(config_path):
        config = read_adapter_config(config_path)
    return LoadedSource(tensors, metadata, config, path)


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    direct = _read_safetensors_direct(path)
    if direct is not None:
        return direct
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            # Copies: safe_open's tensors are views of a mapping of the file, which would follow a file saved over in
            # place after the load (and fault once it is truncated); an adapter owns its bytes, as the direct read's do.
            tensors = {key: f.get_tensor(key).clone() for key in f.keys()}
    except Exception as err:  # safetensors raises SafetensorError, OSError, or others on bad headers
        raise LoraFileError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {type(err).__name__}: {err}"
        ) from None
    return tensors, metadata


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def _read_safetensors_direct(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """Read a safetensors file into one fresh tensor per entry, or None if the header is not one
    this reader checks completely (then `safe_open` reads it, or says what is wrong).

    Each tensor is allocated in its dtype and filled by one ``readinto`` from the file
    (little-endian, as the format is), which costs about half of ``safe_open``'s
    ``get_tensor`` per tensor plus the copy the fallback makes (``get_tensor``'s tensors are views of a
    mapping of the file); the tensors own their memory.
    """
    if sys.byteorder != "little":
        return None
    try:
        with open(path, "rb", buffering=0) as f:
            file_size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) != 8:
                return None
            (header_size,) = struct.unpack("<Q", head)
            if header_size > min(file_size - 8, 100 << 20):
                return None
            header = json.loads(f.read(header_size))
            data_start, data_size = 8 + header_size, file_size - 8 - header_size
            if not isinstance(header, dict):
                return None
            metadata = header.pop("__metadata__", None) or {}
            if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
                return None
            entries = []
            for key, info in header.items():
                if not isinstance(info, dict) or info.get("dtype") not in _SAFETENSORS_DTYPES:
                    return None
                shape, offsets = info.get("shape"), info.get("data_offsets")
                if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
                    return None
                if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)):
                    return None
                start, end = offsets
                dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                if not 0 <= start <= end <= data_size or end - start != math.prod(shape) * dtype.itemsize:
                    return None
                entries.append((start, end, key, dtype, shape))
            tensors: dict[str, torch.Tensor] = {}
            position = -1
            for start, end, key, dtype, shape in sorted(entries, key=lambda e: e[0]):
                buffer = torch.empty(end - start, dtype=torch.uint8)
                if end > start:
                    if position != start:
                        f.seek(data_start + start)
                    if f.readinto(memoryview(buffer.numpy())) != end - start:
                        return None
                    position = end
                tensors[key] = buffer.view(dtype).reshape(shape)
    except (OSError, ValueError, UnicodeDecodeError, struct.error, RuntimeError):
        return None
    return {key: tensors[key] for key in sorted(tensors)}, metadata  # safe_open's key order


def _read_pickle(path: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise LoraFileError(
            f"{path}: could not be read as a weights-only torch file ({type(err).__name__}: {err}). "
            "lora_loader never unpickles arbitrary objects; convert the file to .safetensors"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise LoraFileError(f"{path}: holds a {type(obj).__name__}; expected a state dict")
    return _check_tensors(obj, path)


def choose_weight_file(files: list[str], where: str) -> str:
    """The file to load when the user named none: the only LoRA weights file, or the conventional name."""
    for names, suffix in ((SAFE_NAMES, ".safetensors"), (PICKLE_NAMES, ".bin")):
        candidates = sorted(f for f in files if f.endswith(suffix) and "/" not in f)
        for name in names:
            if name in candidates:
                return name
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            raise LoraFileError(
                f"{where} holds several {suffix} files {candidates}; pass weight_name= to choose one"
            )
    raise LoraFileError(f"{where} holds no .safetensors or .bin weights file (files: {sorted(files)[:20]})")


def _read_from_folder(folder: str, weight_name: str | None, allow_pickle: bool | None = None) -> LoadedSource:
    if weight_name is None:
        weight_name = choose_weight_file(os.listdir(folder), folder)
    path = os.path.join(folder, weight_name)
    if not os.path.isfile(path):
        raise LoraFileError(f"{path} does not exist (weight_name={weight_name!r} in folder {folder})")
    source = _read_local_file(path, allow_pickle)
    config_path = os.path.join(os.path.dirname(path), ADAPTER_CONFIG)
    if source.adapter_config is None and os.path.isfile(config_path) and weight_name.startswith("adapter_model"):
        source.adapter_config = read_adapter_config(config_path)
    return source


def _read_from_hub(repo_id, weight_name, subfolder, revision, token, cache_dir, local_files_only, allow_pickle=None) -> LoadedSource:
    import huggingface_hub
    from huggingface_hub import constants, hf_hub_download, snapshot_download

    # huggingface_hub reads HF_HUB_OFFLINE once at import; read it again so a later setting counts.
    env_offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    offline = bool(local_files_only) or env_offline or constants.HF_HUB_OFFLINE
    where = f"Hub repo {repo_id!r}" + (f" (revision {revision})" if revision else "")
    common = dict(revision=revision, cache_dir=cache_dir, token=token, local_files_only=offline)
    try:
        if weight_name is None:
            if offline:
                # No listing without network: choose among what the local cache holds.
                folder = snapshot_download(repo_id, **common)
                if subfolder:
                    folder = os.path.join(folder, subfolder)
                files = os.listdir(folder) if os.path.isdir(folder) else []
            else:
                api = huggingface_hub.HfApi()
                all_files = api.list_repo_files(repo_id, revision=revision, token=token)
                prefix = f"{subfolder}/" if subfolder else ""
                files = [f[len(prefix):] for f in all_files if f.startswith(prefix)]
            weight_name = choose_weight_file(files, where)
        path = hf_hub_download(repo_id, weight_name, subfolder=subfolder, **common)
        config = None
        if weight_name.startswith("adapter_model"):
            try:
                config = read_adapter_config(hf_hub_download(repo_id, ADAPTER_CONFIG, subfolder=subfolder, **common))
            except LoraFileError:
                raise
            except Exception:
                config = None
    except LoraFileError:
        raise
    except Exception as err:
        hint = " (offline: is the file in the local Hugging Face cache?)" if offline else ""
        raise LoraFileError(
            f"could not fetch {weight_name or 'a weights file'} from {where}{hint}: {type(err).__name__}: {err}"
        ) from None
    source = _read_local_file(path, allow_pickle)
    source.adapter_config = config if config is not None else source.adapter_config
    source.name = f"{repo_id}/{weight_name}"
    return source
