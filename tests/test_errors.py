"""Errors (API.md section 4): every failure is a `LoraError` that names the file, the key or module, and
what was expected; a load that fails for any reason leaves the pipeline exactly as it was.

"Exactly as it was" is checked with `fingerprint`: per LoRA component, the modules (same objects, same
classes, same instance attributes), the state_dict keys, every parameter and buffer (same objects,
bit-identical values, same requires_grad), plus the pipeline's active adapters and adapter list. Where
an adapter blend was already set, the UNet and text-encoder outputs must also stay bit-identical.

No silent partial load: every key of a file is applied or reported. Keys that target nothing are an
error when their tensor is non-zero and a `LoraWarning` when it is all zero; `strict=False` loads what
fits, warns with what it skipped, and the returned report lists it.
"""

from __future__ import annotations

import functools
import os
import re
import warnings

import pytest
import torch
from safetensors.torch import save_file
from tiny import outputs, tiny_sd_pipeline, tiny_sdxl_pipeline

import lora_loader
import lora_loader.inject
from lora_loader import (
    LoraError,
    LoraFileError,
    LoraNameError,
    LoraShapeError,
    LoraWarning,
)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}

TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
TO_V = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"
CONV1 = "down_blocks.0.resnets.0.conv1"
PROJ_IN = "down_blocks.0.attentions.0.proj_in"
# Files spell CLIP paths with transformers' historic `text_model.` segment; live modules may not have it.
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"
TE_V = "text_model.encoder.layers.1.self_attn.v_proj"


# -- building LoRAs from the live model's shapes ---------------------------------------------------


def live_module(pipe, component: str, path: str) -> torch.nn.Module:
    root = getattr(pipe, component)
    try:
        return root.get_submodule(path)
    except AttributeError:
        return root.get_submodule(path.removeprefix("text_model."))


def factors(weight_shape, rank: int, g: torch.Generator, zero: bool = False):
    """(down, up) for a Linear [out, in] or Conv2d [out, in, kh, kw] weight."""
    out_f, in_f, *kernel = weight_shape
    down = torch.randn(rank, in_f, *kernel, generator=g)
    up = torch.randn(out_f, rank, *([1, 1] if kernel else []), generator=g)
    if zero:
        down, up = torch.zeros_like(down), torch.zeros_like(up)
    return down, up


def kohya_key(component: str, path: str) -> str:
    return KOHYA_PREFIX[component] + path.replace(".", "_")


def kohya_lora(pipe, targets, rank: int = 2, alpha=None, seed: int = 1) -> dict[str, torch.Tensor]:
    """Kohya keys (`lora_unet_*.lora_down.weight`, ...) for (component, path) targets of `pipe`."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for component, path in targets:
        prefix = kohya_key(component, path)
        down, up = factors(live_module(pipe, component, path).weight.shape, rank, g)
        sd[f"{prefix}.lora_down.weight"] = down
        sd[f"{prefix}.lora_up.weight"] = up
        if alpha is not None:
            sd[f"{prefix}.alpha"] = alpha.clone() if isinstance(alpha, torch.Tensor) else torch.tensor(float(alpha))
    return sd


def peft_lora(pipe, targets, rank: int = 2, seed: int = 2) -> dict[str, torch.Tensor]:
    """diffusers/PEFT keys (`unet.<path>.lora_A.weight`, ...) for (component, path) targets of `pipe`."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for component, path in targets:
        down, up = factors(live_module(pipe, component, path).weight.shape, rank, g)
        sd[f"{component}.{path}.lora_A.weight"] = down
        sd[f"{component}.{path}.lora_B.weight"] = up
    return sd


def valid_lora(pipe, seed: int = 3) -> dict[str, torch.Tensor]:
    """A LoRA that loads on its own; the bad cases add to it, so a partial load would show."""
    return kohya_lora(pipe, [("unet", TO_Q), ("unet", CONV1), ("text_encoder", TE_Q)], rank=2, alpha=1.0, seed=seed)


def orphan_pair(name: str = "down_blocks_7_attentions_0_proj_in", zero: bool = False) -> dict[str, torch.Tensor]:
    """A Kohya pair whose module does not exist in the tiny SD UNet."""
    g = torch.Generator().manual_seed(11)
    down, up = factors((8, 8), 2, g, zero=zero)
    return {f"lora_unet_{name}.lora_down.weight": down, f"lora_unet_{name}.lora_up.weight": up}


@functools.cache
def sdxl_lora_and_shapes() -> tuple[dict[str, torch.Tensor], dict[tuple[str, str], tuple]]:
    """A diffusers-format LoRA on every attention projection of the tiny SDXL pipeline, rank 3.

    Returns the state dict and, per (component, live path), the SDXL weight shape it was made for.
    """
    sdxl = tiny_sdxl_pipeline(0)
    g = torch.Generator().manual_seed(5)
    sd, shapes = {}, {}
    for component in COMPONENTS:
        for path, module in getattr(sdxl, component).named_modules():
            if isinstance(module, torch.nn.Linear) and path.rsplit(".", 1)[-1] in (
                "to_q", "to_k", "to_v", "q_proj", "k_proj", "v_proj", "out_proj",
            ) or path.endswith("to_out.0"):
                down, up = factors(module.weight.shape, 3, g)
                sd[f"{component}.{path}.lora_A.weight"] = down
                sd[f"{component}.{path}.lora_B.weight"] = up
                shapes[(component, path)] = tuple(module.weight.shape)
    return sd, shapes


def save(sd: dict, path) -> str:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


# -- pickles ---------------------------------------------------------------------------------------


def _write_marker(path: str):
    with open(path, "w") as f:
        f.write("pwned")
    return {}


class Payload:
    """Unpickling this object runs `_write_marker`: exactly what weights_only loading must refuse."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (_write_marker, (self.marker,))


# -- fingerprint -----------------------------------------------------------------------------------


def fingerprint(pipe) -> dict:
    """Everything a load may touch, captured so that `assert_unchanged` can compare it exactly."""
    fp = {}
    for name in COMPONENTS:
        root = getattr(pipe, name, None)
        if root is None:
            continue
        fp[name] = {
            "modules": [(path, id(m), type(m)) for path, m in root.named_modules(remove_duplicate=False)],
            "attributes": [(path, sorted(vars(m))) for path, m in root.named_modules(remove_duplicate=False)],
            "state_dict_keys": list(root.state_dict().keys()),
            "parameters": [(path, id(p)) for path, p in root.named_parameters(remove_duplicate=False)],
            "requires_grad": [(path, p.requires_grad) for path, p in root.named_parameters(remove_duplicate=False)],
            "tensors": {
                **{f"param:{k}": p.detach().clone() for k, p in root.named_parameters(remove_duplicate=False)},
                **{f"buffer:{k}": b.detach().clone() for k, b in root.named_buffers(remove_duplicate=False)},
                **{f"state:{k}": t.detach().clone() for k, t in root.state_dict().items()},
            },
        }
    fp["active_adapters"] = pipe.get_active_adapters()
    fp["list_adapters"] = pipe.get_list_adapters()
    return fp


def assert_unchanged(before: dict, after: dict) -> None:
    """Take both fingerprints with no forward pass in between: transformers sets a hook flag at the first one."""
    assert before.keys() == after.keys()
    assert after["active_adapters"] == before["active_adapters"]
    assert after["list_adapters"] == before["list_adapters"]
    for name in COMPONENTS:
        if name not in before:
            continue
        b, a = before[name], after[name]
        for part in ("modules", "attributes", "state_dict_keys", "parameters", "requires_grad"):
            assert a[part] == b[part], f"{name}: {part} changed"
        assert a["tensors"].keys() == b["tensors"].keys(), f"{name}: tensors added or removed"
        changed = [
            k
            for k, t in b["tensors"].items()
            if t.dtype != a["tensors"][k].dtype or t.device != a["tensors"][k].device or not torch.equal(t, a["tensors"][k])
        ]
        assert not changed, f"{name}: tensors changed: {changed[:5]}"


def assert_same_outputs(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"{key} output changed"


def fresh_pipeline():
    return lora_loader.attach(tiny_sd_pipeline(0))


def blended_pipeline():
    """Two adapters loaded (Kohya and PEFT layouts) and a non-trivial set_adapters blend."""
    pipe = fresh_pipeline()
    pipe.load_lora_weights(valid_lora(pipe, seed=1), adapter_name="a")
    pipe.load_lora_weights(peft_lora(pipe, [("unet", TO_Q), ("unet", TO_K), ("text_encoder", TE_V)], seed=2), adapter_name="b")
    pipe.set_adapters(["a", "b"], weights=[0.7, {"unet": -0.4, "text_encoder": 0.9}])
    return pipe


# -- 1 and 7: every failed load raises a LoraError and changes nothing -------------------------------
#
# Each case builds a bad source for the tiny SD 1.5 pipeline and says which LoraError subclass it is
# and what its message must name (the file, the offending key, ...). Bad keys come beside a valid LoRA
# so that a partial load would show in the fingerprint.


def case_sdxl_lora_into_sd15(pipe, tmp):
    path = save(sdxl_lora_and_shapes()[0], tmp / "sdxl_lora.safetensors")
    return (path,), {}, LoraShapeError, [path]


def case_key_targeting_no_module(pipe, tmp):
    orphan = orphan_pair()
    path = save({**valid_lora(pipe), **orphan}, tmp / "orphan.safetensors")
    return (path,), {}, LoraError, [path, *orphan]


def case_text_encoder_2_keys_on_a_pipeline_without_one(pipe, tmp):
    g = torch.Generator().manual_seed(4)
    down, up = factors((16, 16), 2, g)
    extra = {f"{kohya_key('text_encoder_2', TE_Q)}.lora_down.weight": down, f"{kohya_key('text_encoder_2', TE_Q)}.lora_up.weight": up}
    path = save({**valid_lora(pipe), **extra}, tmp / "te2.safetensors")
    return (path,), {}, LoraError, [path, *extra]


def case_half_pair(pipe, tmp):
    key = f"{kohya_key('unet', TO_K)}.lora_down.weight"
    path = save({**valid_lora(pipe), key: torch.randn(2, 8)}, tmp / "half.safetensors")
    return (path,), {}, LoraError, [path, key]


def case_loha_of_the_wrong_shape_beside_a_lora(pipe, tmp):
    prefix = kohya_key("unet", TO_K)
    loha = {f"{prefix}.hada_{w}": torch.randn(*s) for w, s in (("w1_a", (5, 2)), ("w1_b", (2, 8)), ("w2_a", (5, 2)), ("w2_b", (2, 8)))}
    path = save({**valid_lora(pipe), **loha}, tmp / "loha_mixed.safetensors")
    return (path,), {}, LoraError, [path, f"{prefix}.hada_w", "LoHa"]


def case_lora_and_loha_factors_on_one_module(pipe, tmp):
    prefix = kohya_key("unet", TO_Q)  # valid_lora's own module
    loha = {f"{prefix}.hada_{w}": torch.randn(*s) for w, s in (("w1_a", (8, 2)), ("w1_b", (2, 8)), ("w2_a", (8, 2)), ("w2_b", (2, 8)))}
    path = save({**valid_lora(pipe), **loha}, tmp / "loha_on_lora.safetensors")
    return (path,), {}, LoraError, [path, f"{prefix}.hada_w1_a", "LoHa", "LoRA"]


def case_unknown_suffix(pipe, tmp):
    key = f"{kohya_key('unet', TO_K)}.lora_middle.weight"
    path = save({**valid_lora(pipe), key: torch.randn(2, 2)}, tmp / "suffix.safetensors")
    return (path,), {}, LoraError, [path, key]


def case_corrupt_file(pipe, tmp):
    path = str(tmp / "corrupt.safetensors")
    with open(path, "wb") as f:
        f.write(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).tolist()))
    return (path,), {}, LoraFileError, [path]


def case_truncated_file(pipe, tmp):
    path = save(valid_lora(pipe), tmp / "truncated.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 64)
    return (path,), {}, LoraFileError, [path]


def case_unet_weights_not_a_lora(pipe, tmp):
    path = save(pipe.unet.state_dict(), tmp / "unet.safetensors")
    return (path,), {}, LoraError, [path]


def case_empty_file(pipe, tmp):
    path = save({}, tmp / "empty.safetensors")
    return (path,), {}, LoraError, [path]


def case_empty_state_dict(pipe, tmp):
    return ({},), {}, LoraError, []


def case_bad_metadata_header(pipe, tmp):
    path = str(tmp / "header.safetensors")
    save_file(valid_lora(pipe), path, metadata={"lora_adapter_metadata": "{not json"})
    return (path,), {}, LoraError, [path, "lora_adapter_metadata"]


def case_state_dict_with_non_tensor_value(pipe, tmp):
    sd = peft_lora(pipe, [("unet", TO_Q)])
    key = f"unet.{TO_Q}.lora_B.weight"
    sd[key] = "not a tensor"
    return (sd,), {}, LoraError, [key]


def case_bin_with_non_tensor_value(pipe, tmp):
    sd = peft_lora(pipe, [("unet", TO_Q)])
    key = f"unet.{TO_Q}.lora_B.weight"
    sd[key] = 3
    path = str(tmp / "numbers.bin")
    torch.save(sd, path)
    return (path,), {}, LoraFileError, [path, key]


def case_pickle_payload(pipe, tmp):
    path = str(tmp / "payload.bin")
    torch.save({"lora_unet_x.lora_down.weight": Payload(str(tmp / "marker"))}, path)
    return (path,), {}, LoraFileError, [path]


def case_missing_file(pipe, tmp):
    path = str(tmp / "missing.safetensors")
    return (path,), {}, LoraFileError, [path]


def case_folder_with_two_weight_files(pipe, tmp):
    save(valid_lora(pipe), tmp / "one.safetensors")
    save(valid_lora(pipe), tmp / "two.safetensors")
    return (str(tmp),), {}, LoraFileError, ["one.safetensors", "two.safetensors"]


def case_invalid_adapter_name(pipe, tmp):
    return (valid_lora(pipe),), {"adapter_name": "has.dot"}, LoraNameError, ["has.dot"]


def case_adapter_name_in_use(pipe, tmp):
    return (valid_lora(pipe),), {"adapter_name": "a"}, LoraNameError, ["'a'"]


def case_unknown_keyword(pipe, tmp):
    return (valid_lora(pipe),), {"not_an_option": 1}, LoraError, ["not_an_option"]


FAILED_LOADS = {
    name.removeprefix("case_"): fn for name, fn in globals().items() if name.startswith("case_") and callable(fn)
}


@pytest.mark.parametrize("state", ["fresh", "blended"])
@pytest.mark.parametrize("case", sorted(FAILED_LOADS))
def test_a_failed_load_raises_a_lora_error_naming_the_culprit_and_changes_nothing(case, state, tmp_path):
    if case == "adapter_name_in_use" and state == "fresh":
        case = "invalid_adapter_name"  # no name is in use on a fresh pipeline
    pipe = fresh_pipeline() if state == "fresh" else blended_pipeline()
    args, kwargs, error, mentions = FAILED_LOADS[case](pipe, tmp_path)
    outputs_before = outputs(pipe) if state == "blended" else None
    before = fingerprint(pipe)

    with pytest.raises(error) as raised:
        pipe.load_lora_weights(*args, **kwargs)

    message = str(raised.value)
    for fragment in mentions:
        assert fragment in message, f"the message does not name {fragment!r}: {message}"
    assert_unchanged(before, fingerprint(pipe))
    if outputs_before is not None:
        assert_same_outputs(outputs_before, outputs(pipe))


def test_after_a_failed_load_the_name_is_still_free_and_default_names_do_not_skip(tmp_path):
    pipe = fresh_pipeline()
    with pytest.raises(LoraError):
        pipe.load_lora_weights({**valid_lora(pipe), **orphan_pair()}, adapter_name="style")
    with pytest.raises(LoraError):
        pipe.load_lora_weights({**valid_lora(pipe), **orphan_pair()})
    assert pipe.load_lora_weights(valid_lora(pipe), adapter_name="style").adapter_name == "style"
    pipe.delete_adapters("style")
    assert pipe.load_lora_weights(valid_lora(pipe)).adapter_name == "default_0"


# -- 2: a LoRA for another base model ----------------------------------------------------------------


def _mentions_number(text: str, n: int) -> bool:
    return re.search(rf"(?<!\d){n}(?!\d)", text) is not None


def _mentions_shape(text: str, shape) -> bool:
    """`[3, 16]`, `(3, 16)`, `torch.Size([3, 16])` or `3x16`."""
    sep = r"\s*[,x×]\s*"
    return re.search(r"(?<!\d)" + sep.join(str(d) for d in shape) + r"(?!\d)", text) is not None


def test_an_sdxl_lora_in_an_sd15_pipeline_is_a_shape_error_naming_file_module_and_both_shapes(tmp_path):
    sd, sdxl_shapes = sdxl_lora_and_shapes()
    path = save(sd, tmp_path / "sdxl_style.safetensors")
    pipe = fresh_pipeline()
    sd15_modules = {c: dict(getattr(pipe, c).named_modules()) for c in COMPONENTS if getattr(pipe, c, None) is not None}
    mismatched = {
        (c, p): (sdxl_shape, tuple(sd15_modules[c][p].weight.shape))
        for (c, p), sdxl_shape in sdxl_shapes.items()
        if p in sd15_modules.get(c, {}) and tuple(sd15_modules[c][p].weight.shape) != sdxl_shape
    }
    assert mismatched, "the tiny SDXL and SD 1.5 pipelines must share module names with different shapes"
    before = fingerprint(pipe)

    with pytest.raises(LoraShapeError) as raised:
        pipe.load_lora_weights(path)

    message = str(raised.value)
    assert path in message
    named = [key for key in mismatched if key[1] in message]
    assert named, f"no mismatched module is named: {message}"
    component, module_path = max(named, key=lambda key: len(key[1]))  # the longest match is the one named
    (sdxl_out, sdxl_in), (sd_out, sd_in) = mismatched[(component, module_path)]
    tail = message[message.index(module_path) + len(module_path):]
    if sdxl_in != sd_in:
        assert _mentions_shape(tail, (3, sdxl_in)), f"the file's lora_down shape [3, {sdxl_in}] is missing: {message}"
    if sdxl_out != sd_out:
        assert _mentions_shape(tail, (sdxl_out, 3)), f"the file's lora_up shape [{sdxl_out}, 3] is missing: {message}"
    for dim in (sd_out, sd_in):
        assert _mentions_number(tail, dim), f"the module's shape ({sd_out}, {sd_in}) is missing: {message}"
    assert_unchanged(before, fingerprint(pipe))


# -- 3: keys that target no module ----------------------------------------------------------------------


def test_a_non_zero_key_that_targets_no_module_is_an_error_naming_the_key():
    pipe = fresh_pipeline()
    orphan = orphan_pair()
    before = fingerprint(pipe)
    with pytest.raises(LoraError) as raised:
        pipe.load_lora_weights({**valid_lora(pipe), **orphan})
    for key in orphan:
        assert key in str(raised.value)
    assert_unchanged(before, fingerprint(pipe))


def test_all_zero_keys_that_target_no_module_are_skipped_with_a_warning_and_the_rest_loads():
    pipe = fresh_pipeline()
    base = outputs(pipe)
    orphan = orphan_pair(zero=True)

    with pytest.warns(LoraWarning) as caught:
        report = pipe.load_lora_weights({**valid_lora(pipe), **orphan}, adapter_name="with_zeros")

    warned = " ".join(str(w.message) for w in caught if issubclass(w.category, LoraWarning))
    for key in orphan:
        assert key in warned
        assert key in report.skipped
    with_zeros = outputs(pipe)
    assert not torch.equal(with_zeros["unet"], base["unet"]), "the rest of the file must have loaded"
    pipe.delete_adapters("with_zeros")
    pipe.load_lora_weights(valid_lora(pipe), adapter_name="without")
    assert_same_outputs(outputs(pipe), with_zeros)


def test_an_alpha_without_its_pair_is_reported_not_silently_dropped():
    pipe = fresh_pipeline()
    orphan_alpha = "lora_unet_down_blocks_7_attentions_0_proj_in.alpha"
    with pytest.warns(LoraWarning) as caught:
        report = pipe.load_lora_weights({**valid_lora(pipe), orphan_alpha: torch.tensor(4.0)})
    assert any(orphan_alpha in str(w.message) for w in caught if issubclass(w.category, LoraWarning))
    assert orphan_alpha in report.skipped


def test_strict_false_loads_what_fits_warns_with_every_skipped_key_and_reports_them():
    pipe = fresh_pipeline()
    orphan = orphan_pair()
    # A pair for CONV1 whose lora_down has one input channel too many: it does not fit.
    misfit_prefix = kohya_key("unet", CONV1)
    out_c, in_c, kh, kw = pipe.unet.get_submodule(CONV1).weight.shape
    misfit = {
        f"{misfit_prefix}.lora_down.weight": torch.randn(2, in_c + 1, kh, kw),
        f"{misfit_prefix}.lora_up.weight": torch.randn(out_c, 2, 1, 1),
    }
    fits = kohya_lora(pipe, [("unet", TO_Q), ("text_encoder", TE_Q)], alpha=1.0, seed=3)
    skipped = [*orphan, *misfit]

    with pytest.warns(LoraWarning) as caught:
        report = pipe.load_lora_weights({**fits, **orphan, **misfit}, adapter_name="partial", strict=False)

    warned = " ".join(str(w.message) for w in caught if issubclass(w.category, LoraWarning))
    for key in skipped:
        assert key in warned, f"{key} was skipped without a warning naming it: {warned}"
        assert key in report.skipped
    assert not any(key in report.skipped for key in fits)
    text = str(report)
    assert "partial" in text
    for key in skipped:
        assert key in text, f"the printed report does not list {key}: {text}"
    partial = outputs(pipe)
    pipe.delete_adapters("partial")
    pipe.load_lora_weights(fits, adapter_name="fits_only")
    assert_same_outputs(outputs(pipe), partial)


# -- 4: half pairs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout, key",
    [
        ("kohya", f"lora_unet_{TO_K.replace('.', '_')}.lora_down.weight"),
        ("kohya", f"lora_unet_{TO_K.replace('.', '_')}.lora_up.weight"),
        ("peft", f"unet.{TO_K}.lora_A.weight"),
        ("peft", f"unet.{TO_K}.lora_B.weight"),
    ],
)
def test_half_a_pair_is_an_error_naming_the_key(layout, key):
    pipe = fresh_pipeline()
    g = torch.Generator().manual_seed(7)
    down, up = factors(pipe.unet.get_submodule(TO_K).weight.shape, 2, g)
    lonely = down if key.endswith(("lora_down.weight", "lora_A.weight")) else up
    before = fingerprint(pipe)
    with pytest.raises(LoraError) as raised:
        pipe.load_lora_weights({**valid_lora(pipe), key: lonely})
    assert key in str(raised.value)
    assert_unchanged(before, fingerprint(pipe))


# -- 5: unknown suffixes, incomplete LyCORIS modules and kinds not supported yet ----------------------------------------------


def _loha(prefix):
    return {f"{prefix}.hada_{w}": torch.randn(*s) for w, s in (("w1_a", (8, 2)), ("w1_b", (2, 8)), ("w2_a", (8, 2)), ("w2_b", (2, 8)))} | {
        f"{prefix}.alpha": torch.tensor(2.0)
    }


def _norm_diff(prefix):
    return {f"{prefix}.w_norm": torch.randn(8), f"{prefix}.b_norm": torch.randn(8)}


def _oft(prefix):  # OFT loads (tests/test_oft_glora.py); blocks for 15 rows fit no layer of the tiny UNet
    return {f"{prefix}.oft_blocks": torch.randn(3, 5, 5), f"{prefix}.alpha": torch.tensor(2.0)}


def _loha_missing_a_factor(prefix):
    return {k: v for k, v in _loha(prefix).items() if not k.endswith("w2_b")}


@pytest.mark.parametrize("beside_a_lora", [False, True], ids=["alone", "beside_a_lora"])
@pytest.mark.parametrize(
    "keys, named_key, what",
    [
        (_norm_diff, "w_norm", "norm"),
        (_oft, "oft_blocks", "OFT"),
        (_loha_missing_a_factor, "hada_w1_a", "hada_w2_b"),
        (lambda p: {f"{p}.lora_middle.weight": torch.randn(2, 2)}, "lora_middle.weight", "lora_down"),
    ],
    ids=["norm_diff", "oft", "loha_missing_a_factor", "unknown_suffix"],
)
def test_keys_of_unsupported_kinds_are_an_error_naming_the_key_and_what_it_is(keys, named_key, what, beside_a_lora):
    pipe = fresh_pipeline()
    prefix = kohya_key("unet", TO_K)
    sd = keys(prefix)
    if beside_a_lora:
        sd = {**valid_lora(pipe), **sd}
    before = fingerprint(pipe)
    with pytest.raises(LoraError) as raised:
        pipe.load_lora_weights(sd)
    message = str(raised.value)
    assert f"{prefix}.{named_key}" in message, message
    assert what in message, f"the message does not say what the key is ({what}): {message}"
    assert_unchanged(before, fingerprint(pipe))


# -- 6: adapter names -----------------------------------------------------------------------------------


def test_loading_under_a_name_in_use_is_a_name_error_that_says_how_to_free_it():
    pipe = blended_pipeline()
    base = outputs(pipe)
    before = fingerprint(pipe)
    with pytest.raises(LoraNameError) as raised:
        pipe.load_lora_weights(valid_lora(pipe, seed=9), adapter_name="a")
    message = str(raised.value)
    assert "'a'" in message
    assert "delete_adapters('a')" in message, f"the suggested fix must name the adapter: {message}"
    assert_unchanged(before, fingerprint(pipe))
    assert_same_outputs(base, outputs(pipe))


@pytest.mark.parametrize("name", ["", "has.dot", 3, ["a"]], ids=["empty", "dotted", "int", "list"])
def test_an_invalid_adapter_name_is_a_name_error_and_loads_nothing(name):
    pipe = fresh_pipeline()
    before = fingerprint(pipe)
    with pytest.raises(LoraNameError):
        pipe.load_lora_weights(valid_lora(pipe), adapter_name=name)
    assert_unchanged(before, fingerprint(pipe))


@pytest.mark.parametrize("name", ["train", "half", "to"])
def test_a_name_that_is_also_a_torch_module_attribute_loads_or_is_a_name_error(name):
    """Adapters are keyed by name inside the layers; a name like 'train' must not break that silently."""
    pipe = fresh_pipeline()
    base = outputs(pipe)
    before = fingerprint(pipe)
    try:
        pipe.load_lora_weights(valid_lora(pipe), adapter_name=name)
    except LoraNameError as err:
        assert repr(name) in str(err)
        assert_unchanged(before, fingerprint(pipe))
    else:
        assert pipe.get_active_adapters() == [name]
        assert not torch.equal(outputs(pipe)["unet"], base["unet"])
        pipe.delete_adapters(name)
        assert_same_outputs(base, outputs(pipe))


@pytest.mark.parametrize("names", ["ghost", ["a", "ghost"], ["ghost", "b"]], ids=["alone", "after_a_loaded_name", "before_a_loaded_name"])
def test_set_adapters_with_a_name_not_loaded_is_a_name_error_and_keeps_the_blend(names):
    pipe = blended_pipeline()
    blend = outputs(pipe)
    before = fingerprint(pipe)
    with pytest.raises(LoraNameError) as raised:
        pipe.set_adapters(names, weights=[0.1] * (1 if isinstance(names, str) else len(names)))
    assert "ghost" in str(raised.value)
    assert pipe.get_active_adapters() == ["a", "b"]
    assert_unchanged(before, fingerprint(pipe))
    assert_same_outputs(blend, outputs(pipe))


def test_set_adapters_on_a_pipeline_without_adapters_is_a_name_error_and_changes_nothing():
    pipe = fresh_pipeline()
    before = fingerprint(pipe)
    with pytest.raises(LoraNameError, match="ghost"):
        pipe.set_adapters("ghost")
    assert_unchanged(before, fingerprint(pipe))


@pytest.mark.parametrize("names", ["ghost", ["a", "ghost"]], ids=["alone", "with_a_loaded_name"])
def test_delete_adapters_of_an_unknown_name_is_a_name_error_and_deletes_nothing(names):
    pipe = blended_pipeline()
    blend = outputs(pipe)
    before = fingerprint(pipe)
    with pytest.raises(LoraNameError, match="ghost"):
        pipe.delete_adapters(names)
    assert_unchanged(before, fingerprint(pipe))
    assert_same_outputs(blend, outputs(pipe))


# -- 8: pickles -----------------------------------------------------------------------------------------


def test_a_pickled_object_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "marker"
    path = str(tmp_path / "pytorch_lora_weights.bin")
    torch.save({"lora_unet_x.lora_down.weight": Payload(str(marker))}, path)
    pipe = fresh_pipeline()
    before = fingerprint(pipe)

    with pytest.raises(LoraFileError) as raised:
        pipe.load_lora_weights(path)
    with pytest.raises(LoraFileError):
        pipe.load_lora_weights(str(tmp_path))  # the same file, found in its folder

    assert path in str(raised.value)
    assert not marker.exists(), "loading ran code from the pickle"
    assert_unchanged(before, fingerprint(pipe))
    # The payload is live: a full unpickle runs it. This is what lora_loader must never do.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_a_bin_of_tensors_loads_through_weights_only_torch_load(tmp_path, monkeypatch):
    pipe = fresh_pipeline()
    sd = valid_lora(pipe)
    path = str(tmp_path / "pytorch_lora_weights.bin")
    torch.save(sd, path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    pipe.load_lora_weights(path, adapter_name="from_bin")
    monkeypatch.undo()
    assert calls and all(flag is True for flag in calls)
    from_bin = outputs(pipe)

    pipe.delete_adapters("from_bin")
    pipe.load_lora_weights(sd, adapter_name="from_dict")
    assert_same_outputs(outputs(pipe), from_bin)


# -- 9: a failure midway through applying is rolled back ----------------------------------------------------


def _fail_on_call(monkeypatch, name: str, n: int) -> list:
    """Make `lora_loader.inject.<name>` (what `inject.apply` calls) raise on its n-th call."""
    real = getattr(lora_loader.inject, name)
    calls = []

    def flaky(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            raise RuntimeError(f"simulated failure in {name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_loader.inject, name, flaky)
    return calls


ROLLBACK_TARGETS = [("unet", TO_Q), ("unet", TO_K), ("unet", TO_V), ("unet", CONV1), ("unet", PROJ_IN), ("text_encoder", TE_Q)]


@pytest.mark.parametrize("state", ["fresh", "blended"])
@pytest.mark.parametrize("function", ["wrap", "adapter_from_delta"])
def test_a_failure_midway_through_apply_rolls_everything_back(function, state, monkeypatch):
    pipe = fresh_pipeline() if state == "fresh" else blended_pipeline()
    sd = kohya_lora(pipe, ROLLBACK_TARGETS, seed=8)
    blend = outputs(pipe)
    before = fingerprint(pipe)
    had_adapters = {
        (c, p) for c in ("unet", "text_encoder") for p, m in getattr(pipe, c).named_modules() if hasattr(m, "lora_adapters")
    }
    # wrap() runs only for modules not wrapped yet, so in the blended state fewer calls happen: fail on the 2nd.
    fail_at = 3 if state == "fresh" else 2
    calls = _fail_on_call(monkeypatch, function, fail_at)

    with pytest.raises(LoraError) as raised:
        pipe.load_lora_weights(sd, adapter_name="doomed")
    monkeypatch.undo()

    assert len(calls) == fail_at, f"inject.apply must have called {function} up to the failing call"
    assert "doomed" in str(raised.value)
    assert_unchanged(before, fingerprint(pipe))
    for component in ("unet", "text_encoder"):
        for path, module in getattr(pipe, component).named_modules():
            if (component, path) in had_adapters:
                assert "doomed" not in module.lora_adapters
            else:
                assert not hasattr(module, "lora_adapters"), f"{component}.{path} kept a lora_adapters attribute"
    assert_same_outputs(blend, outputs(pipe))
    # And the pipeline still works: the same file now loads.
    pipe.load_lora_weights(sd, adapter_name="doomed")
    assert "doomed" in pipe.get_active_adapters()


# -- 10: Kohya alpha --------------------------------------------------------------------------------------


def test_kohya_alpha_of_any_scalar_dtype_is_the_same_number_and_absent_alpha_means_rank():
    pipe = fresh_pipeline()
    targets = [("unet", TO_Q), ("unet", CONV1), ("text_encoder", TE_Q)]
    rank = 4
    variants = {
        "alpha_int64": torch.tensor(2, dtype=torch.int64),
        "alpha_float16": torch.tensor(2.0, dtype=torch.float16),
        "alpha_bfloat16": torch.tensor(2.0, dtype=torch.bfloat16),
        "alpha_float32": torch.tensor(2.0, dtype=torch.float32),
        "alpha_rank": torch.tensor(float(rank)),
        "alpha_absent": None,
    }
    for name, alpha in variants.items():
        pipe.load_lora_weights(kohya_lora(pipe, targets, rank=rank, alpha=alpha, seed=10), adapter_name=name)
    out = {}
    for name in variants:
        pipe.set_adapters(name)
        out[name] = outputs(pipe)

    assert_same_outputs(out["alpha_float32"], out["alpha_int64"])
    assert_same_outputs(out["alpha_float32"], out["alpha_float16"])
    assert_same_outputs(out["alpha_float32"], out["alpha_bfloat16"])
    assert_same_outputs(out["alpha_rank"], out["alpha_absent"])
    assert not torch.equal(out["alpha_float32"]["unet"], out["alpha_absent"]["unet"]), "alpha must change the strength"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a valid file loads without warnings
        pipe.load_lora_weights(kohya_lora(pipe, targets, rank=rank, alpha=torch.tensor(2), seed=10), adapter_name="quiet")
