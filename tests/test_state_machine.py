"""A hypothesis state machine over the whole API, checked after every step against a dense reference.

The reference is independent of lora_loader: it holds the base weights and every adapter's own
factors (the ones this test wrote into the files it loads), computes each targeted layer's
effective weight ``W0 + fused + sum(w * alpha / r * B @ A)`` by the rules the API documents, writes
those weights into an untouched copy of the base model, and runs it. The host under test (a tiny
Llama, or a tiny SD pipeline: UNet + text encoder) must give the same outputs, report the same
active adapters and adapters per component, and a refused call must raise a `LoraError` and leave
the host bitwise unchanged.

Steps: load (diffusers and Kohya layouts), hotswap, set_adapters (random weights, 0 and negative
included), disable / enable, fuse (random scale, subsets of adapters and components), unfuse,
delete, unload, save + reload in each layout (diffusers, kohya, peft), prepare_hotswap, residency
caps, mixed batches (the LM), and calls that must be refused (unknown, repeated or reserved names).

CI runs a fixed, derandomized sequence of a few examples per host. For a longer random run::

    LORA_LOADER_FUZZ_EXAMPLES=2000 python -m pytest -q tests/test_state_machine.py
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch
from fingerprint import assert_unchanged, fingerprint
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from llm_tiny import input_ids, tiny_llama
from tiny import text_ids, tiny_sd_pipeline, unet_inputs

import lora_loader
from lora_loader import LoraError

FUZZ = int(os.environ.get("LORA_LOADER_FUZZ_EXAMPLES", "0"))
NAMES = ("a", "b", "c", "d")
WEIGHTS = st.sampled_from([0.0, 1.0, -1.0, 0.5, -0.25, 1.5, 2.0])
ALPHAS = st.sampled_from([None, 1.0, 2.0, 0.5, 3.0])


def run_settings(examples: int):
    return settings(
        max_examples=FUZZ or examples,
        stateful_step_count=14 if not FUZZ else 30,
        derandomize=not FUZZ,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


# -- the two hosts: their targets, how a file names a target, their outputs ---------------------------


class LlamaHost:
    kind = "lm"
    components = ("model",)
    targets = {
        ("model", "model.layers.0.self_attn.q_proj"): (16, 16),
        ("model", "model.layers.1.self_attn.v_proj"): (8, 16),
        ("model", "model.layers.0.mlp.up_proj"): (32, 16),
        ("model", "model.layers.1.mlp.down_proj"): (16, 32),
    }

    @staticmethod
    def build():
        return tiny_llama(0)

    @staticmethod
    def attach(model):
        return lora_loader.attach(model)

    @staticmethod
    def modules(model) -> dict[str, torch.nn.Module]:
        return {"model": model}

    @staticmethod
    def key(component: str, path: str, layout: str) -> str:
        return path if layout == "diffusers" else "lora_unet_" + path.replace(".", "_")

    @staticmethod
    @torch.no_grad()
    def outputs(model) -> dict[str, torch.Tensor]:
        return {"logits": model(input_ids=input_ids()).logits.clone()}


class PipelineHost:
    kind = "pipeline"
    components = ("unet", "text_encoder")
    targets = {
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"): (8, 8),
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"): (8, 16),
        ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"): (8, 32),
        ("text_encoder", "encoder.layers.0.self_attn.q_proj"): (16, 16),
        ("text_encoder", "encoder.layers.1.mlp.fc1"): (32, 16),
    }

    @staticmethod
    def build():
        return tiny_sd_pipeline(0)

    @staticmethod
    def attach(pipe):
        return lora_loader.attach(pipe)

    @staticmethod
    def modules(pipe) -> dict[str, torch.nn.Module]:
        return {"unet": pipe.unet, "text_encoder": pipe.text_encoder}

    @staticmethod
    def key(component: str, path: str, layout: str) -> str:
        if layout == "diffusers":
            return f"{component}.{path}"
        return ("lora_unet_" if component == "unet" else "lora_te_") + path.replace(".", "_")

    @staticmethod
    @torch.no_grad()
    def outputs(pipe) -> dict[str, torch.Tensor]:
        return {
            "unet": pipe.unet(**unet_inputs(pipe)).sample.clone(),
            "text_encoder": pipe.text_encoder(text_ids()).last_hidden_state.clone(),
        }


# -- the reference ------------------------------------------------------------------------------------


class Adapter:
    """What the test knows of one adapter: the layers it was loaded on, its live factors, and per layer
    its rank and its room (the largest rank a hotswap may bring: the rank, or prepare_hotswap's max_rank)."""

    def __init__(self, layers, factors: dict, rank: dict):
        self.layers = set(layers)  # targets it is loaded on (a hotswap keeps them, silencing the absent)
        self.factors = dict(factors)  # target -> (A, B, scale)
        self.rank = dict(rank)  # target -> rank (a silenced layer keeps its old one)
        self.room = dict(rank)


def dense(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * (B.double() @ A.double())


class APIMachine(RuleBasedStateMachine):
    host_spec = LlamaHost

    def __init__(self):
        super().__init__()
        spec = self.host_spec
        self.host = spec.attach(spec.build())
        self.reference = spec.build()
        self.base = {t: self._module(self.reference, t).weight.detach().double().clone() for t in spec.targets}
        self.adapters: dict[str, Adapter] = {}  # in load order, as the registry keeps them
        self.active = {c: [] for c in spec.components}  # per component, as peft's layers keep them
        self.weights: dict[str, float] = {}
        self.enabled = True
        self.fused: dict = {}  # target -> dense delta written into the weights
        self.fused_pairs: set = set()  # (name, target)
        self.tmp = tempfile.mkdtemp(prefix="lora-sm-")
        self.saved = 0

    def teardown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------------------------
    def _module(self, root, target):
        component, path = target
        return self.host_spec.modules(root)[component].get_submodule(path)

    def effective(self, target) -> torch.Tensor:
        w = self.base[target].clone()
        if not self.enabled:
            return w
        w += self.fused.get(target, 0)
        for name in self.active[target[0]]:
            factors = self.adapters[name].factors
            if target in factors and (name, target) not in self.fused_pairs:
                w += self.weights[name] * dense(*factors[target])
        return w

    @torch.no_grad()
    def expected(self, per_target=None) -> dict[str, torch.Tensor]:
        for target in self.host_spec.targets:
            weight = self.effective(target) if per_target is None else per_target(target)
            self._module(self.reference, target).weight.copy_(weight.float())
        return self.host_spec.outputs(self.reference)

    def new_factors(self, data, layers, max_rank=4):
        seed = data.draw(st.integers(0, 2**16), label="seed")
        rank = data.draw(st.integers(1, max_rank), label="rank")
        alpha = data.draw(ALPHAS, label="alpha")
        g = torch.Generator().manual_seed(seed)
        factors = {}
        for target in sorted(layers):
            out_f, in_f = self.host_spec.targets[target]
            A = torch.randn(rank, in_f, generator=g) * 0.3
            B = torch.randn(out_f, rank, generator=g) * 0.3
            factors[target] = (A, B, (rank if alpha is None else alpha) / rank)
        return factors, rank, alpha

    def state_dict(self, factors, alpha, layout):
        sd = {}
        for (component, path), (A, B, _) in factors.items():
            key = self.host_spec.key(component, path, layout)
            down, up = ("lora_A.weight", "lora_B.weight") if layout == "diffusers" else ("lora_down.weight", "lora_up.weight")
            sd[f"{key}.{down}"], sd[f"{key}.{up}"] = A.clone(), B.clone()
            if alpha is not None:
                sd[f"{key}.alpha"] = torch.tensor(float(alpha))
        return sd

    def refused(self, call):
        before = fingerprint(self.host)
        with pytest.raises(LoraError):
            call()
        assert_unchanged(before, fingerprint(self.host))

    def subset(self, data, pool, label, min_size=1):
        pool = sorted(pool)
        return data.draw(st.lists(st.sampled_from(pool), min_size=min_size, max_size=len(pool), unique=True), label=label) if pool else []

    # -- rules ---------------------------------------------------------------------------------------
    @initialize(data=st.data())
    def first_load(self, data):
        self.load(data)

    @precondition(lambda self: len(self.adapters) < len(NAMES))
    @rule(data=st.data())
    def load(self, data):
        name = data.draw(st.sampled_from([n for n in NAMES if n not in self.adapters]), label="name")
        layers = self.subset(data, self.host_spec.targets, "layers")
        factors, rank, alpha = self.new_factors(data, layers)
        layout = data.draw(st.sampled_from(["diffusers", "kohya"]), label="layout")
        self.host.load_lora_weights(self.state_dict(factors, alpha, layout), adapter_name=name)
        self.adapters[name] = Adapter(layers, factors, {t: rank for t in layers})
        self.loaded(name)

    def loaded(self, name):
        """After a load: the new adapter alone is active, weight 1, in each component it adapts (as
        diffusers+peft and transformers do); other components keep their lists."""
        self.weights[name] = 1.0
        for component in {c for c, _ in self.adapters[name].layers}:
            self.active[component] = [name]

    @precondition(lambda self: self.adapters)
    @rule(data=st.data())
    def hotswap(self, data):
        name = data.draw(st.sampled_from(sorted(self.adapters)), label="name")
        adapter = self.adapters[name]
        layers = self.subset(data, adapter.layers, "layers")
        factors, rank, alpha = self.new_factors(data, layers, max_rank=6)
        sd = self.state_dict(factors, alpha, data.draw(st.sampled_from(["diffusers", "kohya"]), label="layout"))
        call = lambda: self.host.load_lora_weights(sd, adapter_name=name, hotswap=True)  # noqa: E731
        if any(n == name for n, _ in self.fused_pairs) or any(rank > adapter.room[t] for t in layers):
            return self.refused(call)
        call()
        adapter.factors = factors
        adapter.rank.update({t: rank for t in layers})

    @precondition(lambda self: self.adapters)
    @rule(data=st.data())
    def set_adapters(self, data):
        names = self.subset(data, self.adapters, "names", min_size=0)
        weights = [data.draw(WEIGHTS, label=f"w_{n}") for n in names]
        self.host.set_adapters(names, weights)
        self.active = {c: list(names) for c in self.active}
        self.weights.update(zip(names, weights))

    @rule()
    def disable(self):
        self.host.disable_lora()
        self.enabled = False

    @rule()
    def enable(self):
        self.host.enable_lora()
        self.enabled = True

    @precondition(lambda self: self.adapters)
    @rule(data=st.data())
    def fuse(self, data):
        scale = data.draw(st.sampled_from([1.0, 0.5, -1.0, 2.0]), label="lora_scale")
        names = None if data.draw(st.booleans(), label="default names") else self.subset(data, self.adapters, "names")
        components = None
        if len(self.host_spec.components) > 1 and data.draw(st.booleans(), label="some components"):
            components = self.subset(data, self.host_spec.components, "components")
        call = lambda: self.host.fuse_lora(lora_scale=scale, adapter_names=names, components=components)  # noqa: E731
        pairs = [
            (name, target)
            for component in (components or self.host_spec.components)
            for name in (self.active[component] if names is None else names)
            for target in self.adapters[name].layers
            if target[0] == component
        ]
        fused_layers = {t for _, t in self.fused_pairs}
        if any(t in fused_layers for _, t in pairs):  # a layer is fused once until unfuse_lora
            return self.refused(call)
        call()
        for name, target in pairs:
            self.fused_pairs.add((name, target))
            adapter = self.adapters[name]
            if target in adapter.factors:
                delta = self.weights[name] * scale * dense(*adapter.factors[target])
                self.fused[target] = self.fused.get(target, 0) + delta

    @rule()
    def unfuse(self):
        self.host.unfuse_lora()
        self.fused, self.fused_pairs = {}, set()

    @precondition(lambda self: self.adapters)
    @rule(data=st.data())
    def delete(self, data):
        names = self.subset(data, self.adapters, "names")
        call = lambda: self.host.delete_adapters(names)  # noqa: E731
        if any(n in names for n, _ in self.fused_pairs):
            return self.refused(call)
        call()
        for name in names:
            del self.adapters[name]
            self.weights.pop(name)
            for component, active in self.active.items():
                if name in active:
                    active.remove(name)
                    if not active:  # peft's rule: the component's first remaining adapter comes on
                        remaining = [n for n, a in self.adapters.items() if component in {c for c, _ in a.layers}]
                        active.extend(remaining[:1])

    @rule()
    def unload(self):
        self.host.unload_lora_weights()
        for target, delta in self.fused.items():  # fused, then unloaded: baked into the base
            self.base[target] = self.base[target] + delta
        self.adapters, self.weights = {}, {}
        self.active = {c: [] for c in self.active}
        self.fused, self.fused_pairs, self.enabled = {}, set(), True

    @precondition(lambda self: self.adapters and len(self.adapters) < len(NAMES))
    @rule(data=st.data())
    def save_and_reload(self, data):
        name = data.draw(st.sampled_from(sorted(self.adapters)), label="name")
        fmt = data.draw(st.sampled_from(["diffusers", "kohya", "peft"]), label="format")
        new = data.draw(st.sampled_from([n for n in NAMES if n not in self.adapters]), label="new name")
        self.saved += 1
        path = os.path.join(self.tmp, f"{self.saved}.safetensors")
        self.host.save_lora_weights(path, adapter_name=name, format=fmt)
        self.host.load_lora_weights(path, adapter_name=new)
        old = self.adapters[name]
        self.adapters[new] = Adapter(old.layers, old.factors, old.rank)
        self.loaded(new)

    @precondition(lambda self: self.adapters)
    @rule(data=st.data())
    def prepare_hotswap(self, data):
        max_rank = data.draw(st.integers(1, 6), label="max_rank")
        call = lambda: lora_loader.prepare_hotswap(self.host, max_rank=max_rank)  # noqa: E731
        if any(room > max_rank for a in self.adapters.values() for room in a.room.values()):
            return self.refused(call)
        call()
        for adapter in self.adapters.values():
            adapter.room = {t: max_rank for t in adapter.room}

    @rule(data=st.data())
    def residency_cap(self, data):
        cap = data.draw(st.sampled_from([None, 0, 1, 2]), label="cap")
        self.host.set_max_resident_adapters(cap)

    @precondition(lambda self: self.adapters)
    @rule(data=st.data())
    def refused_names(self, data):
        bad = data.draw(st.sampled_from([["zzz"], ["__base__"], None, "__base__"]), label="bad")
        call = data.draw(st.sampled_from(["set_adapters", "delete_adapters", "fuse_lora"]), label="call")
        if bad is None:  # a name twice
            bad = [sorted(self.adapters)[0]] * 2
        fn = (lambda: self.host.fuse_lora(adapter_names=bad)) if call == "fuse_lora" else (lambda: getattr(self.host, call)(bad))
        self.refused(fn)

    @precondition(lambda self: self.adapters)
    @rule(data=st.data())
    def refused_load(self, data):
        name = data.draw(st.sampled_from(["__base__", "", "x.y", sorted(self.adapters)[0]]), label="name")
        factors, _, alpha = self.new_factors(data, [next(iter(self.host_spec.targets))])
        self.refused(lambda: self.host.load_lora_weights(self.state_dict(factors, alpha, "diffusers"), adapter_name=name))

    # -- invariants ----------------------------------------------------------------------------------
    @invariant()
    def same_outputs_as_the_dense_reference(self):
        got, want = self.host_spec.outputs(self.host), self.expected()
        for key in want:
            assert torch.allclose(got[key], want[key], atol=2e-4, rtol=1e-4), (key, (got[key] - want[key]).abs().max())

    @invariant()
    def same_adapters_reported(self):
        adapted = {c for a in self.adapters.values() for c, _ in a.layers}
        # diffusers reports the last adapted component's list (denoiser first, then text encoders)
        shown = next((self.active[c] for c in reversed(self.host_spec.components) if c in adapted), [])
        assert self.host.get_active_adapters() == shown
        listed = {c: sorted(names) for c, names in self.host.get_list_adapters().items()}
        expected = {}
        for name, adapter in self.adapters.items():
            for component in {c for c, _ in adapter.layers}:
                expected.setdefault(component, []).append(name)
        assert listed == {c: sorted(n) for c, n in expected.items()}


class LMMachine(APIMachine):
    host_spec = LlamaHost

    @precondition(lambda self: self.adapters)
    @rule(data=st.data())
    def mixed_batch(self, data):
        rows = [data.draw(st.sampled_from(["__base__", *sorted(self.adapters)]), label=f"row{i}") for i in range(2)]
        call = lambda: self.host(input_ids=input_ids(), adapter_names=rows).logits  # noqa: E731
        if self.enabled and self.fused_pairs:
            return self.refused(call)
        with torch.no_grad():
            got = call()
        for i, row in enumerate(rows):

            def weight(target, row=row):
                w = self.base[target].clone()
                if self.enabled and row != "__base__" and target in self.adapters[row].factors:
                    w += dense(*self.adapters[row].factors[target])
                return w

            want = self.expected(weight)["logits"]
            assert torch.allclose(got[i], want[i], atol=2e-4, rtol=1e-4), (rows, i)


class PipelineMachine(APIMachine):
    host_spec = PipelineHost


test_the_api_on_a_tiny_llama_matches_the_dense_reference = run_settings(20)(LMMachine).TestCase
test_the_api_on_a_tiny_sd_pipeline_matches_the_dense_reference = run_settings(7)(PipelineMachine).TestCase
