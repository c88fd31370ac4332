"""Fusing with the originals kept off the accelerator (issue 22 item 2): ``fuse_lora(keep_originals=...)``.

References: the model's own tensors before the fuse (every unfuse is compared with
``torch.equal``), the fused weights of ``keep_originals="device"`` (the way fusing
always worked: the other modes must fuse to the same bits), and the peak RSS of a
fuse in a fresh process, where the fused copies either need new memory or not.

No GPU here: "cpu" parking of an accelerator's weights is exercised by telling
`fuse` that CPU memory is an accelerator (`_is_accelerator`), and ``"auto"`` by
patching what CUDA reports free (``torch.cuda.mem_get_info``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

import lora_loader
from lora_loader import LoraError, fuse

ROOT = Path(__file__).resolve().parent.parent
MODES = ["device", "cpu", "disk", "auto"]


def tiny_model(dtype=torch.float32) -> torch.nn.Module:
    """A Linear, a 3x3 Conv2d and an Embedding (stored transposed, [num, dim]): every weight layout fusing writes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Conv2d(6, 4, 3), torch.nn.Embedding(10, 4))
    return lora_loader.attach(model.to(dtype))


def load_three(model) -> None:
    """Two LoRAs (one with DoRA on the Linear), a LoKr: plain factors, a DoRA delta that reads the base weight
    (written in place by the off-device modes), and a dense factor delta, all fused into layer 0."""
    g = torch.Generator().manual_seed(1)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    model.load_lora_weights({
        "0.lora_A.weight": r(2, 8), "0.lora_B.weight": r(6, 2),
        "1.lora_A.weight": r(2, 6, 3, 3), "1.lora_B.weight": r(4, 2, 1, 1),
        "2.lora_embedding_A": r(2, 10), "2.lora_embedding_B": r(4, 2),
    }, adapter_name="a")
    model.load_lora_weights({
        "0.lora_A.weight": r(3, 8), "0.lora_B.weight": r(6, 3), "0.lora_magnitude_vector": r(6).abs() + 0.5,
    }, adapter_name="dora")
    model.load_lora_weights({"0.lokr_w1": r(2, 2), "0.lokr_w2": r(3, 4), "0.alpha": torch.tensor(1.0)}, adapter_name="lokr")
    model.set_adapters(["a", "dora", "lokr"], [0.7, 0.5, 0.3])


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_equal_states(model, expected) -> None:
    now = model.state_dict()
    assert set(now) == set(expected)
    changed = [k for k in expected if not torch.equal(now[k], expected[k])]
    assert not changed, f"not bit-equal: {changed}"


@pytest.fixture
def cpu_is_an_accelerator(monkeypatch):
    """Make ``"cpu"`` park weights that live in CPU memory, as it parks an accelerator's."""
    monkeypatch.setattr(fuse, "_is_accelerator", lambda device: device.type != "meta")


def fused_reference(dtype) -> dict[str, torch.Tensor]:
    model = tiny_model(dtype)
    load_three(model)
    model.fuse_lora(keep_originals="device")
    return state(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_fuses_the_same_bits_and_unfuse_disable_enable_are_exact(mode, dtype, cpu_is_an_accelerator):
    model = tiny_model(dtype)
    before = state(model)
    load_three(model)
    pointers = [model[i].weight.data_ptr() for i in range(3)]
    model.fuse_lora(keep_originals=mode)
    kept = {model[i].__dict__["_lora_fusion"].kept for i in range(3)}
    assert kept == {"device" if mode == "auto" else mode}  # auto: nothing says the "accelerator" is short
    fused = state(model)
    assert_equal_states(model, fused_reference(dtype))
    if mode in ("cpu", "disk"):  # written in place: no second tensor per weight
        assert [model[i].weight.data_ptr() for i in range(3)] == pointers
    model.disable_lora()
    assert_equal_states(model, before)
    model.disable_lora()  # a second push changes nothing (no swap back and forth)
    assert_equal_states(model, before)
    model.enable_lora()
    assert_equal_states(model, fused)
    model.enable_lora()
    assert_equal_states(model, fused)
    model.unfuse_lora()
    assert_equal_states(model, before)
    assert all("_lora_fusion" not in model[i].__dict__ for i in range(3))
    model.fuse_lora(keep_originals=mode)  # again, after a full cycle
    assert_equal_states(model, fused)
    model.unfuse_lora()
    assert_equal_states(model, before)


@pytest.mark.parametrize("mode", ["cpu", "disk"])
@pytest.mark.parametrize("disabled", [False, True])
def test_unfuse_is_exact_after_the_fused_model_is_converted(mode, disabled, cpu_is_an_accelerator):
    """What unfuse restores after ``.half()`` / ``.to(bfloat16)`` is what converting the unfused model gives."""
    model = tiny_model()
    load_three(model)
    expected = {k: v.half().to(torch.bfloat16) for k, v in state(model).items()}  # fp32 -> fp16 -> bf16, as the model goes
    model.fuse_lora(keep_originals=mode)
    fused = state(model)
    if disabled:  # the parked weight is then the fused one: converted too
        model.disable_lora()
    model.half()
    model.to(torch.bfloat16)
    if disabled:
        model.enable_lora()
    assert_equal_states(model, {k: v.half().to(torch.bfloat16) for k, v in fused.items()})
    model.unfuse_lora()
    assert_equal_states(model, expected)


def test_cpu_parking_page_locks_the_originals_and_unlocks_them_after_unfuse(monkeypatch, cpu_is_an_accelerator):
    """With CUDA, "cpu" page-locks each parked weight's own memory (cudaHostRegister: no power-of-two blocks, no
    cache keeping it after the unfuse) and unlocks it when the parked copy goes. CUDA's calls are recorded here."""
    import gc

    calls = []

    class FakeCudart:
        def cudaHostRegister(self, ptr, nbytes, flags):
            calls.append(("register", ptr, nbytes))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))
            return 0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart())
    model = tiny_model()
    before = state(model)
    load_three(model)
    model.fuse_lora(keep_originals="cpu")
    registered = {ptr: n for kind, ptr, *n in calls if kind == "register"}
    assert sorted(n[0] for n in registered.values()) == sorted(model[i].weight.numel() * 4 for i in range(3))
    model.unfuse_lora()
    gc.collect()
    assert {ptr for kind, ptr, *_ in calls if kind == "unregister"} == set(registered)
    assert_equal_states(model, before)


def test_a_weight_in_cpu_memory_stays_as_it_is_with_cpu():
    """On a CPU-only model ``"cpu"`` has nothing to save: the original tensor itself is kept, as with ``"device"``."""
    model = tiny_model()
    load_three(model)
    original = model[0].weight.data_ptr()
    model.fuse_lora(keep_originals="cpu")
    fusion = model[0].__dict__["_lora_fusion"]
    assert fusion.kept == "device" and fusion.base[0].data_ptr() == original != model[0].weight.data_ptr()


def test_an_unknown_keep_originals_is_an_error_and_nothing_is_fused():
    model = tiny_model()
    load_three(model)
    before = state(model)
    with pytest.raises(LoraError, match="keep_originals='gpu'"):
        model.fuse_lora(keep_originals="gpu")
    assert_equal_states(model, before)
    assert "_lora_fusion" not in model[0].__dict__
    model.fuse_lora(keep_originals="disk")  # and the model still fuses


def test_fuse_then_unload_keeps_the_fused_weights(cpu_is_an_accelerator):
    """diffusers' "fuse, then unload": the parked originals are dropped, the fused weights stay."""
    reference = fused_reference(torch.float32)
    for mode in ("cpu", "disk"):
        model = tiny_model()
        load_three(model)
        model.fuse_lora(keep_originals=mode)
        model.unload_lora_weights()
        assert type(model[0]) is torch.nn.Linear
        assert all(torch.equal(model.state_dict()[k], reference[k]) for k in model.state_dict())


# -- "auto" -------------------------------------------------------------------------------------------


def cuda_weights(*nbytes: int) -> list:
    """Stand-ins for weights on a CUDA device: `where_to_keep` reads their device and size only."""
    return [types.SimpleNamespace(device=torch.device("cuda", 0), numel=lambda n=n: n // 2, element_size=lambda: 2) for n in nbytes]


@pytest.fixture
def gpu_with(monkeypatch):
    """Patch what CUDA reports: ``gpu_with(free)`` bytes free, nothing cached by PyTorch."""

    def patch(free: int, ram: int | None = None):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 24 << 30))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
        monkeypatch.setattr(fuse, "_available_ram", lambda: ram)

    return patch


def test_auto_keeps_the_originals_on_the_device_when_they_fit(gpu_with):
    gpu_with(free=20 << 30, ram=64 << 30)
    assert fuse.where_to_keep("auto", cuda_weights(6 << 30, 6 << 30)) == "device"  # 12 GiB of fused copies + margin


def test_auto_parks_the_originals_in_cpu_memory_when_the_device_is_short(gpu_with):
    """Flux in bf16 on a 24 GB card: the fused copies of 22 GB of targeted weights cannot be held twice."""
    gpu_with(free=1 << 30, ram=64 << 30)
    assert fuse.where_to_keep("auto", cuda_weights(*[1 << 30] * 22)) == "cpu"
    gpu_with(free=12 << 30, ram=64 << 30)  # 11.5 GiB needed: fits, but not with the margin
    assert fuse.where_to_keep("auto", cuda_weights(*[(23 << 30) // 2])) == "cpu"
    assert fuse.where_to_keep("device", cuda_weights(*[1 << 30] * 22)) == "device"  # asked for: as asked


def test_auto_parks_on_disk_when_cpu_memory_is_short_too(gpu_with):
    gpu_with(free=1 << 30, ram=16 << 30)
    assert fuse.where_to_keep("auto", cuda_weights(*[1 << 30] * 22)) == "disk"


def test_auto_on_a_model_short_of_accelerator_memory_parks_and_unfuses_exactly(monkeypatch, cpu_is_an_accelerator):
    """End to end: ``fuse_lora()`` (auto) on a model its device cannot hold twice parks the originals in CPU memory."""
    monkeypatch.setattr(fuse, "_free_bytes", lambda device: 1024)  # what torch.cuda.mem_get_info would say, on our CPU "accelerator"
    model = tiny_model()
    before = state(model)
    load_three(model)
    model.fuse_lora()
    assert {model[i].__dict__["_lora_fusion"].kept for i in range(3)} == {"cpu"}
    assert_equal_states(model, fused_reference(torch.float32))
    model.unfuse_lora()
    assert_equal_states(model, before)


# -- offloaded layers keep their way --------------------------------------------------------------------


def test_layers_offloaded_by_accelerate_keep_their_originals_in_the_weights_map(tmp_path):
    from accelerate import cpu_offload

    model = tiny_model()
    before = state(model)
    load_three(model)
    cpu_offload(model, execution_device=torch.device("cpu"))
    x = torch.randn(2, 8)
    unfused = model[0](x)
    model.fuse_lora(keep_originals="disk")
    fusion = model[0].__dict__["_lora_fusion"]
    assert fusion.kept == "device" and fusion.in_memory is not None  # the hook's weights map, as before
    torch.testing.assert_close(model[0](x), unfused, atol=1e-4, rtol=0)
    model.unfuse_lora()
    assert torch.equal(model[0](x), unfused)
    assert torch.equal(fuse.offload.real_tensor(model[0], "weight"), before["0.weight"])


def test_offloading_after_a_disk_fuse_then_unfusing_is_exact():
    """accelerate hooks added after the fuse: the parked original comes back beside the weights map's fused one."""
    from accelerate import cpu_offload

    model = tiny_model()
    load_three(model)
    x = torch.randn(2, 8)
    base_out = torch.nn.functional.linear(x, model[0].weight.detach().clone(), model[0].bias.detach().clone())
    model.fuse_lora(keep_originals="disk")
    fused_out = model[0](x)
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert torch.equal(model[0](x), fused_out)
    model.disable_lora()
    assert torch.equal(model[0](x), base_out)
    model.enable_lora()
    assert torch.equal(model[0](x), fused_out)
    model.unfuse_lora()
    model.disable_lora()
    assert torch.equal(model[0](x), base_out)


# -- memory ----------------------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, sys, torch, lora_loader
    torch.set_num_threads(1)
    mode, layers, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    def build(n, w):
        model = lora_loader.attach(torch.nn.Sequential(*[torch.nn.Linear(w, w, bias=False) for _ in range(n)]))
        g = torch.Generator().manual_seed(0)
        lora = {}
        for i in range(n):
            lora[f"{i}.lora_A.weight"] = torch.randn(8, w, generator=g)
            lora[f"{i}.lora_B.weight"] = torch.randn(w, 8, generator=g)
        model.load_lora_weights(lora, adapter_name="a")
        return model

    warm = build(2, 64)  # every code path (and the temp file) used once, so only the big fuse is measured
    warm.fuse_lora(keep_originals=mode); warm.unfuse_lora()
    model = build(layers, width)

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    rss = status("VmRSS")
    model.fuse_lora(keep_originals=mode)
    print(json.dumps({"peak_increase": status("VmHWM") - rss}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is read from Linux's /proc")
def test_fusing_with_the_originals_on_disk_needs_no_second_copy_of_the_weights_in_memory(tmp_path):
    """Kept in memory, the fused copies of the targeted weights are new memory; parked on disk, the fused weights
    are written in place (the file's pages are the kernel's page cache, not the process's RSS). The saving
    must be at least half the targeted bytes (all of them, less allocator noise, in theory)."""
    layers, width = 12, 1024  # 48 MiB of fp32 weights, each 4 MiB
    targeted = layers * width * width * 4
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    peak = {}
    for mode in ("device", "disk"):
        out = subprocess.run([sys.executable, "-c", CHILD, mode, str(layers), str(width)], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        peak[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_increase"]
    assert peak["device"] >= 0.9 * targeted, peak  # the fused copies, all new
    assert peak["device"] - peak["disk"] >= targeted / 2, peak
