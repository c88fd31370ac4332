"""A table of bad inputs, each run on a tiny SD pipeline and on a tiny Llama.

Every case must raise a `LoraError` whose message names what is wrong (the file, the key, the
name), and leave the host bitwise unchanged: every module (path, identity, class), parameter
(identity, value, dtype, requires_grad), buffer, and the adapter state (active adapters, adapters
per component, residency), per `fingerprint`. Each host already carries an adapter with a blend
and a residency cap, and each bad key comes beside a valid pair, so a partial load would show.
"""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from fingerprint import assert_unchanged, fingerprint
from llm_tiny import tiny_llama
from safetensors.torch import save_file
from tiny import tiny_sd_pipeline

import lora_loader
from lora_loader import LoraError


class LM:
    name = "llama"
    t1 = ("model.layers.0.self_attn.q_proj", (16, 16))
    t2 = ("model.layers.0.mlp.up_proj", (32, 16))
    t3 = ("model.layers.1.mlp.up_proj", (32, 16))  # no adapter on it
    kohya1 = "lora_unet_model_layers_0_self_attn_q_proj"

    @staticmethod
    def build():
        return lora_loader.attach(tiny_llama(0))


class Pipe:
    name = "sd-pipeline"
    t1 = ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", (8, 8))
    t2 = ("text_encoder.encoder.layers.0.self_attn.q_proj", (16, 16))
    t3 = ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", (8, 8))  # no adapter on it
    kohya1 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"

    @staticmethod
    def build():
        return lora_loader.attach(tiny_sd_pipeline(0))


def factors(shape, rank=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = shape
    return torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g)


def diffusers_pair(target, rank=2, seed=0):
    stem, shape = target
    down, up = factors(shape, rank, seed)
    return {f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up}


def kohya_pair(h, rank=2, seed=0, alpha=1.0):
    down, up = factors(h.t1[1], rank, seed)
    sd = {f"{h.kohya1}.lora_down.weight": down, f"{h.kohya1}.lora_up.weight": up}
    if alpha is not None:
        sd[f"{h.kohya1}.alpha"] = torch.tensor(alpha)
    return sd


def beside_good(h, bad: dict) -> dict:
    """A bad entry next to a valid pair on another module: a partial load would change the host."""
    return {**diffusers_pair(h.t2, seed=5), **bad}


def with_value(sd: dict, key: str, value) -> dict:
    sd = dict(sd)
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = value
    return sd


def save(sd, path, metadata=None) -> str:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return str(path)


def load(h, src, **kwargs):
    return lambda host: host.load_lora_weights(src, **{"adapter_name": "new", **kwargs})


def safetensors_bytes(header: dict | list | str, data: bytes = b"") -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw)) + raw + data


# -- the cases: name -> (h, tmp) -> (call(host), [what the message must name]) ---------------------------

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def _tensor_cases():
    k = lambda h, suffix: f"{h.kohya1}.{suffix}"  # noqa: E731
    d = lambda h, suffix: f"{h.t1[0]}.{suffix}"  # noqa: E731

    def diffusers_with_alpha(h, alpha):
        return {**diffusers_pair(h.t1), d(h, "alpha"): alpha}

    table = {
        # NaN / Inf
        "nan_in_diffusers_down": lambda h: (with_value(diffusers_pair(h.t1), d(h, "lora_A.weight"), float("nan")), d(h, "lora_A.weight")),
        "inf_in_diffusers_up": lambda h: (with_value(diffusers_pair(h.t1), d(h, "lora_B.weight"), float("inf")), d(h, "lora_B.weight")),
        "nan_in_kohya_down": lambda h: (with_value(kohya_pair(h), k(h, "lora_down.weight"), float("nan")), k(h, "lora_down.weight")),
        "minus_inf_in_kohya_up": lambda h: (with_value(kohya_pair(h), k(h, "lora_up.weight"), float("-inf")), k(h, "lora_up.weight")),
        "nan_kohya_alpha": lambda h: (kohya_pair(h, alpha=float("nan")), k(h, "alpha")),
        "inf_diffusers_alpha": lambda h: (diffusers_with_alpha(h, torch.tensor(float("inf"))), d(h, "alpha")),
        "nan_in_fp16_factor": lambda h: (with_value({kk: v.half() for kk, v in diffusers_pair(h.t1).items()}, d(h, "lora_A.weight"), float("nan")), d(h, "lora_A.weight")),
        "nan_in_bf16_factor": lambda h: (with_value({kk: v.bfloat16() for kk, v in kohya_pair(h, alpha=None).items()}, k(h, "lora_up.weight"), float("nan")), k(h, "lora_up.weight")),
        "nan_in_dora_magnitude": lambda h: ({**diffusers_pair(h.t1), d(h, "lora_magnitude_vector"): torch.full((h.t1[1][0],), float("nan"))}, d(h, "lora_magnitude_vector")),
        # alphas that are not one number
        "kohya_alpha_of_three_values": lambda h: ({**kohya_pair(h, alpha=None), k(h, "alpha"): torch.ones(3)}, k(h, "alpha")),
        "kohya_alpha_2x2": lambda h: ({**kohya_pair(h, alpha=None), k(h, "alpha"): torch.ones(2, 2)}, k(h, "alpha")),
        "kohya_alpha_empty": lambda h: ({**kohya_pair(h, alpha=None), k(h, "alpha"): torch.ones(0)}, k(h, "alpha")),
        "diffusers_alpha_of_three_values": lambda h: (diffusers_with_alpha(h, torch.ones(3)), d(h, "alpha")),
        "diffusers_alpha_empty": lambda h: (diffusers_with_alpha(h, torch.ones(0)), d(h, "alpha")),
        "bool_alpha": lambda h: ({**kohya_pair(h, alpha=None), k(h, "alpha"): torch.tensor(True)}, k(h, "alpha")),
        "complex_alpha": lambda h: ({**kohya_pair(h, alpha=None), k(h, "alpha"): torch.tensor(1 + 1j)}, k(h, "alpha")),
        # factors that are not floating point
        "int8_factor": lambda h: ({**diffusers_pair(h.t1), d(h, "lora_B.weight"): torch.ones(h.t1[1][0], 2, dtype=torch.int8)}, d(h, "lora_B.weight")),
        "int64_factor": lambda h: ({**kohya_pair(h), k(h, "lora_down.weight"): torch.ones(2, h.t1[1][1], dtype=torch.int64)}, k(h, "lora_down.weight")),
        "bool_factor": lambda h: ({**diffusers_pair(h.t1), d(h, "lora_A.weight"): torch.ones(2, h.t1[1][1], dtype=torch.bool)}, d(h, "lora_A.weight")),
        "uint8_factor": lambda h: ({**kohya_pair(h), k(h, "lora_up.weight"): torch.ones(h.t1[1][0], 2, dtype=torch.uint8)}, k(h, "lora_up.weight")),
        "complex_factor": lambda h: ({**diffusers_pair(h.t1), d(h, "lora_A.weight"): torch.ones(2, h.t1[1][1], dtype=torch.complex64)}, d(h, "lora_A.weight")),
        # factors without a rank
        "zero_d_diffusers_factors": lambda h: ({d(h, "lora_A.weight"): torch.tensor(1.0), d(h, "lora_B.weight"): torch.tensor(1.0)}, d(h, "lora_A.weight")),
        "zero_d_kohya_factors": lambda h: ({k(h, "lora_down.weight"): torch.tensor(1.0), k(h, "lora_up.weight"): torch.tensor(1.0)}, k(h, "lora_down.weight")),
        "rank_zero_diffusers": lambda h: ({d(h, "lora_A.weight"): torch.zeros(0, h.t1[1][1]), d(h, "lora_B.weight"): torch.zeros(h.t1[1][0], 0)}, d(h, "lora_A.weight")),
        "rank_zero_kohya": lambda h: ({k(h, "lora_down.weight"): torch.zeros(0, h.t1[1][1]), k(h, "lora_up.weight"): torch.zeros(h.t1[1][0], 0), k(h, "alpha"): torch.tensor(1.0)}, k(h, "lora_down.weight")),
        "one_d_down": lambda h: ({**diffusers_pair(h.t1), d(h, "lora_A.weight"): torch.ones(h.t1[1][1])}, d(h, "lora_A.weight")),
        "three_d_down": lambda h: ({**diffusers_pair(h.t1), d(h, "lora_A.weight"): torch.ones(2, h.t1[1][1], 3)}, d(h, "lora_A.weight")),
        "up_with_a_3x3_kernel": lambda h: ({**diffusers_pair(h.t1), d(h, "lora_B.weight"): torch.ones(h.t1[1][0], 2, 3, 3)}, d(h, "lora_A.weight")),
        # shapes that do not fit
        "down_of_the_wrong_width": lambda h: ({**diffusers_pair(h.t1), d(h, "lora_A.weight"): torch.ones(2, h.t1[1][1] + 1)}, d(h, "lora_A.weight")),
        "up_of_the_wrong_height": lambda h: ({**kohya_pair(h), k(h, "lora_up.weight"): torch.ones(h.t1[1][0] + 3, 2)}, k(h, "lora_down.weight")),
        "ranks_of_down_and_up_disagree": lambda h: ({**diffusers_pair(h.t1), d(h, "lora_B.weight"): torch.ones(h.t1[1][0], 3)}, d(h, "lora_A.weight")),
        "dora_magnitude_of_the_wrong_size": lambda h: ({**diffusers_pair(h.t1), d(h, "lora_magnitude_vector"): torch.ones(h.t1[1][0] + 1)}, d(h, "lora_A.weight")),
        # keys that do not make a LoRA
        "down_without_up": lambda h: ({d(h, "lora_A.weight"): torch.ones(2, h.t1[1][1])}, d(h, "lora_A.weight")),
        "up_without_down": lambda h: ({k(h, "lora_up.weight"): torch.ones(h.t1[1][0], 2)}, k(h, "lora_up.weight")),
        "magnitude_without_a_pair": lambda h: ({d(h, "lora_magnitude_vector"): torch.ones(h.t1[1][0])}, d(h, "lora_magnitude_vector")),
        "key_targeting_no_module": lambda h: ({"no_such.module.lora_A.weight": torch.ones(2, 4), "no_such.module.lora_B.weight": torch.ones(4, 2)}, "no_such.module"),
        "unknown_suffix": lambda h: ({f"{h.kohya1}.lora_sideways.weight": torch.ones(2, 2)}, f"{h.kohya1}.lora_sideways.weight"),
        "lora_and_loha_factors_on_one_module": lambda h: ({**kohya_pair(h), k(h, "hada_w1_a"): torch.ones(h.t1[1][0], 2)}, k(h, "hada_w1_a")),
        "loha_of_the_wrong_shape": lambda h: ({k(h, "hada_w1_a"): torch.ones(3, 2), k(h, "hada_w1_b"): torch.ones(2, 5), k(h, "hada_w2_a"): torch.ones(3, 2), k(h, "hada_w2_b"): torch.ones(2, 5)}, k(h, "hada_w1_a")),
        "one_module_in_two_spellings": lambda h: ({**diffusers_pair(h.t1, seed=1), **kohya_pair(h, seed=2)}, k(h, "lora_down.weight")),
        "one_module_with_and_without_peft_prefix": lambda h: ({**diffusers_pair(h.t1, seed=1), **{"base_model.model." + kk: v for kk, v in diffusers_pair(h.t1, seed=2).items()}}, d(h, "lora_A.weight")),
    }
    for name, make in table.items():

        def build(h, tmp, make=make):
            bad, needle = make(h)
            return load(h, beside_good(h, bad)), [needle]

        build.__name__ = name
        case(build)


_tensor_cases()


@case
def state_dict_with_a_non_tensor_value(h, tmp):
    return load(h, {**diffusers_pair(h.t2), "x.lora_A.weight": [1.0, 2.0]}), ["x.lora_A.weight"]


@case
def state_dict_with_a_non_string_key(h, tmp):
    return load(h, {**diffusers_pair(h.t2), 7: torch.ones(2)}), ["7"]


@case
def empty_state_dict(h, tmp):
    return load(h, {}), ["state dict"]


@case
def base_weights_not_a_lora(h, tmp):
    return load(h, {f"{h.t1[0]}.weight": torch.ones(h.t1[1])}), [f"{h.t1[0]}.weight"]


# -- files --------------------------------------------------------------------------------------------


def _file_with_bytes(name):
    def make(h, tmp, name=name):
        path = tmp / f"{name}.safetensors"
        path.write_bytes(FILE_BYTES[name](h))
        return load(h, str(path)), [str(path)]

    make.__name__ = f"file_{name}"
    case(make)


def _valid_bytes(h) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return open(save(beside_good(h, diffusers_pair(h.t1)), os.path.join(d, "x.safetensors")), "rb").read()


FILE_BYTES = {
    "corrupt": lambda h: b"\x00\x01garbage" * 10,
    "truncated": lambda h: _valid_bytes(h)[:-17],
    "huge_header_length": lambda h: struct.pack("<Q", 1 << 60) + b"{}",
    "non_json_header": lambda h: safetensors_bytes("{not json"),
    "header_a_json_list": lambda h: safetensors_bytes([1, 2, 3]),
    "offsets_out_of_range": lambda h: safetensors_bytes({f"{h.t1[0]}.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 4096]}}, b"\0" * 16),
    "unknown_dtype": lambda h: safetensors_bytes({f"{h.t1[0]}.lora_A.weight": {"dtype": "F42", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "empty": lambda h: b"",
    "header_only_length": lambda h: struct.pack("<Q", 2),
    "shape_and_offsets_disagree": lambda h: safetensors_bytes({f"{h.t1[0]}.lora_A.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}}, b"\0" * 8),
}
for _name in FILE_BYTES:
    _file_with_bytes(_name)


def _metadata_case(name, metadata):
    def make(h, tmp):
        path = save(beside_good(h, diffusers_pair(h.t1)), tmp / f"{name}.safetensors", {"lora_adapter_metadata": metadata})
        return load(h, path), [path]

    make.__name__ = f"header_{name}"
    case(make)


for _name, _metadata in {
    "metadata_not_json": "{lora_alpha: 4",
    "metadata_a_json_list": "[1, 2]",
    "metadata_alpha_not_a_number": json.dumps({"r": 2, "lora_alpha": "abc"}),
    "metadata_alpha_nan": '{"r": 2, "lora_alpha": NaN}',
    "metadata_bad_regex_in_alpha_pattern": json.dumps({"r": 2, "lora_alpha": 2, "alpha_pattern": {"q_proj(": 1}}),
    "metadata_rank_pattern_a_list": json.dumps({"r": 2, "lora_alpha": 2, "rank_pattern": [1]}),
    "metadata_target_modules_an_int": json.dumps({"r": 2, "lora_alpha": 2, "target_modules": 5}),
}.items():
    _metadata_case(_name, _metadata)


def _peft_folder_case(name, config_bytes):
    def make(h, tmp):
        folder = tmp / name
        folder.mkdir()
        sd = {"base_model.model." + kk: v for kk, v in beside_good(h, diffusers_pair(h.t1)).items()}
        save(sd, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_bytes(config_bytes)
        return load(h, str(folder)), ["adapter_config.json"]

    make.__name__ = f"peft_config_{name}"
    case(make)


_GOOD_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj", "up_proj"]}
for _name, _bytes in {
    "not_utf8": b"\xff\xfe\x00{",
    "a_json_list": b"[]",
    "a_json_string": b'"LORA"',
    "not_json": b"{r: 2",
    "r_not_a_number": json.dumps({**_GOOD_CONFIG, "r": "abc"}).encode(),
    "alpha_pattern_a_string": json.dumps({**_GOOD_CONFIG, "alpha_pattern": "x"}).encode(),
    "peft_type_loha": json.dumps({**_GOOD_CONFIG, "peft_type": "LOHA"}).encode(),
    "use_qalora": json.dumps({**_GOOD_CONFIG, "use_qalora": True}).encode(),
}.items():
    _peft_folder_case(_name, _bytes)


@case
def bin_with_allow_pickle_false(h, tmp):
    path = tmp / "adapter.bin"
    torch.save(beside_good(h, diffusers_pair(h.t1)), path)
    return load(h, str(path), allow_pickle=False), [str(path), "allow_pickle"]


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


@case
def bin_with_a_pickled_object(h, tmp):
    path = tmp / "evil.bin"
    torch.save({"x": _Evil()}, path)
    return load(h, str(path)), [str(path)]


@case
def bin_holding_a_list(h, tmp):
    path = tmp / "list.bin"
    torch.save([torch.ones(2)], path)
    return load(h, str(path)), [str(path)]


@case
def missing_file(h, tmp):
    return load(h, str(tmp / "nope.safetensors")), ["nope.safetensors"]


@case
def folder_with_two_weight_files(h, tmp):
    save(diffusers_pair(h.t1), tmp / "one.safetensors")
    save(diffusers_pair(h.t1), tmp / "two.safetensors")
    return load(h, str(tmp)), [str(tmp), "weight_name"]


@case
def folder_without_weights(h, tmp):
    (tmp / "readme.txt").write_text("x")
    return load(h, str(tmp)), [str(tmp)]


@case
def weight_name_for_a_file(h, tmp):
    path = save(diffusers_pair(h.t1), tmp / "x.safetensors")
    return load(h, path, weight_name="y.safetensors"), [path]


@case
def source_of_another_type(h, tmp):
    return load(h, 42), ["int"]


@case
def unexpected_keyword(h, tmp):
    return load(h, diffusers_pair(h.t1), bogus=1), ["bogus"]


# -- names and calls -----------------------------------------------------------------------------------

for _bad, _needle in {"__base__": "__base__", "": "adapter_name", "a.b": "a.b", "ok": "ok", 3: "adapter_name"}.items():

    def _name_case(h, tmp, bad=_bad, needle=_needle):
        return (lambda host: host.load_lora_weights(diffusers_pair(h.t1), adapter_name=bad)), [needle]

    _name_case.__name__ = f"adapter_name_{_bad!r}"
    case(_name_case)


@case
def hotswap_of_an_unknown_adapter(h, tmp):
    return load(h, diffusers_pair(h.t1), adapter_name="zzz", hotswap=True), ["zzz"]


@case
def hotswap_above_the_loaded_rank(h, tmp):
    return load(h, diffusers_pair(h.t1, rank=7), adapter_name="ok", hotswap=True), ["prepare_hotswap"]


@case
def hotswap_onto_layers_the_adapter_lacks(h, tmp):
    return load(h, {**diffusers_pair(h.t1), **diffusers_pair(h.t3)}, adapter_name="ok", hotswap=True), [h.t3[0].split(".", 1)[1]]


@case
def hotswap_bringing_dora(h, tmp):
    sd = {**diffusers_pair(h.t1), f"{h.t1[0]}.lora_magnitude_vector": torch.ones(h.t1[1][0])}
    return load(h, sd, adapter_name="ok", hotswap=True), ["DoRA"]


@case
def hotswap_with_nan(h, tmp):
    sd = with_value(diffusers_pair(h.t1), f"{h.t1[0]}.lora_A.weight", float("nan"))
    return load(h, sd, adapter_name="ok", hotswap=True), [f"{h.t1[0]}.lora_A.weight"]


@case
def set_adapters_with_a_repeated_name(h, tmp):
    return (lambda host: host.set_adapters(["ok", "ok"])), ["ok"]


@case
def set_adapters_with_a_nan_weight(h, tmp):
    return (lambda host: host.set_adapters(["ok"], [float("nan")])), ["weight"]


@case
def delete_a_repeated_name(h, tmp):
    return (lambda host: host.delete_adapters(["ok", "ok"])), ["ok"]


@case
def fuse_a_repeated_name(h, tmp):
    return (lambda host: host.fuse_lora(adapter_names=["ok", "ok"])), ["ok"]


@case
def fuse_with_a_scale_that_is_not_a_number(h, tmp):
    return (lambda host: host.fuse_lora(lora_scale="x")), ["lora_scale"]


@case
def prepare_hotswap_below_a_loaded_rank(h, tmp):
    return (lambda host: lora_loader.prepare_hotswap(host, max_rank=1)), ["max_rank=1", "ok"]


@case
def save_under_a_file(h, tmp):
    (tmp / "afile").write_text("x")
    return (lambda host: host.save_lora_weights(str(tmp / "afile" / "sub"), adapter_name="ok")), ["afile"]


@case
def save_in_an_unknown_format(h, tmp):
    return (lambda host: host.save_lora_weights(str(tmp / "x.safetensors"), adapter_name="ok", format="ckpt")), ["ckpt"]


# -- running them -------------------------------------------------------------------------------------

_HOSTS: dict = {}


def prepared(h):
    """One host per kind for the whole table (a refused call leaves it as it was, which is the point):
    adapter 'ok' (rank 2 on t1 and t2) and 'other' loaded, a blend set, a residency cap."""
    if h.name not in _HOSTS:
        host = h.build()
        host.load_lora_weights({**diffusers_pair(h.t1, seed=8), **diffusers_pair(h.t2, seed=9)}, adapter_name="ok")
        host.load_lora_weights(kohya_pair(h, seed=10), adapter_name="other")
        host.set_adapters(["ok", "other"], [0.7, -0.4])
        host.set_max_resident_adapters(2)
        _HOSTS[h.name] = host
    return _HOSTS[h.name]


@pytest.mark.parametrize("h", [Pipe, LM], ids=lambda h: h.name)
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_bad_input_is_a_lora_error_naming_it_and_changes_nothing(name, h, tmp_path):
    host = prepared(h)
    call, needles = CASES[name](h, tmp_path)
    before = fingerprint(host)
    with pytest.raises(LoraError) as info:
        call(host)
    assert_unchanged(before, fingerprint(host))
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not named in: {message}"


def test_the_table_holds_at_least_seventy_cases():
    assert len(CASES) >= 70, len(CASES)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_large_finite_values_whose_sum_overflows_are_no_nan_or_inf(dtype):
    """The finiteness check sums a tensor first (cheap) and looks value by value only when the sum is not
    finite: every value here is finite, so the file converts, though its sum overflows the dtype's range."""
    from lora_loader import formats

    big = torch.finfo(dtype).max / 2
    tensors = {
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.full((4, 32), big, dtype=dtype),
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.full((32, 4), big, dtype=dtype),
    }
    assert not torch.isfinite(tensors["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].sum())
    assert formats.tensor_problems(tensors) == {}
    tensors["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"][3, 1] = float("inf")
    assert list(formats.tensor_problems(tensors)) == ["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"]
