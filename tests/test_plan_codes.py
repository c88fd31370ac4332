"""A load's plan records every key it does not apply with a reason code, and the error class follows the codes.

Callers (the load itself, reports, tools) decide on `inject.Unapplied.code`, never on the wording
of `why`, which is for people.
"""

import warnings

import pytest
import torch
from torch import nn

import lora_loader
from lora_loader import inject
from lora_loader.errors import LoraFormatError, LoraTargetError
from lora_loader.formats import convert


def model() -> nn.Module:
    torch.manual_seed(0)
    return lora_loader.attach(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 6)))


def pair(path: str, rank: int = 2, width: int = 4, rows: int = 4) -> dict[str, torch.Tensor]:
    return {f"{path}.lora_A.weight": torch.ones(rank, width), f"{path}.lora_B.weight": torch.ones(rows, rank)}


def plan_of(host, tensors: dict, strict: bool = False) -> inject.Plan:
    converted = convert(tensors, {}, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return inject.plan(converted, host._lora_components(), host._lora_resolve_component, "f.safetensors", tensors, strict)


def test_each_unapplied_key_has_the_code_of_its_reason():
    tensors = {
        **pair("0"),  # applies
        **pair("missing"),  # names no module
        **pair("1"),  # a ReLU: no adapter applies to it
        **pair("2", rows=5),  # Linear 4->6, but lora_B has 5 rows
        "0.some_other.weight": torch.ones(2),  # no converter reads it
    }
    planned = plan_of(model(), tensors)

    codes = {key: u.code for key, u in planned.unapplied.items()}
    assert [(p.path, p.delta.rank) for p in planned.modules] == [("0", 2)]
    assert codes == {
        "missing.lora_A.weight": inject.NO_MODULE, "missing.lora_B.weight": inject.NO_MODULE,
        "1.lora_A.weight": inject.UNSUPPORTED_MODULE, "1.lora_B.weight": inject.UNSUPPORTED_MODULE,
        "2.lora_A.weight": inject.DOES_NOT_FIT, "2.lora_B.weight": inject.DOES_NOT_FIT,
        "0.some_other.weight": inject.UNKNOWN_KEY,
    }  # fmt: skip
    assert sorted(planned.skipped) == sorted(codes)  # strict=False: every one of them skipped and reported


def test_all_zero_keys_that_cannot_apply_are_skipped_not_raised_even_when_strict():
    tensors = {**pair("0"), "missing.lora_A.weight": torch.zeros(2, 4), "missing.lora_B.weight": torch.zeros(4, 2)}
    planned = plan_of(model(), tensors, strict=True)
    assert planned.unapplied["missing.lora_A.weight"].code == inject.NO_MODULE
    assert sorted(planned.skipped) == ["missing.lora_A.weight", "missing.lora_B.weight"]


@pytest.mark.parametrize("target", ["missing", "1"], ids=["no module", "unsupported module"])
def test_a_file_whose_only_problem_is_its_targets_raises_a_target_error(target):
    with pytest.raises(LoraTargetError):
        plan_of(model(), {**pair("0"), **pair(target)}, strict=True)


def test_a_key_no_converter_reads_makes_it_a_format_error_even_beside_target_problems():
    tensors = {**pair("0"), **pair("missing"), "0.some_other.weight": torch.ones(2)}
    with pytest.raises(LoraFormatError) as raised:
        plan_of(model(), tensors, strict=True)
    assert not isinstance(raised.value, LoraTargetError)
