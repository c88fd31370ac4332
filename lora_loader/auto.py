"""`AutoLoraModelForCausalLM`: the base model named by an adapter's config, with the adapter loaded."""

from __future__ import annotations

import os

from .attach import attach
from .config import ADAPTER_CONFIG, read_adapter_config
from .errors import LoraError


def _read_adapter_config(src: str, revision, token, cache_dir, local_files_only) -> dict:
    path = os.path.join(src, ADAPTER_CONFIG)
    if not os.path.isdir(src):
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(src, ADAPTER_CONFIG, revision=revision, token=token, cache_dir=cache_dir,
                                   local_files_only=bool(local_files_only))
        except Exception as err:
            raise LoraError(f"could not fetch {ADAPTER_CONFIG} of {src!r}: {type(err).__name__}: {err}") from None
    return read_adapter_config(path)


class AutoLoraModelForCausalLM:
    """Load ``base_model_name_or_path`` from an adapter's config with transformers, then the adapter with lora_loader.

    >>> AutoLoraModelForCausalLM.from_pretrained  # doctest: +ELLIPSIS
    <bound method AutoLoraModelForCausalLM.from_pretrained of ...>
    """

    @classmethod
    def from_pretrained(
        cls,
        adapter_src: str,
        adapter_name: str = "default",
        *,
        is_trainable: bool = False,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | None = None,
        local_files_only: bool | None = None,
        **model_kwargs,
    ):
        from transformers import AutoModelForCausalLM

        config = _read_adapter_config(os.fspath(adapter_src), revision, token, cache_dir, local_files_only)
        base = config.get("base_model_name_or_path")
        if not base:
            raise LoraError(f"{adapter_src}: adapter_config.json has no base_model_name_or_path; load the base yourself")
        model = attach(AutoModelForCausalLM.from_pretrained(base, **model_kwargs))
        model.load_adapter(os.fspath(adapter_src), adapter_name, is_trainable=is_trainable, revision=revision, token=token)
        return model
