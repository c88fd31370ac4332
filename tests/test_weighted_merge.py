"""``add_weighted_adapter``: a new adapter made of several, equal to PEFT's ``add_weighted_adapter`` on the same ones.

Two PEFT adapters (made and saved by peft on a tiny Llama; one rank, different alphas and
overlapping targets) are loaded by ``peft.PeftModel`` and by lora_loader; both merge them with
the same arguments. The merged adapter must have PEFT's tensors (its ``lora_A`` / ``lora_B``
per module, via ``get_adapter_state_dict``) and PEFT's logits. DARE prunes at random: both
merges draw their masks from one restarted generator, visiting the modules in the same order.
"""

from __future__ import annotations

import peft
import pytest
import torch
from llm_tiny import logits, peft_adapter, peft_oracle, tiny_llama

import lora_loader
from lora_loader import LoraError, LoraNameError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:peft")

CONFIGS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "b": dict(r=4, lora_alpha=3, target_modules=["q_proj", "k_proj", "down_proj"]),
    "c": dict(r=2, lora_alpha=2, target_modules=["v_proj", "o_proj"]),  # another rank: cat and *_svd only
}
COMBINATIONS = [
    ("linear", {}), ("cat", {}), ("svd", {}), ("svd", {"svd_rank": 3}), ("ties", {"density": 0.5}),
    ("ties", {"density": 0.3, "majority_sign_method": "frequency"}), ("dare_linear", {"density": 0.6}),
    ("dare_ties", {"density": 0.6}), ("magnitude_prune", {"density": 0.4}), ("ties_svd", {"density": 0.5}),
    ("dare_linear_svd", {"density": 0.7}), ("magnitude_prune_svd", {"density": 0.5}), ("svd", {"svd_clamp": 0.9}),
]  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: peft_adapter(tiny_llama(0), peft.LoraConfig(init_lora_weights=False, **cfg), root / name, seed=i + 1)
        for i, (name, cfg) in enumerate(CONFIGS.items())
    }


class SeededBernoulli:
    """``torch.bernoulli`` drawing from its own generator, restarted before each merge: PEFT also draws the new
    adapter's initial weights from torch's global generator, so a global seed alone does not line the masks up."""

    def __init__(self, monkeypatch):
        self.real = torch.bernoulli
        monkeypatch.setattr(torch, "bernoulli", self)

    def restart(self):
        self.generator = torch.Generator().manual_seed(123)

    def __call__(self, probabilities, *args, **kwargs):
        return self.real(probabilities, generator=self.generator)


def both_merged(folders, names, weights, combination_type, kwargs, monkeypatch=None):
    bernoulli = SeededBernoulli(monkeypatch) if monkeypatch is not None else None
    reference = peft_oracle(tiny_llama, {n: folders[n] for n in names})
    if bernoulli:
        bernoulli.restart()
    reference.add_weighted_adapter(names, weights, "merged", combination_type=combination_type, **kwargs)
    reference.set_adapter("merged")
    mine = lora_loader.attach(tiny_llama(0))
    for name in names:
        mine.load_adapter(folders[name], adapter_name=name)
    if bernoulli:
        bernoulli.restart()
    mine.add_weighted_adapter(names, weights, "merged", combination_type=combination_type, **kwargs)
    return reference, mine


@pytest.mark.parametrize("combination_type, kwargs", COMBINATIONS, ids=lambda v: str(v) if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_a_weighted_merge_has_the_tensors_and_logits_of_peft_s(folders, combination_type, kwargs, monkeypatch):
    reference, mine = both_merged(folders, ["a", "b"], [0.7, -0.4], combination_type, kwargs, monkeypatch)
    from peft import get_peft_model_state_dict

    theirs = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(reference, adapter_name="merged").items()}
    ours = mine.get_adapter_state_dict("merged")
    assert sorted(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        torch.testing.assert_close(ours[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    assert mine.active_adapters() == ["merged"]
    base = logits(tiny_llama(0))
    want = logits(reference)
    assert (want - base).abs().max() > 1e-3
    torch.testing.assert_close(logits(mine), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("combination_type", ["cat", "svd", "dare_ties_svd"])
def test_adapters_of_different_ranks_merge_with_cat_and_svd_as_in_peft(folders, combination_type, monkeypatch):
    kwargs = {"density": 0.5} if "dare" in combination_type else {}
    reference, mine = both_merged(folders, ["a", "c"], [1.0, 0.5], combination_type, kwargs, monkeypatch)
    torch.testing.assert_close(logits(mine), logits(reference), rtol=1e-4, atol=1e-4)


def test_a_merged_adapter_saves_in_peft_s_layout_and_peft_loads_it(folders, tmp_path):
    reference, mine = both_merged(folders, ["a", "b"], [0.5, 0.5], "linear", {})
    mine.save_adapter(str(tmp_path / "merged"), "merged")
    again = peft.PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "merged")).eval()
    torch.testing.assert_close(logits(again), logits(reference), rtol=1e-4, atol=1e-4)


def test_bad_merges_are_refused_and_change_nothing(folders):
    mine = lora_loader.attach(tiny_llama(0))
    for name in ("a", "c"):
        mine.load_adapter(folders[name], adapter_name=name)
    before = {k: v.clone() for k, v in mine.state_dict().items()}
    adapters = mine.get_list_adapters()
    cases = [
        (LoraError, "one rank", dict(adapters=["a", "c"], weights=[1, 1], adapter_name="x", combination_type="linear")),
        (LoraError, "density", dict(adapters=["a", "c"], weights=[1, 1], adapter_name="x", combination_type="ties")),
        (LoraError, "combination_type", dict(adapters=["a"], weights=[1], adapter_name="x", combination_type="mean")),
        (LoraError, "one weight each", dict(adapters=["a", "c"], weights=[1], adapter_name="x", combination_type="cat")),
        (LoraNameError, "already in use", dict(adapters=["a", "c"], weights=[1, 1], adapter_name="a", combination_type="cat")),
        (LoraNameError, "nope", dict(adapters=["a", "nope"], weights=[1, 1], adapter_name="x", combination_type="cat")),
    ]
    for error, message, kwargs in cases:
        with pytest.raises(error, match=message):
            mine.add_weighted_adapter(**kwargs)
    assert mine.get_list_adapters() == adapters
    after = mine.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_pipelines_merge_their_adapters_per_component(tmp_path):
    """On a pipeline: each component's modules merge; the new adapter is one adapter over them all."""
    from test_dit_pipelines import both, diffusers_file
    from tiny_dit import run

    _, pipe = both("flux")
    pipe.load_lora_weights(diffusers_file("flux", tmp_path, seed=1), adapter_name="one")
    pipe.load_lora_weights(diffusers_file("flux", tmp_path, seed=2), adapter_name="two")
    pipe.set_adapters(["one", "two"], [0.7, 0.3])
    blended = run(pipe)
    pipe.add_weighted_adapter(["one", "two"], [0.7, 0.3], "cat", combination_type="cat")
    assert pipe.get_active_adapters() == ["cat"]
    assert sorted(pipe.get_list_adapters()) == ["text_encoder", "transformer"]
    # cat keeps every factor: the merged adapter is the blend, exactly up to float rounding.
    torch.testing.assert_close(run(pipe), blended, rtol=1e-4, atol=1e-4)


def test_lora_loader_merge_writes_one_file_that_loads_as_the_blend(capsys, tmp_path):
    """``lora-loader merge A:0.7 B:0.3 --to OUT --combination-type cat --model <folder>``: OUT alone gives what the
    two files blended [0.7, 0.3] give; a linear merge of PEFT-layout LLM adapters equals peft's."""
    from test_cli import run
    from test_dit_pipelines import both, diffusers_file
    from tiny_dit import run as run_pipe, tiny_flux_pipeline

    folder = tmp_path / "flux"
    tiny_flux_pipeline(0).save_pretrained(folder)
    a, b = diffusers_file("flux", tmp_path, seed=1), diffusers_file("flux", tmp_path, seed=2)
    out = tmp_path / "ab.safetensors"
    code, printed, err = run(capsys, "merge", f"{a}:0.7", f"{b}:0.3", "--to", out, "--combination-type", "cat", "--model", folder)
    assert code == 0, err
    assert "cat of" in printed and str(out) in printed
    _, pipe = both("flux")
    pipe.load_lora_weights(a, adapter_name="a")
    pipe.load_lora_weights(b, adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.7, 0.3])
    want = run_pipe(pipe)
    _, merged = both("flux")
    merged.load_lora_weights(str(out), adapter_name="ab")
    torch.testing.assert_close(run_pipe(merged), want, rtol=1e-4, atol=1e-4)
    code, _, err = run(capsys, "merge", f"{a}:0.7", f"{b}:0.3", "--to", out, "--model", folder)
    assert code != 0 and "exists" in err


def test_lora_loader_merge_of_peft_adapters_equals_peft_s_merge(capsys, folders, tmp_path):
    from test_cli import run

    model_dir = tmp_path / "llama"
    tiny_llama(0).save_pretrained(model_dir)
    out = tmp_path / "merged"
    code, _, err = run(capsys, "merge", f"{folders['a']}:0.7", f"{folders['b']}:-0.4", "--to", out, "--model", model_dir,
                       "--combination-type", "ties", "--density", "0.5", "--format", "peft")  # fmt: skip
    assert code == 0, err
    reference = peft_oracle(tiny_llama, {"a": folders["a"], "b": folders["b"]})
    reference.add_weighted_adapter(["a", "b"], [0.7, -0.4], "merged", combination_type="ties", density=0.5)
    reference.set_adapter("merged")
    again = peft.PeftModel.from_pretrained(tiny_llama(0), str(out)).eval()
    torch.testing.assert_close(logits(again), logits(reference), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "peft"])
def test_a_merged_adapter_saves_in_every_layout_and_loads_back_to_its_logits(folders, tmp_path, fmt, monkeypatch):
    _, mine = both_merged(folders, ["a", "b"], [0.6, 0.4], "dare_ties", {"density": 0.5}, monkeypatch)
    want = logits(mine)
    path = mine.save_lora_weights(str(tmp_path / f"merged-{fmt}.safetensors"), "merged", format=fmt)
    again = lora_loader.attach(tiny_llama(0))
    again.load_lora_weights(path, adapter_name="merged")
    torch.testing.assert_close(logits(again), want, rtol=1e-5, atol=1e-5)
