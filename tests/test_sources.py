"""Where a LoRA comes from (API.md section 2, ``load_lora_weights`` sources).

A source is a local ``.safetensors`` (or weights-only ``.bin``) file, a folder,
a state dict, a PEFT adapter folder, or a Hub repo id. The Hub is only ever a
local Hugging Face cache built here in the exact layout huggingface_hub uses
(``models--owner--name/{blobs,refs,snapshots}``); no test may touch the
network, and an autouse guard fails any test that tries.

Every LoRA file is written by a real producer (peft + diffusers'
``save_lora_weights``, or ``PeftModel.save_pretrained``), and every output is
checked against an independent oracle: diffusers + peft loading the same file
into an identical pipeline, or ``peft.PeftModel.from_pretrained`` for a PEFT
adapter folder.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import socket
import time
from pathlib import Path

import huggingface_hub
import peft
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, PeftModel
from producers import add_peft_adapter
from safetensors.torch import load_file
from tiny import outputs, tiny_sd_pipeline

import lora_loader
from lora_loader import LoraError, LoraFileError

ATOL = 1e-4
REPO = "tiny-owner/tiny-lora"
SUB_REPO = "tiny-owner/tiny-lora-subfolder"
PEFT_REPO = "tiny-owner/tiny-peft-adapter"


# -- guards ---------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any socket connection or DNS lookup is refused and recorded; a test that tried one fails."""
    attempts = []

    def refuse_connect(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"test_sources: network access attempted ({address!r})")

    def refuse_dns(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror(f"test_sources: DNS lookup attempted ({host!r})")

    monkeypatch.setattr(socket.socket, "connect", refuse_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse_connect)
    monkeypatch.setattr(socket, "getaddrinfo", refuse_dns)
    yield attempts
    assert not attempts, f"the test tried to reach the network: {attempts}"


def test_network_guard_refuses_and_records_connections(no_network):
    with pytest.raises(OSError):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    assert no_network, "the guard did not see the attempt"
    no_network.clear()


# -- producers and oracles ------------------------------------------------------------------------


def diffusers_lora(folder: Path, seed: int, *, weight_name: str = "pytorch_lora_weights.safetensors",
                   alpha: int = 8, text_encoder: bool = False) -> Path:
    """A diffusers-format LoRA (r=4, alpha in the header) written by peft + ``save_lora_weights``."""
    pipe = tiny_sd_pipeline(0)
    unet_cfg = LoraConfig(r=4, lora_alpha=alpha, target_modules=["to_q", "to_v"], init_lora_weights=False)
    torch.manual_seed(seed)
    kwargs = dict(unet_lora_layers=add_peft_adapter(pipe.unet, unet_cfg), unet_lora_adapter_metadata=unet_cfg.to_dict())
    if text_encoder:
        te_cfg = LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        kwargs.update(text_encoder_lora_layers=add_peft_adapter(pipe.text_encoder, te_cfg),
                      text_encoder_lora_adapter_metadata=te_cfg.to_dict())
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(folder, weight_name=weight_name, **kwargs)
    return folder / weight_name


def peft_adapter_folder(folder: Path, seed: int) -> Path:
    """A PEFT adapter folder for the UNet, lora_alpha (16) != r (4): only adapter_config.json says so."""
    unet = tiny_sd_pipeline(0).unet
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    torch.manual_seed(seed)
    peft.get_peft_model(unet, cfg).save_pretrained(folder)
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    return folder


def diffusers_oracle(path: Path) -> dict[str, torch.Tensor]:
    """diffusers + peft loading ``path`` into an identical pipeline."""
    pipe = tiny_sd_pipeline(0)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    return outputs(pipe)


def peft_oracle(folder: Path) -> dict[str, torch.Tensor]:
    """peft's own ``PeftModel.from_pretrained`` on an identical UNet."""
    pipe = tiny_sd_pipeline(0)
    PeftModel.from_pretrained(pipe.unet, str(folder))
    return outputs(pipe)


def fresh() -> StableDiffusionPipeline:
    return lora_loader.attach(tiny_sd_pipeline(0))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def assert_matches(got: dict, want: dict, base: dict) -> None:
    """``got`` equals the oracle's ``want``, and the LoRA changed the output (so this can fail)."""
    assert max_diff(want, base) > 1e-3, "the oracle LoRA does not change the outputs: the check would be vacuous"
    assert max_diff(got, want) <= ATOL, f"outputs differ from the oracle by {max_diff(got, want)}"


def assert_untouched(pipe) -> None:
    """After a failed load: no adapter, no injected layer."""
    assert pipe.get_active_adapters() == [] and pipe.get_list_adapters() == {}
    reference = fresh()  # attached too: attach itself gives the components their component-level calls
    for name in ("unet", "text_encoder"):
        got = {n: type(m) for n, m in getattr(pipe, name).named_modules()}
        want = {n: type(m) for n, m in getattr(reference, name).named_modules()}
        assert got == want, f"{name} was modified by a failed load"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """LoRA files written once per module, with their oracle outputs."""
    root = tmp_path_factory.mktemp("loras")
    a = diffusers_lora(root / "a", 1, alpha=8, text_encoder=True)
    b = diffusers_lora(root / "b", 2, alpha=2)
    peft_dir = peft_adapter_folder(root / "peft", 3)
    return {
        "root": root,
        "a": a,
        "b": b,
        "peft": peft_dir,
        "base": outputs(tiny_sd_pipeline(0)),
        "want_a": diffusers_oracle(a),
        "want_b": diffusers_oracle(b),
        "want_peft": peft_oracle(peft_dir),
    }


def test_the_two_fixture_loras_differ_and_touch_unet_and_text_encoder(files):
    base, want_a, want_b = files["base"], files["want_a"], files["want_b"]
    assert max_diff(want_a, want_b) > 1e-3
    assert (want_a["unet"] - base["unet"]).abs().max() > 1e-3
    assert (want_a["text_encoder"] - base["text_encoder"]).abs().max() > 1e-3
    assert torch.equal(want_b["text_encoder"], base["text_encoder"])


# -- a local Hugging Face cache ---------------------------------------------------------------------


def hub_cache_add(cache_dir: Path, repo_id: str, files: dict[str, Path], refs=("main",), commit: str | None = None) -> str:
    """Put one commit of ``repo_id`` into ``cache_dir`` the way huggingface_hub stores a download.

    ``models--<owner>--<name>/blobs/<sha256>`` holds each file's bytes,
    ``snapshots/<commit>/<path>`` links to its blob (a copy where symlinks are
    not available), and each ``refs/<ref>`` holds the commit hash.
    Returns the commit hash.
    """
    storage = cache_dir / ("models--" + repo_id.replace("/", "--"))
    if commit is None:
        digest = hashlib.sha1()
        for rel in sorted(files):
            digest.update(rel.encode() + Path(files[rel]).read_bytes())
        commit = digest.hexdigest()
    for rel, src in files.items():
        data = Path(src).read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(os.path.relpath(blob, link.parent), link)
        except OSError:
            shutil.copyfile(blob, link)
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture
def hub(files, tmp_path, monkeypatch):
    """A cache with REPO at main (file a) and v2 (file b, another commit), SUB_REPO and PEFT_REPO."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cache = tmp_path / "hf-cache"
    readme = tmp_path / "README.md"
    readme.write_text("# tiny lora\n")
    main = hub_cache_add(cache, REPO, {"style.safetensors": files["a"], "README.md": readme})
    v2 = hub_cache_add(cache, REPO, {"style.safetensors": files["b"], "README.md": readme}, refs=("v2",))
    hub_cache_add(cache, SUB_REPO, {
        "loras/first/pytorch_lora_weights.safetensors": files["a"],
        "loras/second/other.safetensors": files["b"],
        "README.md": readme,
    })
    hub_cache_add(cache, PEFT_REPO, {
        "adapter_model.safetensors": files["peft"] / "adapter_model.safetensors",
        "adapter_config.json": files["peft"] / "adapter_config.json",
        "README.md": readme,
    })
    return {"cache": cache, "main": main, "v2": v2}


def test_hub_cache_helper_writes_the_layout_huggingface_hub_reads(hub, files):
    cache = hub["cache"]
    storage = cache / "models--tiny-owner--tiny-lora"
    assert (storage / "refs" / "main").read_text() == hub["main"] and hub["main"] != hub["v2"]
    for revision, source in ((None, files["a"]), ("v2", files["b"]), (hub["v2"], files["b"])):
        path = huggingface_hub.hf_hub_download(
            REPO, "style.safetensors", revision=revision, cache_dir=cache, local_files_only=True
        )
        commit = hub["main"] if revision is None else hub["v2"]
        assert Path(path).parent == storage / "snapshots" / commit
        assert Path(path).read_bytes() == source.read_bytes()
    path = huggingface_hub.hf_hub_download(
        SUB_REPO, "pytorch_lora_weights.safetensors", subfolder="loras/first", cache_dir=cache, local_files_only=True
    )
    assert Path(path).read_bytes() == files["a"].read_bytes()
    scan = huggingface_hub.scan_cache_dir(cache)
    assert not scan.warnings, scan.warnings
    assert {r.repo_id for r in scan.repos} == {REPO, SUB_REPO, PEFT_REPO}


# -- local files and folders ----------------------------------------------------------------------


@pytest.mark.parametrize("as_type", [str, Path], ids=["str", "pathlib.Path"])
def test_a_safetensors_file_path_loads_like_diffusers(files, as_type):
    pipe = fresh()
    pipe.load_lora_weights(as_type(files["a"]))
    assert_matches(outputs(pipe), files["want_a"], files["base"])


@pytest.mark.parametrize("reader", ["direct", "safe_open"])
def test_a_loaded_adapter_owns_its_bytes_so_rewriting_the_file_in_place_changes_nothing(files, tmp_path, monkeypatch, reader):
    """A training loop may save over the file it loaded (in place, same inode): the adapter keeps what it loaded. Both
    readers copy the bytes into memory the adapter owns; safetensors' ``safe_open`` alone (the reader for headers the
    direct one does not take on) returns views of a mapping of the file, which follow its new bytes."""
    import lora_loader.hub

    if reader == "safe_open":
        monkeypatch.setattr(lora_loader.hub, "_read_safetensors_direct", lambda path: None)
    path = tmp_path / "lora.safetensors"
    shutil.copyfile(files["a"], path)
    pipe = fresh()
    pipe.load_lora_weights(path)
    data_start = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    with open(path, "r+b") as f:  # every tensor's bytes zeroed, the header kept
        f.seek(data_start)
        f.write(bytes(path.stat().st_size - data_start))
    assert_matches(outputs(pipe), files["want_a"], files["base"])


def test_a_folder_holding_one_safetensors_file_loads_it_without_weight_name(files, tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copyfile(files["b"], folder / "my_style_v3.safetensors")
    (folder / "README.md").write_text("trained on squares\n")
    (folder / "notes.json").write_text("{}")
    pipe = fresh()
    report = pipe.load_lora_weights(folder)
    assert report.source.endswith("my_style_v3.safetensors")
    assert_matches(outputs(pipe), files["want_b"], files["base"])


def test_a_folder_prefers_pytorch_lora_weights_safetensors_among_other_files(files, tmp_path):
    folder = tmp_path / "conventional"
    folder.mkdir()
    shutil.copyfile(files["a"], folder / "pytorch_lora_weights.safetensors")
    shutil.copyfile(files["b"], folder / "checkpoint-500.safetensors")
    (folder / "README.md").write_text("x\n")
    pipe = fresh()
    report = pipe.load_lora_weights(str(folder))
    assert report.source.endswith("pytorch_lora_weights.safetensors")
    assert_matches(outputs(pipe), files["want_a"], files["base"])


def test_a_folder_with_two_unrelated_safetensors_and_no_weight_name_is_an_error_listing_both(files, tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    shutil.copyfile(files["a"], folder / "anime.safetensors")
    shutil.copyfile(files["b"], folder / "sketch.safetensors")
    pipe = fresh()
    with pytest.raises(LoraError) as info:
        pipe.load_lora_weights(folder)
    message = str(info.value)
    assert "anime.safetensors" in message and "sketch.safetensors" in message
    assert "weight_name" in message
    assert_untouched(pipe)


@pytest.mark.parametrize("chosen", ["anime.safetensors", "sketch.safetensors"])
def test_weight_name_selects_one_file_of_a_folder(files, tmp_path, chosen):
    folder = tmp_path / "two"
    folder.mkdir()
    shutil.copyfile(files["a"], folder / "anime.safetensors")
    shutil.copyfile(files["b"], folder / "sketch.safetensors")
    pipe = fresh()
    report = pipe.load_lora_weights(folder, weight_name=chosen)
    assert report.source.endswith(chosen)
    want = files["want_a"] if chosen == "anime.safetensors" else files["want_b"]
    assert_matches(outputs(pipe), want, files["base"])


def test_weight_name_that_is_not_in_the_folder_is_a_file_error_naming_it(files, tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copyfile(files["a"], folder / "anime.safetensors")
    pipe = fresh()
    with pytest.raises(LoraFileError, match="missing_name.safetensors"):
        pipe.load_lora_weights(folder, weight_name="missing_name.safetensors")
    assert_untouched(pipe)


def test_a_state_dict_loads_like_the_file_and_is_not_mutated(files):
    """A bare state dict carries no header (so alpha = r); the reference is diffusers loading the same dict."""
    state_dict = load_file(files["b"])
    oracle = tiny_sd_pipeline(0)
    oracle.load_lora_weights(dict(state_dict))
    want = outputs(oracle)

    given = dict(state_dict)
    snapshot = {k: (v, v.clone()) for k, v in given.items()}
    pipe = fresh()
    report = pipe.load_lora_weights(given)
    assert report.source == "<state dict>"
    assert_matches(outputs(pipe), want, files["base"])
    assert given.keys() == snapshot.keys(), "load_lora_weights added or removed keys of the caller's dict"
    for key, (tensor, values) in snapshot.items():
        assert given[key] is tensor, f"{key}: the caller's tensor was replaced"
        assert torch.equal(tensor, values), f"{key}: the caller's tensor was modified"


@pytest.mark.parametrize("as_file", [False, True], ids=["folder", "adapter_model.safetensors"])
def test_a_peft_adapter_folder_honours_lora_alpha_from_adapter_config(files, as_file):
    folder = files["peft"]
    src = folder / "adapter_model.safetensors" if as_file else folder
    pipe = fresh()
    pipe.load_lora_weights(src)
    got = outputs(pipe)
    assert_matches(got, files["want_peft"], files["base"])
    # Without the config the same tensors mean alpha = r (scale 1, not 16/4): a different result,
    # so the match above depends on the config having been read.
    bare = fresh()
    bare.load_lora_weights(load_file(folder / "adapter_model.safetensors"))
    assert max_diff(outputs(bare), files["want_peft"]) > 1e-3


def test_subfolder_of_a_local_folder_is_honoured(files):
    pipe = fresh()
    report = pipe.load_lora_weights(files["root"], subfolder="b")
    assert report.source == str(files["b"])
    assert_matches(outputs(pipe), files["want_b"], files["base"])


def test_a_path_that_does_not_exist_is_a_file_error_naming_it(tmp_path):
    pipe = fresh()
    missing = tmp_path / "nowhere" / "lora.safetensors"
    with pytest.raises(LoraFileError, match="nowhere"):
        pipe.load_lora_weights(missing)
    assert_untouched(pipe)


# -- the Hub, through the local cache -------------------------------------------------------------


def test_hub_repo_with_weight_name_and_local_files_only(hub, files):
    pipe = fresh()
    pipe.load_lora_weights(REPO, weight_name="style.safetensors", cache_dir=hub["cache"], local_files_only=True)
    assert_matches(outputs(pipe), files["want_a"], files["base"])


def test_hub_repo_under_hf_hub_offline_without_local_files_only(hub, files, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = fresh()
    pipe.load_lora_weights(REPO, weight_name="style.safetensors", cache_dir=str(hub["cache"]))
    assert_matches(outputs(pipe), files["want_a"], files["base"])


@pytest.mark.parametrize("revision", ["v2", "commit"], ids=["ref", "commit-hash"])
def test_hub_revision_selects_another_commit(hub, files, revision):
    revision = hub["v2"] if revision == "commit" else revision
    at_main, at_v2 = fresh(), fresh()
    at_main.load_lora_weights(REPO, weight_name="style.safetensors", cache_dir=hub["cache"], local_files_only=True)
    at_v2.load_lora_weights(
        REPO, weight_name="style.safetensors", revision=revision, cache_dir=hub["cache"], local_files_only=True
    )
    main_out, v2_out = outputs(at_main), outputs(at_v2)
    assert max_diff(main_out, v2_out) > 1e-3, "the revision made no difference"
    assert_matches(main_out, files["want_a"], files["base"])
    assert_matches(v2_out, files["want_b"], files["base"])


@pytest.mark.parametrize("revision", [None, "v2"])
def test_hub_without_weight_name_picks_the_only_safetensors_of_the_cached_snapshot(hub, files, revision):
    pipe = fresh()
    report = pipe.load_lora_weights(REPO, revision=revision, cache_dir=hub["cache"], local_files_only=True)
    assert report.source.endswith("style.safetensors")
    want = files["want_a"] if revision is None else files["want_b"]
    assert_matches(outputs(pipe), want, files["base"])


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "local_files_only"])
@pytest.mark.parametrize("weight_name", [None, "style.safetensors"])
def test_hub_repo_missing_from_the_cache_is_a_quick_file_error_naming_the_repo(hub, monkeypatch, how, weight_name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = fresh()
    kwargs = {"local_files_only": True} if how == "local_files_only" else {}
    start = time.monotonic()
    with pytest.raises(LoraFileError, match="tiny-owner/not-cached"):
        pipe.load_lora_weights("tiny-owner/not-cached", weight_name=weight_name, cache_dir=hub["cache"], **kwargs)
    assert time.monotonic() - start < 5, "a missing repo took long: was the network tried?"
    assert_untouched(pipe)


def test_hub_weight_name_missing_from_a_cached_repo_is_a_file_error_naming_file_and_repo(hub):
    pipe = fresh()
    with pytest.raises(LoraFileError) as info:
        pipe.load_lora_weights(REPO, weight_name="absent.safetensors", cache_dir=hub["cache"], local_files_only=True)
    assert REPO in str(info.value) and "absent.safetensors" in str(info.value)
    assert_untouched(pipe)


def test_hub_revision_missing_from_the_cache_is_a_file_error(hub):
    pipe = fresh()
    with pytest.raises(LoraFileError, match=REPO):
        pipe.load_lora_weights(REPO, weight_name="style.safetensors", revision="v9",
                               cache_dir=hub["cache"], local_files_only=True)
    assert_untouched(pipe)


@pytest.mark.parametrize(
    "subfolder, weight_name, which",
    [
        ("loras/first", "pytorch_lora_weights.safetensors", "a"),
        ("loras/second", "other.safetensors", "b"),
        ("loras/first", None, "a"),
        ("loras/second", None, "b"),
    ],
)
def test_hub_subfolder_selects_files_inside_it(hub, files, subfolder, weight_name, which):
    pipe = fresh()
    report = pipe.load_lora_weights(
        SUB_REPO, weight_name=weight_name, subfolder=subfolder, cache_dir=hub["cache"], local_files_only=True
    )
    assert SUB_REPO in report.source
    assert_matches(outputs(pipe), files[f"want_{which}"], files["base"])


def test_hub_peft_adapter_repo_reads_its_adapter_config(hub, files):
    pipe = fresh()
    report = pipe.load_lora_weights(PEFT_REPO, cache_dir=hub["cache"], local_files_only=True)
    assert report.source.endswith("adapter_model.safetensors")
    assert_matches(outputs(pipe), files["want_peft"], files["base"])


# -- .bin files -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bin_lora(files):
    """Tensors-only ``.bin`` of LoRA b's tensors (a .bin has no header: alpha = r), with diffusers' output on them."""
    state_dict = load_file(files["b"])
    path = files["root"] / "bin" / "pytorch_lora_weights.bin"
    path.parent.mkdir()
    torch.save(state_dict, path)
    oracle = tiny_sd_pipeline(0)
    oracle.load_lora_weights(str(path.parent), weight_name=path.name)
    return {"path": path, "want": outputs(oracle)}


def test_a_tensors_only_bin_file_loads(files, bin_lora):
    pipe = fresh()
    pipe.load_lora_weights(bin_lora["path"])
    assert_matches(outputs(pipe), bin_lora["want"], files["base"])


def test_a_folder_with_only_pytorch_lora_weights_bin_loads_it(files, bin_lora, tmp_path):
    folder = tmp_path / "bin-only"
    folder.mkdir()
    shutil.copyfile(bin_lora["path"], folder / "pytorch_lora_weights.bin")
    (folder / "README.md").write_text("x\n")
    pipe = fresh()
    report = pipe.load_lora_weights(folder)
    assert report.source.endswith("pytorch_lora_weights.bin")
    assert_matches(outputs(pipe), bin_lora["want"], files["base"])


def test_a_folder_with_safetensors_and_bin_prefers_safetensors(files, bin_lora, tmp_path):
    folder = tmp_path / "both"
    folder.mkdir()
    shutil.copyfile(files["a"], folder / "pytorch_lora_weights.safetensors")
    shutil.copyfile(bin_lora["path"], folder / "pytorch_lora_weights.bin")
    pipe = fresh()
    report = pipe.load_lora_weights(folder)
    assert report.source.endswith("pytorch_lora_weights.safetensors")
    assert_matches(outputs(pipe), files["want_a"], files["base"])


class _Trap:
    """Unpickling this creates ``marker``: proof that arbitrary code from the file ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_a_bin_holding_arbitrary_objects_is_refused_without_running_them(files, tmp_path):
    marker = tmp_path / "pickle-code-ran"
    state_dict = load_file(files["b"])
    state_dict["payload"] = _Trap(str(marker))
    path = tmp_path / "evil" / "pytorch_lora_weights.bin"
    path.parent.mkdir()
    with open(path, "wb") as f:
        torch.save(state_dict, f, pickle_module=pickle)
    pipe = fresh()
    with pytest.raises(LoraFileError, match="pytorch_lora_weights.bin"):
        pipe.load_lora_weights(path)
    assert not marker.exists(), "loading the .bin ran code from the pickle"
    assert_untouched(pipe)


# -- the report ---------------------------------------------------------------------------------------


def kohya_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    return {
        f"{prefix}.lora_down.weight": torch.randn(2, 8, generator=g),
        f"{prefix}.lora_up.weight": torch.randn(8, 2, generator=g),
        f"{prefix}.alpha": torch.tensor(1.0),
    }


@pytest.mark.parametrize("kind", ["file", "folder", "state dict", "kohya state dict", "hub", "hub subfolder"])
def test_the_report_names_the_source_and_the_format(files, hub, kind):
    pipe = fresh()
    common = dict(cache_dir=hub["cache"], local_files_only=True)
    if kind == "file":
        report = pipe.load_lora_weights(files["a"])
        source, fmt = str(files["a"]), "diffusers"
    elif kind == "folder":
        report = pipe.load_lora_weights(files["a"].parent)
        source, fmt = str(files["a"]), "diffusers"
    elif kind == "state dict":
        report = pipe.load_lora_weights(load_file(files["a"]))
        source, fmt = "<state dict>", "diffusers"
    elif kind == "kohya state dict":
        report = pipe.load_lora_weights(kohya_state_dict())
        source, fmt = "<state dict>", "kohya"
    elif kind == "hub":
        report = pipe.load_lora_weights(REPO, weight_name="style.safetensors", **common)
        source, fmt = f"{REPO}/style.safetensors", "diffusers"
    else:
        report = pipe.load_lora_weights(SUB_REPO, subfolder="loras/second", **common)
        source, fmt = SUB_REPO, "diffusers"
    assert isinstance(report, lora_loader.LoadReport)
    assert source in report.source
    if kind == "hub subfolder":
        assert "other.safetensors" in report.source
    assert report.format == fmt
    text = str(report)
    assert source in text and fmt in text and report.adapter_name in text
    # LoRA a (file, folder, its state dict, the hub's main) targets both components; b and Kohya only the UNet.
    expected_components = {"unet"} if kind in ("kohya state dict", "hub subfolder") else {"unet", "text_encoder"}
    assert set(report.modules) == expected_components and all(n > 0 for n in report.modules.values())
