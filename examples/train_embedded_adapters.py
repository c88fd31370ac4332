#!/usr/bin/env python3
"""Train the embedded model's two style adapters with lora_loader's own training path, on one CPU core.

Each style is the same drawn world restyled by ``lora_loader/embedded/shapes.py``:
``neon`` (near-black background, glowing outline) and ``pastel`` (colours mixed
towards white, horizontally striped fill). The captions are the base model's
("a red circle on a blue background"): no trigger word, the adapter itself is
the style.

For each style:
  1. ``lora_loader.attach(pipe.unet).add_adapter(LoraConfig(...))`` and the same on
     ``pipe.text_encoder``: the base is frozen, only the adapter's factors train;
  2. a plain PyTorch loop with the base model's objective (v-prediction,
     min-SNR-5 weights, 10% empty captions so guidance still works);
  3. the two components' adapters become one pipeline adapter
     (``pipe.load_lora_weights`` of their diffusers-keyed tensors), written with
     ``pipe.save_lora_weights(..., format="kohya" | "diffusers")`` as
     ``adapters/{style}.kohya.safetensors`` and ``adapters/{style}.diffusers.safetensors``;
  4. base and adapted images of the same prompts and seeds are measured
     (``lora_loader.embedded.measure``: darkness, paleness, stripiness).

    python3 examples/train_embedded_adapters.py --seed 0          # about 12 minutes on one core
    python3 examples/train_embedded_adapters.py --quick --out /tmp/adapters   # a smoke run
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import lora_loader  # noqa: E402
from lora_loader import embedded  # noqa: E402
from lora_loader.embedded import measure, shapes  # noqa: E402
from train_embedded_model import cosine_lr, draw_pool, encode, log, min_snr_weights, step_generator, tokenize  # noqa: E402

STYLES = ("neon", "pastel")
# LoRA on every linear of the UNet's transformer blocks and on the resnets' 3x3 convs ("LoCon"): a style
# changes colours and textures everywhere, not only what attention picks.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def load_base(model: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_style(args, style: str):
    """Train one style adapter on a fresh copy of the base model; returns its diffusers-keyed tensors."""
    pipe = load_base(args.model)
    torch.manual_seed(args.seed + STYLES.index(style))
    unet = lora_loader.attach(pipe.unet)
    text_encoder = lora_loader.attach(pipe.text_encoder)
    unet.add_adapter(lora_loader.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=UNET_TARGETS), adapter_name=style)
    text_encoder.add_adapter(lora_loader.LoraConfig(r=args.text_rank, lora_alpha=args.text_rank, target_modules=TEXT_TARGETS),
                             adapter_name=style)
    params = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    log(f"{style}: {sum(p.numel() for p in params):,} trainable parameters "
        f"(unet {sum(p.numel() for p in unet.parameters() if p.requires_grad):,}, "
        f"text encoder {sum(p.numel() for p in text_encoder.parameters() if p.requires_grad):,}); the base is frozen")

    pool, captions, _ = draw_pool(args.pool, args.seed + 10 + STYLES.index(style), {style: 1.0})
    means, stds = encode(pipe.vae, pool)
    scaling = pipe.vae.config.scaling_factor
    ids = tokenize(pipe.tokenizer, captions)
    empty = tokenize(pipe.tokenizer, [""])[0]
    scheduler = pipe.scheduler
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    unet.train()
    text_encoder.train()
    t0, running = time.time(), None
    for step in range(args.steps):
        g = step_generator(args.seed, step, 3 + STYLES.index(style))
        idx = torch.randint(0, len(means), (args.batch,), generator=g)
        z = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)) * scaling
        batch_ids = ids[idx].clone()
        batch_ids[torch.rand(args.batch, generator=g) < args.uncond] = empty
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=g)
        noisy = scheduler.add_noise(z, noise, t)
        target = scheduler.get_velocity(z, noise, t)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr, warmup=min(50, args.steps // 4 + 1))
        pred = unet(noisy, t, text_encoder(batch_ids)[0]).sample
        per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(scheduler, t)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running = per_sample.mean().item() if running is None else 0.95 * running + 0.05 * per_sample.mean().item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            rate = (time.time() - t0) / (step + 1)
            log(f"{style} step {step + 1}/{args.steps} v-mse {running:.4f} ({rate:.2f} s/step, "
                f"{rate * (args.steps - step - 1) / 60:.1f} min left)")
    unet.eval()
    text_encoder.eval()
    # One pipeline adapter from the two components' adapters: diffusers' keys, "unet." / "text_encoder." first.
    tensors = {f"unet.{k}": v.clone() for k, v in unet.get_adapter_state_dict(style).items()}
    tensors.update({f"text_encoder.{k}": v.clone() for k, v in text_encoder.get_adapter_state_dict(style).items()})
    return tensors


def save_style(args, style: str, tensors: dict) -> list[Path]:
    pipe = lora_loader.attach(load_base(args.model))
    # lora_alpha == r in training, and a state dict without a header means alpha = rank: the same scale.
    report = pipe.load_lora_weights(tensors, adapter_name=style)
    log(str(report))
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for layout in embedded.LAYOUTS:
        path = args.out / f"{style}.{layout}.safetensors"
        pipe.save_lora_weights(str(path), adapter_name=style, format=layout)
        log(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")
        written.append(path)
    return written


@torch.no_grad()
def report_styles(args) -> None:
    """Base vs each adapter vs their 50/50 blend on the same prompts and seeds: the style statistics."""
    rng = random.Random(4321)
    scenes = [shapes.random_scene(rng) for _ in range(16)]
    prompts = [shapes.caption(s.color, s.shape, s.background) for s in scenes]
    pipe = lora_loader.attach(load_base(args.model))
    for style in STYLES:
        pipe.load_lora_weights(str(args.out / f"{style}.kohya.safetensors"), adapter_name=style)

    def render():
        gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        return pipe(prompts, num_inference_steps=embedded.STEPS, guidance_scale=embedded.GUIDANCE, generator=gens).images

    rows = {}
    pipe.disable_lora()
    rows["base"] = render()
    pipe.enable_lora()
    for style in STYLES:
        pipe.set_adapters([style])
        rows[style] = render()
    pipe.set_adapters(list(STYLES), [0.5, 0.5])
    rows["blend"] = render()
    for name, images in rows.items():
        color = np.mean([measure.dominant_color(im) == s.color for im, s in zip(images, scenes)])
        log(f"{name:>6}: darkness {measure.mean_statistic(measure.darkness, images):.3f} "
            f"paleness {measure.mean_statistic(measure.paleness, images):.3f} "
            f"stripiness {measure.mean_statistic(measure.stripiness, images):.4f} shape colour right {color:.2f}")
    for style in STYLES:
        drawn = [shapes.draw(s, embedded.SIZE, style) for s in scenes]
        log(f"drawn {style:>6}: darkness {measure.mean_statistic(measure.darkness, drawn):.3f} "
            f"paleness {measure.mean_statistic(measure.paleness, drawn):.3f} "
            f"stripiness {measure.mean_statistic(measure.stripiness, drawn):.4f}")
    if args.sheet:
        from PIL import Image

        sheet = Image.new("RGB", (len(prompts) * 34, len(rows) * 34), (128, 128, 128))
        for r, images in enumerate(rows.values()):
            for c, image in enumerate(images):
                sheet.paste(image, (c * 34, r * 34))
        sheet.resize((sheet.width * 3, sheet.height * 3), Image.NEAREST).save(args.sheet)
        log(f"contact sheet (rows: {', '.join(rows)}) -> {args.sheet}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=Path, default=embedded.model_path())
    p.add_argument("--out", type=Path, default=embedded.model_path().parent / "adapters")
    p.add_argument("--styles", nargs="+", default=list(STYLES), choices=STYLES)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--text-rank", type=int, default=4)
    p.add_argument("--pool", type=int, default=4000)
    p.add_argument("--uncond", type=float, default=0.1)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--sheet", type=Path, default=None, help="write a contact sheet PNG (base, neon, pastel, blend)")
    p.add_argument("--quick", action="store_true", help="a smoke run: a few steps")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.pool, args.log_every = 10, 128, 5
    torch.set_num_threads(args.threads)
    t0 = time.time()
    for style in args.styles:
        tensors = train_style(args, style)
        save_style(args, style, tensors)
        log(f"{style} done ({(time.time() - t0) / 60:.1f} min so far)")
    if set(args.styles) == set(STYLES):
        report_styles(args)
    log(f"all done in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
