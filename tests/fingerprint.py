"""A fingerprint of everything a failed call must leave alone, for pipelines and models alike.

`fingerprint(host)` captures, for every nn.Module component of an attached pipeline (or the model
itself): each module's path, identity and class, each parameter's identity, value, dtype and
requires_grad, each buffer, the state_dict keys, and the adapter state the public calls report
(active adapters, adapters per component, residency). `assert_unchanged` compares two of them
exactly (bitwise). Take both with no forward pass in between.
"""

from __future__ import annotations

import torch
from torch import nn


def components(host) -> dict[str, nn.Module]:
    if isinstance(host, nn.Module):
        return {"model": host}
    return {name: m for name, m in vars(host).items() if isinstance(m, nn.Module)} or {
        name: getattr(host, name) for name in host.components if isinstance(getattr(host, name, None), nn.Module)
    }


def fingerprint(host) -> dict:
    fp = {}
    for name, root in sorted(components(host).items()):
        fp[name] = {
            "modules": [(path, id(m), type(m)) for path, m in root.named_modules(remove_duplicate=False)],
            "state_dict_keys": list(root.state_dict().keys()),
            "parameters": [(path, id(p), p.dtype, p.requires_grad) for path, p in root.named_parameters(remove_duplicate=False)],
            "tensors": {
                **{f"param:{k}": p.detach().clone() for k, p in root.named_parameters(remove_duplicate=False)},
                **{f"buffer:{k}": b.detach().clone() for k, b in root.named_buffers(remove_duplicate=False)},
            },
        }
    fp["active_adapters"] = host.get_active_adapters()
    fp["list_adapters"] = host.get_list_adapters()
    fp["residency"] = host.lora_residency()
    return fp


def assert_unchanged(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key in ("active_adapters", "list_adapters", "residency"):
        assert after[key] == before[key], f"{key} changed: {before[key]} -> {after[key]}"
    for name, b in before.items():
        if not isinstance(b, dict) or "modules" not in b:
            continue
        a = after[name]
        for part in ("modules", "state_dict_keys", "parameters"):
            if a[part] != b[part]:
                diff = [x for x in a[part] if x not in b[part]][:3] + [x for x in b[part] if x not in a[part]][:3]
                raise AssertionError(f"{name}: {part} changed: {diff}")
        assert a["tensors"].keys() == b["tensors"].keys(), f"{name}: tensors added or removed"
        changed = [
            k
            for k, t in b["tensors"].items()
            if t.dtype != a["tensors"][k].dtype or t.device != a["tensors"][k].device or not torch.equal(t, a["tensors"][k])
        ]
        assert not changed, f"{name}: tensors changed: {changed[:5]}"
