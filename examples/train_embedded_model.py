#!/usr/bin/env python3
"""Train the embedded text-to-image model (lora_loader/embedded/shapes-sd) from scratch on one CPU core.

A real, small Stable Diffusion: a diffusers ``StableDiffusionPipeline`` with an
``AutoencoderKL`` (32x32x3 images <-> 8x8x8 latents), a ``CLIPTextModel`` (CLIP's
own BPE tokenizer and vocabulary, a small encoder), a ``UNet2DConditionModel``
and a ``DDIMScheduler`` (cosine noise schedule, v-prediction, trailing
timesteps). The data are scenes drawn by ``lora_loader/embedded/shapes.py``:
"a red circle on a blue background", in plain style (the base model), with the
neon and pastel styles mixed into the VAE's data so that the adapters trained
later (examples/train_embedded_adapters.py) have a decoder that can draw them.

Stages (each checkpointed under --work, rerun with the same arguments to resume):
  1. tokenizer: CLIP's vocab.json / merges.txt rebuilt from open_clip's
     bpe_simple_vocab_16e6.txt.gz (``pip install --no-deps open_clip_torch``;
     the file is read, open_clip is never imported);
  2. VAE: L1 + MSE reconstruction, a light KL term; its latent scale is measured;
  3. UNet + text encoder jointly, v-prediction with min-SNR-5 weights, 10% empty
     captions for classifier-free guidance, EMA weights;
  4. assemble the pipeline (EMA weights, fp16 safetensors) into --out and
     measure how well it follows prompts.

    python3 examples/train_embedded_model.py --seed 0            # about an hour on one core (VAE 18 min, UNet 44)
    python3 examples/train_embedded_model.py --quick --out /tmp/shapes-sd   # a smoke run, a minute
"""

from __future__ import annotations

import argparse
import copy
import gzip
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_loader.embedded import measure, shapes  # noqa: E402

SIZE = 32  # image side; latents are SIZE // 4
# 8 latent channels, not SD's 4: an 8x8x4 code of a 32x32 scene blurred crosses into blobs and lost the
# pastel stripes; 8x8x8 costs the UNet nothing measurable.
LATENT_CHANNELS = 8
MAX_LENGTH = 77  # CLIP's; the pipeline pads every prompt to tokenizer.model_max_length
STYLE_MIX = {"plain": 0.6, "neon": 0.2, "pastel": 0.2}  # the VAE's data


def log(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


# -- 1. tokenizer: CLIP's BPE --------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_tokenizer(folder: Path) -> None:
    """vocab.json and merges.txt exactly as openai/clip-vit-large-patch14 has them (CLIP's SimpleTokenizer order)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise SystemExit("needs CLIP's BPE file: python3 -m pip install --no-deps open_clip_torch==3.3.0")
    bpe = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "vocab.json", "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(" ".join(m) + "\n" for m in merges)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    config = dict(special, model_max_length=MAX_LENGTH, do_lower_case=True, tokenizer_class="CLIPTokenizer",
                  clean_up_tokenization_spaces=False, errors="replace", add_prefix_space=False)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder)  # transformers 5 ignores vocab_file= given directly
    ids = tokenizer("a red circle on a blue background").input_ids
    # openai CLIP's ids: <|startoftext|> a red circle on a blue background <|endoftext|>
    expected = [49406, 320, 736, 7117, 525, 320, 1746, 5994, 49407]
    if ids != expected or len(tokenizer) != 49408:
        raise SystemExit(f"the rebuilt CLIP tokenizer gives {ids} (vocab {len(tokenizer)}), expected {expected}")
    return tokenizer


# -- the model's parts ------------------------------------------------------------------------------------


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
    )


def make_text_encoder(vocab_size: int = 49408, bos: int = 49406, eos: int = 49407):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH, projection_dim=64, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
    )
    return CLIPTextModel(config)


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64), norm_num_groups=16, cross_attention_dim=64, attention_head_dim=8,
    )


def make_scheduler():
    from diffusers import DDIMScheduler

    # Cosine schedule: its last step is (almost) pure noise, as sampling starts; v-prediction stays well
    # posed there; "trailing" makes the first of 20 sampling steps t=999 (Lin et al. 2023).
    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing",
    )


# -- data -------------------------------------------------------------------------------------------------


def to_tensor(images) -> torch.Tensor:
    """PIL images -> N x 3 x H x W in [-1, 1]."""
    a = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def draw_pool(n: int, seed: int, styles: dict[str, float], placement: str = "centered") -> tuple[torch.Tensor, list[str], list[str]]:
    """n scenes: uint8 images (N x 3 x H x W), their captions and styles."""
    rng = random.Random(seed)
    names, weights = list(styles), list(styles.values())
    images, captions, kinds = [], [], []
    for _ in range(n):
        scene = shapes.random_scene(rng, placement)
        style = rng.choices(names, weights)[0]
        images.append(np.asarray(shapes.draw(scene, SIZE, style), dtype=np.uint8))
        captions.append(scene.caption())
        kinds.append(style)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions, kinds


def step_generator(seed: int, step: int, stage: int) -> torch.Generator:
    """One generator per (stage, step): a resumed run draws the same batches as an uninterrupted one."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 100_000 + step)


def cosine_lr(step: int, total: int, peak: float, warmup: int = 200, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


# -- 2. VAE ------------------------------------------------------------------------------------------------


def train_vae(args, work: Path):
    vae = make_vae()
    ckpt = work / "vae.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        log(f"vae: resumed at step {start}")
    if start >= args.vae_steps:
        return vae.eval()
    pool, _, _ = draw_pool(args.vae_pool, args.seed + 1, STYLE_MIX, placement="anywhere")
    log(f"vae: {sum(p.numel() for p in vae.parameters()):,} parameters, pool of {len(pool)} images")
    vae.train()
    t0, running = time.time(), None
    for step in range(start, args.vae_steps):
        g = step_generator(args.seed, step, 1)
        x = pool[torch.randint(0, len(pool), (args.vae_batch,), generator=g)].float() / 127.5 - 1.0
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.vae_steps, args.vae_lr)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        y = vae.decode(z).sample
        rec = F.l1_loss(y, x) + F.mse_loss(y, x)
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        loss = rec + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        running = rec.item() if running is None else 0.98 * running + 0.02 * rec.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.vae_steps:
            rate = (time.time() - t0) / (step + 1 - start)
            log(f"vae step {step + 1}/{args.vae_steps} rec {running:.4f} kl {kl.item():.2f} "
                f"({rate:.2f} s/step, {rate * (args.vae_steps - step - 1) / 60:.1f} min left)")
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.vae_steps:
            save_checkpoint(ckpt, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1})
    return vae.eval()


@torch.no_grad()
def encode(vae, images_u8: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images_u8), batch):
        posterior = vae.encode(images_u8[i : i + batch].float() / 127.5 - 1.0).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


# -- 3. UNet + text encoder -----------------------------------------------------------------------------------


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids


def min_snr_weights(scheduler, t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma loss weights for a v-prediction target (Hang et al. 2023): min(snr, gamma) / (snr + 1)."""
    alpha_bar = scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    return torch.clamp(snr, max=gamma) / (snr + 1)


def used_vocabulary(tokenizer) -> torch.Tensor:
    """The CLIP token ids any caption of the grammar (or the empty prompt) can use, sorted."""
    words = set(shapes.COLORS) | set(shapes.SHAPES) | {"a", "an", "on", "background"}
    ids = tokenizer(sorted(words) + [""], padding=False).input_ids
    return torch.tensor(sorted({i for row in ids for i in row}))


def full_text_encoder(compact, used: torch.Tensor, seed: int):
    """The shipped 49408-token text encoder: the trained rows in place, every other row as initialised."""
    torch.manual_seed(seed + 7)
    full = make_text_encoder()
    state = {k: v for k, v in compact.state_dict().items() if "token_embedding" not in k}
    full.load_state_dict(state, strict=False)
    with torch.no_grad():
        full.get_input_embeddings().weight[used] = compact.get_input_embeddings().weight
    return full.eval()


def train_denoiser(args, work: Path, vae, tokenizer):
    used = used_vocabulary(tokenizer)
    lookup = torch.full((49408,), -1, dtype=torch.long)
    lookup[used] = torch.arange(len(used))
    torch.manual_seed(args.seed)
    unet = make_unet()
    text_encoder = make_text_encoder(len(used), bos=int(lookup[49406]), eos=int(lookup[49407]))
    scheduler = make_scheduler()
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    embeddings = text_encoder.get_input_embeddings().weight
    decayed = [p for p in list(unet.parameters()) + list(text_encoder.parameters()) if p is not embeddings]
    opt = torch.optim.AdamW([{"params": decayed, "weight_decay": 0.01}, {"params": [embeddings], "weight_decay": 0.0}], lr=args.lr)
    ckpt = work / "denoiser.pt"
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        for module, key in ((unet, "unet"), (text_encoder, "text_encoder"), (ema_unet, "ema_unet"), (ema_text, "ema_text")):
            module.load_state_dict(state[key])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        log(f"denoiser: resumed at step {start}")
    if start < args.steps:
        pool, captions, _ = draw_pool(args.pool, args.seed + 2, {"plain": 1.0})
        log(f"denoiser: encoding a pool of {len(pool)} scenes")
        means, stds = encode(vae, pool)
        scaling = 1.0 / means.std().item()
        ids = lookup[tokenize(tokenizer, captions)]
        empty = lookup[tokenize(tokenizer, [""])[0]]
        assert (ids >= 0).all() and (empty >= 0).all(), "a caption uses a token outside used_vocabulary()"
        n_unet = sum(p.numel() for p in unet.parameters())
        n_text = sum(p.numel() for p in text_encoder.parameters()) + (49408 - len(used)) * embeddings.shape[1]
        log(f"denoiser: unet {n_unet:,} parameters, text encoder {n_text:,} (of them 49408 x {embeddings.shape[1]} "
            f"token embeddings, {len(used)} rows of which the captions use and train); latent scale {scaling:.4f}")
        unet.train()
        text_encoder.train()
        t0, running = time.time(), None
        for step in range(start, args.steps):
            g = step_generator(args.seed, step, 2)
            idx = torch.randint(0, len(means), (args.batch,), generator=g)
            z = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)) * scaling
            batch_ids = ids[idx].clone()
            batch_ids[torch.rand(args.batch, generator=g) < args.uncond] = empty  # for classifier-free guidance
            noise = torch.randn(z.shape, generator=g)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=g)
            noisy = scheduler.add_noise(z, noise, t)
            target = scheduler.get_velocity(z, noise, t)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, args.steps, args.lr)
            pred = unet(noisy, t, text_encoder(batch_ids)[0]).sample
            per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
            loss = (per_sample * min_snr_weights(scheduler, t)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(decayed + [embeddings], 1.0)
            opt.step()
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                    for pe, pl in zip(ema.parameters(), live.parameters()):
                        pe.lerp_(pl, 1 - decay)
            running = per_sample.mean().item() if running is None else 0.98 * running + 0.02 * per_sample.mean().item()
            if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
                rate = (time.time() - t0) / (step + 1 - start)
                log(f"denoiser step {step + 1}/{args.steps} v-mse {running:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                    f"({rate:.2f} s/step, {rate * (args.steps - step - 1) / 60:.1f} min left)")
            if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
                save_checkpoint(ckpt, {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                                       "ema_unet": ema_unet.state_dict(), "ema_text": ema_text.state_dict(),
                                       "opt": opt.state_dict(), "step": step + 1, "scaling": scaling})
            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
                pipe = assemble(vae, full_text_encoder(ema_text, used, args.seed), tokenizer, ema_unet, scaling)
                evaluate(pipe, args, n=32)
    scaling = torch.load(ckpt, weights_only=True)["scaling"]
    return ema_unet.eval(), full_text_encoder(ema_text, used, args.seed), scaling


# -- 4. the pipeline ---------------------------------------------------------------------------------------


def assemble(vae, text_encoder, tokenizer, unet, scaling: float):
    from diffusers import StableDiffusionPipeline

    vae = copy.deepcopy(vae).eval()
    vae.register_to_config(scaling_factor=scaling, force_upcast=False)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=copy.deepcopy(text_encoder).eval(), tokenizer=tokenizer, unet=copy.deepcopy(unet).eval(),
        scheduler=make_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@torch.no_grad()
def evaluate(pipe, args, n: int = 64, guidance: float | None = None) -> dict[str, float]:
    """Colour, shape and background accuracy of n generated images for random captions naming all three."""
    rng = random.Random(12345)
    scenes = [shapes.random_scene(rng) for _ in range(n)]
    prompts = [shapes.caption(s.color, s.shape, s.background) for s in scenes]
    classify = measure.ShapeClassifier.fit(random.Random(0), per_shape=50)
    pipe.set_progress_bar_config(disable=True)
    results = {}
    for scale in [guidance] if guidance else args.guidance:
        images = []
        for i in range(0, n, 16):
            gens = [torch.Generator().manual_seed(1000 + j) for j in range(i, min(n, i + 16))]
            images += pipe(prompts[i : i + 16], num_inference_steps=args.sample_steps, guidance_scale=scale,
                           generator=gens, output_type="pil").images
        color = np.mean([measure.dominant_color(im) == s.color for im, s in zip(images, scenes)])
        shape = np.mean([classify(im) == s.shape for im, s in zip(images, scenes)])
        background = np.mean([measure.background_color_name(im) == s.background for im, s in zip(images, scenes)])
        log(f"eval guidance {scale}: colour {color:.2f} shape {shape:.2f} background {background:.2f} "
            f"(chance {1 / len(shapes.COLORS):.2f}, {1 / len(shapes.SHAPES):.2f}, {1 / (len(shapes.COLORS) - 1):.2f})")
        results[scale] = (color, shape, background)
    return results


def save_pipeline(pipe, out: Path, tokenizer_dir: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    pipe = copy.deepcopy(pipe).to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    # CLIP's own files (vocab.json + merges.txt, 1.5 MB), not the 3.6 MB tokenizer.json that transformers writes
    shutil.rmtree(out / "tokenizer")
    shutil.copytree(tokenizer_dir, out / "tokenizer")
    total = 0
    for path in sorted(out.rglob("*")):
        if path.is_file():
            total += path.stat().st_size
            log(f"  {path.relative_to(out)}: {path.stat().st_size / 1e6:.2f} MB")
    log(f"wrote {out}: {total / 1e6:.2f} MB")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "lora_loader" / "embedded" / "shapes-sd")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lora_loader-embedded-model",
                   help="checkpoints; rerun with the same arguments to resume")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-kl", type=float, default=1e-5)
    p.add_argument("--vae-pool", type=int, default=12000)
    p.add_argument("--steps", type=int, default=3500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--pool", type=int, default=30000)
    p.add_argument("--uncond", type=float, default=0.1, help="share of empty captions (classifier-free guidance)")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, nargs="+", default=[2.0, 4.0, 7.5])
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--quick", action="store_true", help="a smoke run: a few steps of everything")
    args = p.parse_args(argv)
    if args.quick:
        args.vae_steps, args.steps, args.vae_pool, args.pool, args.log_every, args.eval_every = 20, 20, 256, 256, 5, 0
        args.ckpt_every, args.guidance = 10, [4.0]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    tokenizer_dir = args.work / "tokenizer"
    write_clip_tokenizer(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    log("tokenizer: CLIP BPE rebuilt, ids check out")

    vae = train_vae(args, args.work)
    log(f"vae done ({(time.time() - t0) / 60:.1f} min so far)")
    unet, text_encoder, scaling = train_denoiser(args, args.work, vae, tokenizer)
    log(f"denoiser done ({(time.time() - t0) / 60:.1f} min so far)")

    pipe = assemble(vae, text_encoder, tokenizer, unet, scaling)
    save_pipeline(pipe, args.out, tokenizer_dir)
    from diffusers import StableDiffusionPipeline

    reloaded = StableDiffusionPipeline.from_pretrained(args.out, dtype=torch.float32)
    evaluate(reloaded, args, n=64)
    log(f"all done in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
