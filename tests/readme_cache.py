"""README.md's Hub snippets, run offline: tiny stand-ins for the repos they name, and the process that runs them.

`build_hub_cache` fills a local Hugging Face cache (the layout huggingface_hub
writes, via ``test_sources.hub_cache_add``) with TINY models and LoRA files
under exactly the repo ids and file names the README uses:

- ``stabilityai/stable-diffusion-xl-base-1.0``: `tiny.tiny_sdxl_pipeline` saved with ``save_pretrained``;
  ``artificialguybr/3DRedmond-V1`` and ``ostris/super-cereal-sdxl-lora``: sd-scripts SDXL LoRAs for it
  (`producers.sd_scripts_sdxl_lora`: Stability block names, LoCon 3x3 convs, both text encoders);
- ``black-forest-labs/FLUX.1-dev``: a tiny Flux pipeline with FLUX.1-dev's block counts where the README
  names a block (38 single blocks: ``single_transformer_blocks.37``) and its guidance embedding;
  ``XLabs-AI/flux-RealismLora``: ``lora.safetensors`` in x-flux's processor layout on every double block,
  as the real file is (``double_blocks.{i}.processor.{qkv,proj}_lora{1,2}.{down,up}.weight``, no alpha);
- ``facebook/opt-350m``: a tiny ``OPTForCausalLM`` from an ``OPTConfig`` (``model.safetensors``,
  ``generation_config.json``) and a byte-level GPT-2 BPE tokenizer (OPT's ``</s>`` / ``<pad>`` ids) built offline;
  ``ybelkada/opt-350m-lora``: a PEFT adapter folder written by peft for that model;
- ``Wan-AI/Wan2.2-T2V-A14B-Diffusers``: a tiny WanPipeline with two experts (UMT5, Wan VAE);
  ``lightx2v/Wan2.2-Lightning``: the high- and low-noise files in ComfyUI's Wan names with alphas;
- ``hunyuanvideo-community/HunyuanVideo``: a tiny HunyuanVideo transformer under ``transformer/``;
  ``Cseti/HunyuanVideo-LoRA-Arcane_Jinx-v1``: a LoRA in Tencent's dotted names behind ``diffusion_model.``
  (fused ``img_attn_qkv`` and ``linear1``), as ComfyUI-era HunyuanVideo LoRAs are.

`child_main` is the body of the separate process the snippets run in: huggingface_hub, diffusers and
transformers read ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE`` when they are imported, so the snippets need a
process whose environment names the cache from the start. It refuses every socket connection and DNS
lookup (the logic of ``test_sources.no_network``), runs each snippet with ``exec`` in its own working
directory and namespace, then the snippet's check, and writes one JSON result per snippet.

Heavy imports stay inside functions: the child imports this module before anything else.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_LORAS = {
    "artificialguybr/3DRedmond-V1": ("3DRedmond-3DRenderStyle-3DRenderAF.safetensors", 11),
    "ostris/super-cereal-sdxl-lora": ("cereal_box_sdxl_v1.safetensors", 12),
}
FLUX_REPO = "black-forest-labs/FLUX.1-dev"
XLABS_REPO = "XLabs-AI/flux-RealismLora"
XLABS_FILE = "lora.safetensors"
XLABS_RANK = 4
WAN_REPO = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
LIGHTNING_REPO = "lightx2v/Wan2.2-Lightning"
LIGHTNING_FILES = {  # weight_name -> (seed, expert)
    "Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1/high_noise_model.safetensors": (51, "transformer"),
    "Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1/low_noise_model.safetensors": (52, "transformer_2"),
}
HUNYUAN_REPO = "hunyuanvideo-community/HunyuanVideo"
JINX_REPO, JINX_FILE = "Cseti/HunyuanVideo-LoRA-Arcane_Jinx-v1", "csetiarcane-nfjinx-v1-6000.safetensors"
OPT_REPO = "facebook/opt-350m"
OPT_LORA_REPO = "ybelkada/opt-350m-lora"

# FluxPipeline hard-codes ``default_sample_size = 128`` in ``__init__`` (no config reads it), so a call without
# height/width always denoises 4096 image tokens, whatever the model's size: 28 steps through 40 blocks take
# minutes on one CPU core. The child sets it on the instance after ``__init__``; the snippet text is untouched.
FLUX_DEFAULT_SAMPLE_SIZE = 8


# -- the cache --------------------------------------------------------------------------------------------------


def _folder_files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny_flux_dev(seed: int = 0):
    """A tiny FluxPipeline with FLUX.1-dev's 38 single blocks and guidance embedding, narrow everywhere else."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from tiny import _clip_config, _randomize, tiny_tokenizer
    from tiny_dit import _t5, _vae
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=38, attention_head_dim=6,
        num_attention_heads=1, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[2, 2, 2],
        guidance_embeds=True,
    )  # fmt: skip
    text_encoder = CLIPTextModel(_clip_config(32, projection=32))
    _randomize(transformer, seed)
    _randomize(text_encoder, seed + 1)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(1),
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(),
        text_encoder_2=_t5(seed + 2),
        tokenizer_2=tiny_tokenizer(),
        transformer=transformer,
    )


def xlabs_lora(transformer, seed: int, rank: int = XLABS_RANK) -> dict:
    """x-flux's LoRA processors on every double block, as XLabs' realism LoRA has them: ``qkv_lora1`` /
    ``qkv_lora2`` (``LoRALinearLayer(dim, 3 * dim, rank)``: one down, fused q/k/v up rows) and ``proj_lora1`` /
    ``proj_lora2`` (``LoRALinearLayer(dim, dim, rank)``), ``down.weight`` [rank, in], ``up.weight`` [out, rank]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    sd = {}
    for i in range(len(transformer.transformer_blocks)):
        for name, out in (("qkv_lora1", 3 * dim), ("proj_lora1", dim), ("qkv_lora2", 3 * dim), ("proj_lora2", dim)):
            sd[f"double_blocks.{i}.processor.{name}.down.weight"] = torch.randn(rank, dim, generator=g) / dim**0.5
            sd[f"double_blocks.{i}.processor.{name}.up.weight"] = torch.randn(out, rank, generator=g) * 0.5
    return sd


def tiny_wan_22(seed: int = 0):
    """A tiny WanPipeline with Wan 2.2 A14B's two experts, a UMT5 text encoder and a Wan VAE, all narrow."""
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from tiny import tiny_tokenizer
    from tiny_wan import tiny_wan
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=520, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    return WanPipeline(
        tokenizer=tiny_tokenizer(), text_encoder=text_encoder, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        transformer=tiny_wan(seed), transformer_2=tiny_wan(seed + 1), boundary_ratio=0.875,
    )  # fmt: skip


def lightning_lora(seed: int) -> dict:
    """A Wan 2.2 Lightning-style file: ComfyUI keys on Wan's original names (``diffusion_model.blocks.N.self_attn.q``)
    with ``lora_down`` / ``lora_up`` / ``alpha``, on every attention and feed-forward of the tiny transformer."""
    import torch
    from tiny_wan import BLOCK_ORIGINAL, LAYERS, tiny_wan

    modules = dict(tiny_wan(0).named_modules())
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(LAYERS):
        for path, original in BLOCK_ORIGINAL.items():
            module = modules.get(f"blocks.{i}.{path}")
            if not isinstance(module, torch.nn.Linear):
                continue
            key = f"diffusion_model.blocks.{i}.{original}"
            sd[f"{key}.lora_down.weight"] = torch.randn(4, module.in_features, generator=g) * 0.3
            sd[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=g) * 0.3
            sd[f"{key}.alpha"] = torch.tensor(4.0)
    return sd


def opt_tokenizer(folder: Path):
    """A byte-level GPT-2 BPE tokenizer (no merges) with OPT's special tokens: <s> 0, <pad> 1, </s> 2, <unk> 3."""
    from tiny import _bytes_to_unicode
    from transformers import GPT2Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["<s>", "<pad>", "</s>", "<unk>"] + _bytes_to_unicode()
    with open(folder / "vocab.json", "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = GPT2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), bos_token="</s>",
                              eos_token="</s>", unk_token="</s>", pad_token="<pad>", add_bos_token=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_opt_350m(seed: int = 0):
    """OPT-350m's architecture (``word_embed_proj_dim`` != ``hidden_size``: project_in/out, post-LN) shrunk."""
    import torch
    from llm_tiny import _randomise
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=260, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, word_embed_proj_dim=8, do_layer_norm_before=False,
        pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    return _randomise(OPTForCausalLM(config), seed)


def build_hub_cache(cache: Path, work: Path) -> dict[str, str]:
    """Fill ``cache`` with every repo the README's Python snippets name; ``{repo id: commit}``."""
    import peft
    from llm_tiny import peft_adapter
    from producers import save_state_dict, sd_scripts_sdxl_lora
    from test_sources import hub_cache_add
    from tiny import tiny_sdxl_pipeline

    commits = {}
    work.mkdir(parents=True, exist_ok=True)

    sdxl = tiny_sdxl_pipeline(0)
    sdxl.save_pretrained(work / "sdxl")
    commits[SDXL_REPO] = hub_cache_add(cache, SDXL_REPO, _folder_files(work / "sdxl"))
    for repo, (weight_name, seed) in SDXL_LORAS.items():
        path = save_state_dict(sd_scripts_sdxl_lora(sdxl, seed=seed), work / weight_name)
        commits[repo] = hub_cache_add(cache, repo, {weight_name: Path(path)})

    flux = tiny_flux_dev(0)
    flux.save_pretrained(work / "flux")
    commits[FLUX_REPO] = hub_cache_add(cache, FLUX_REPO, _folder_files(work / "flux"))
    save_state_dict(xlabs_lora(flux.transformer, seed=21), work / XLABS_FILE)
    commits[XLABS_REPO] = hub_cache_add(cache, XLABS_REPO, {XLABS_FILE: work / XLABS_FILE})

    wan = tiny_wan_22(0)
    wan.save_pretrained(work / "wan")
    commits[WAN_REPO] = hub_cache_add(cache, WAN_REPO, _folder_files(work / "wan"))
    lightning = {}
    for weight_name, (seed, _) in LIGHTNING_FILES.items():
        lightning[weight_name] = Path(save_state_dict(lightning_lora(seed), work / weight_name.replace("/", "--")))
    commits[LIGHTNING_REPO] = hub_cache_add(cache, LIGHTNING_REPO, lightning)

    from test_hunyuan_video import lora_factors, musubi_file, musubi_names, tencent_modules
    from tiny_hunyuan import tiny_hunyuan

    hunyuan = tiny_hunyuan(0)
    hunyuan.save_pretrained(work / "hunyuan" / "transformer")
    commits[HUNYUAN_REPO] = hub_cache_add(cache, HUNYUAN_REPO, _folder_files(work / "hunyuan"))
    table = tencent_modules(hunyuan)
    jinx = {f"diffusion_model.{k[len('lora_unet_'):]}": v for k, v in musubi_file(lora_factors(hunyuan, table, musubi_names(table), 61)).items()}
    jinx = {_comfyui_dotted(k, table): v for k, v in jinx.items()}
    commits[JINX_REPO] = hub_cache_add(cache, JINX_REPO, {JINX_FILE: Path(save_state_dict(jinx, work / JINX_FILE))})

    opt_dir = work / "opt"
    model = tiny_opt_350m(0)
    model.generation_config.pad_token_id = 1
    model.save_pretrained(opt_dir)
    opt_tokenizer(opt_dir)
    commits[OPT_REPO] = hub_cache_add(cache, OPT_REPO, _folder_files(opt_dir))
    model.config._name_or_path = OPT_REPO  # what peft writes as base_model_name_or_path, as from the Hub
    config = peft.LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    adapter = Path(peft_adapter(model, config, work / "opt-lora", seed=31))
    commits[OPT_LORA_REPO] = hub_cache_add(cache, OPT_LORA_REPO, _folder_files(adapter))
    return commits


def _comfyui_dotted(key: str, table: dict) -> str:
    """``diffusion_model.double_blocks_0_img_attn_qkv.lora_up.weight`` -> the dotted Tencent name ComfyUI writes."""
    head, _, rest = key.partition(".")
    module, _, suffix = rest.partition(".")
    dotted = next(name for name in table if name.replace(".", "_") == module)
    return f"{head}.{dotted}.{suffix}"


# -- the child process ----------------------------------------------------------------------------------------------

_ATTEMPTS: list = []


def _install_network_guard() -> None:
    """``test_sources.no_network``'s refusal, for a whole process: every attempt is refused and recorded."""

    def refuse_connect(self, address, *args, **kwargs):
        _ATTEMPTS.append(address)
        raise OSError(f"test_readme: network access attempted ({address!r})")

    def refuse_dns(host, *args, **kwargs):
        _ATTEMPTS.append(host)
        raise socket.gaierror(f"test_readme: DNS lookup attempted ({host!r})")

    socket.socket.connect = refuse_connect
    socket.socket.connect_ex = refuse_connect
    socket.getaddrinfo = refuse_dns


def _shrink_flux_default_size() -> None:
    from diffusers import FluxPipeline

    init = FluxPipeline.__init__

    @functools.wraps(init)  # diffusers reads the components from __init__'s signature
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.default_sample_size = FLUX_DEFAULT_SAMPLE_SIZE

    FluxPipeline.__init__ = __init__


def child_main(jobs_path: str, results_path: str) -> None:
    _install_network_guard()
    import torch

    torch.set_num_threads(1)
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    _shrink_flux_default_size()
    jobs = json.loads(Path(jobs_path).read_text())
    results = {}
    for job in jobs:
        os.chdir(job["cwd"])
        torch.manual_seed(0)
        _ATTEMPTS.clear()
        namespace = {"__name__": "__main__"}
        start = time.perf_counter()
        result = {"ok": False, "stage": "snippet"}
        try:
            exec(compile(job["code"], job["label"], "exec"), namespace)
            result["snippet_s"] = round(time.perf_counter() - start, 2)
            result["stage"] = "check"
            CHECKS[job["check"]](namespace, Path(job["cwd"]))
            result["ok"] = True
        except BaseException:  # noqa: BLE001 - every failure is reported to the test
            result["error"] = traceback.format_exc()
        if _ATTEMPTS:
            result["ok"] = False
            result["error"] = f"the snippet tried to reach the network: {_ATTEMPTS}\n" + result.get("error", "")
        result["total_s"] = round(time.perf_counter() - start, 2)
        results[job["name"]] = result
        Path(results_path).write_text(json.dumps(results, indent=1))  # after each: a crash keeps the others


# -- what each snippet promises, checked in the child after it ran ---------------------------------------------------


def _sdxl_unet_inputs(pipe, dtype):
    import torch

    g = torch.Generator().manual_seed(0)
    unet = pipe.unet
    return {
        "sample": torch.randn(2, 4, 16, 16, generator=g).to(dtype),
        "timestep": torch.tensor(10),
        "encoder_hidden_states": torch.randn(2, 8, unet.config.cross_attention_dim, generator=g).to(dtype),
        "added_cond_kwargs": {"text_embeds": torch.randn(2, 24, generator=g).to(dtype),
                              "time_ids": torch.randn(2, 6, generator=g).to(dtype)},
    }


def check_sdxl(ns: dict, cwd: Path) -> None:
    import torch
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image
    from safetensors import safe_open

    import lora_loader

    pipe, image = ns["pipe"], ns["image"]
    assert isinstance(image, Image.Image), type(image)
    assert pipe.unet.dtype == torch.float16, pipe.unet.dtype
    adapters = pipe.get_list_adapters()
    for component in ("unet", "text_encoder", "text_encoder_2"):
        assert sorted(adapters.get(component, [])) == ["3d", "cereal"], adapters
    base = StableDiffusionXLPipeline.from_pretrained(SDXL_REPO, torch_dtype=torch.float16)
    # "unfuse_lora() restores them bit for bit": the snippet fused and unfused; every weight is the base's.
    for component in ("unet", "text_encoder", "text_encoder_2"):
        got, want = getattr(pipe, component).state_dict(), getattr(base, component).state_dict()
        assert got.keys() == want.keys(), component
        changed = [k for k in want if not torch.equal(got[k], want[k])]
        assert not changed, f"{component}: {len(changed)} tensors differ from the base after fuse/unfuse: {changed[:3]}"
    inputs = _sdxl_unet_inputs(pipe, torch.float16)
    with torch.no_grad():
        want = base.unet(**inputs).sample
        with_lora = pipe.unet(**inputs).sample
        pipe.disable_lora()  # "the base model again, exactly"
        disabled = pipe.unet(**inputs).sample
        pipe.enable_lora()
    assert (with_lora.float() - want.float()).abs().max() > 1e-2, "the adapters do not change the UNet"
    assert torch.equal(disabled, want), "disable_lora() does not give the base UNet's output"
    # 3d-kohya.safetensors: Kohya keys, with the real alphas (sd-scripts: 2 on linears, 1 on LoCon convs).
    path = cwd / "3d-kohya.safetensors"
    assert path.is_file(), "save_lora_weights wrote no 3d-kohya.safetensors"
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert keys and all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in keys), keys[:5]
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys), "SDXL Kohya files name the UNet in Stability's layout"
    assert alphas == {1.0, 2.0}, alphas
    # It is the 3d adapter: loaded alone on the base, it gives what "3d" alone gives on the snippet's pipeline.
    pipe.set_adapters("3d")
    reloaded = lora_loader.attach(base)
    reloaded.load_lora_weights(str(path), adapter_name="3d")
    with torch.no_grad():
        a, b = pipe.unet(**inputs).sample.float(), reloaded.unet(**inputs).sample.float()
    assert (a - want.float()).abs().max() > 1e-2
    assert torch.allclose(a, b, atol=1e-2, rtol=1e-2), float((a - b).abs().max())


def check_flux(ns: dict, cwd: Path) -> None:
    import torch
    from PIL import Image

    pipe, image = ns["pipe"], ns["image"]
    assert isinstance(image, Image.Image), type(image)
    assert pipe.transformer.dtype == torch.bfloat16, pipe.transformer.dtype
    assert pipe.get_active_adapters() == ["realism"], pipe.get_active_adapters()
    assert pipe.get_list_adapters() == {"transformer": ["realism"]}, pipe.get_list_adapters()
    t = pipe.transformer
    g = torch.Generator().manual_seed(0)
    n, m = 16, 8
    inputs = dict(
        hidden_states=torch.randn(1, n, 4, generator=g).bfloat16(),
        encoder_hidden_states=torch.randn(1, m, 32, generator=g).bfloat16(),
        pooled_projections=torch.randn(1, 32, generator=g).bfloat16(),
        timestep=torch.tensor([0.5]).bfloat16(),
        guidance=torch.tensor([3.5]).bfloat16(),
        img_ids=torch.zeros(n, 3),
        txt_ids=torch.zeros(m, 3),
    )
    with torch.no_grad():
        on = t(**inputs).sample.float()
        pipe.disable_lora()
        off = t(**inputs).sample.float()
        pipe.enable_lora()
    assert (on - off).abs().max() > 1e-2, "the XLabs LoRA does not change the transformer"


def check_llm(ns: dict, cwd: Path) -> None:
    import torch
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from transformers import AutoModelForCausalLM

    model, m2, out, rows = ns["model"], ns["m2"], ns["out"], ns["rows"]
    assert out.shape[0] == 1 and out.shape[1] > ns["ids"].shape[1], out.shape
    assert rows.shape[0] == 3 and rows.shape[1] == ns["ids"].shape[1] + 5, rows.shape
    adapters = model.get_list_adapters()
    assert sorted(set(sum(adapters.values(), []))) == ["chat", "mine", "mine-adapter", "sql"], adapters  # + the resolver's
    # The PEFT adapter changes the model; "sql" and "chat" are the same file, so the 0.7/0.3 blend equals it.
    ids = ns["ids"][:1]
    with torch.no_grad():
        model.set_adapters("sql")
        sql = model(input_ids=ids).logits
        model.set_adapters(["sql", "chat"], weights=[0.7, 0.3])
        blend = model(input_ids=ids).logits
        model.disable_lora()
        base = model(input_ids=ids).logits
        model.enable_lora()
    assert (sql - base).abs().max() > 1e-3, "the PEFT adapter does not change the logits"
    assert torch.allclose(sql, blend, atol=1e-5), float((sql - blend).abs().max())
    # mine-adapter: PEFT's files, readable by peft itself (every tensor lands on a peft parameter).
    folder = cwd / "mine-adapter"
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    config = PeftConfig.from_pretrained(str(folder))
    assert (config.r, config.lora_alpha, config.lora_dropout) == (64, 16, 0.1), config
    assert set(config.target_modules) == {"q_proj", "v_proj"}, config.target_modules
    assert config.base_model_name_or_path == OPT_REPO, config.base_model_name_or_path
    weights = load_peft_weights(str(folder))
    assert weights and all(".lora_" in k for k in weights), sorted(weights)[:4]
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(OPT_REPO), config)
    result = set_peft_model_state_dict(peft_model, weights)
    assert not result.unexpected_keys, result.unexpected_keys
    # m2: the base named by the adapter's config, with the adapter loaded.
    assert isinstance(m2, torch.nn.Module) and type(m2).__name__ == "OPTForCausalLM", type(m2)
    listed = m2.get_list_adapters()
    assert listed and all(names == ["default"] for names in listed.values()), listed
    with torch.no_grad():
        logits = m2(input_ids=ids).logits
    assert logits.shape[-1] == 260 and torch.isfinite(logits).all()
    # serving: "mine-adapter" came from the resolver's folder, "sql" is pinned, the cap holds beside it.
    model = ns["model"]
    assert "mine-adapter" in model.get_list_adapters()["model"], model.get_list_adapters()
    assert model.pinned_adapters() == ["sql"], model.pinned_adapters()
    residency = model.lora_residency()
    assert "sql" in residency["resident"] and len(set(residency["resident"]) - {"sql"}) <= 2, residency
    assert ns["served"].shape[0] == 3, ns["served"].shape


def check_wan(ns: dict, cwd: Path) -> None:
    """Both Lightning files, one per expert, under one name; each expert at its own weight, as the files alone give."""
    import torch
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file
    from tiny_wan import wan_inputs

    import lora_loader
    from huggingface_hub import hf_hub_download

    pipe = ns["pipe"]
    assert pipe.get_list_adapters() == {"transformer": ["light"], "transformer_2": ["light"]}, pipe.get_list_adapters()
    weights = {"transformer": 1.0, "transformer_2": 0.8}
    for weight_name, (_, expert) in LIGHTNING_FILES.items():
        # from_pretrained as the snippet's pipeline does: Wan keeps some modules in fp32 under torch_dtype=bfloat16
        alone = lora_loader.attach(WanTransformer3DModel.from_pretrained(WAN_REPO, subfolder=expert, torch_dtype=torch.bfloat16))
        alone.load_lora_weights(load_file(hf_hub_download(LIGHTNING_REPO, weight_name)), adapter_name="x")
        alone.set_adapters("x", weights[expert])
        inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in wan_inputs().items()}
        with torch.no_grad():
            want, got = alone(**inputs).sample.float(), getattr(pipe, expert)(**inputs).sample.float()
            alone.disable_lora()
            base = alone(**inputs).sample.float()
        assert (want - base).abs().max() > 1e-2, f"the {expert} file does not change the tiny expert"
        assert torch.allclose(got, want, atol=1e-2, rtol=1e-2), (expert, float((got - want).abs().max()))


def check_hunyuan(ns: dict, cwd: Path) -> None:
    """The Tencent-named file loads into the transformer alone; its scale is the snippet's 0.8."""
    import torch

    transformer = ns["transformer"]
    assert transformer.get_list_adapters() == {"model": ["jinx"]}, transformer.get_list_adapters()
    from huggingface_hub import hf_hub_download
    from safetensors import safe_open

    with safe_open(hf_hub_download(JINX_REPO, JINX_FILE), "pt") as f:
        in_file = {k.rsplit(".lora_", 1)[0] for k in f.keys() if ".lora_" in k}
    layers = transformer._lora_registry_to_read().adapters["jinx"].layers
    # every module of the file, and more: the fused img_attn_qkv / txt_attn_qkv / linear1 are split into parts
    assert len(layers) > len(in_file), (len(layers), len(in_file))
    from tiny_hunyuan import forward

    with torch.no_grad():
        on = forward(transformer).float()
        transformer.disable_lora()
        off = forward(transformer).float()
        transformer.enable_lora()
    assert (on - off).abs().max() > 1e-2, "the LoRA does not change the transformer"


CHECKS = {"sdxl": check_sdxl, "flux": check_flux, "llm": check_llm, "wan": check_wan, "hunyuan": check_hunyuan}


if __name__ == "__main__":
    child_main(sys.argv[1], sys.argv[2])
