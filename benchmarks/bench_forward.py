"""The ``forward`` figure: a UNet forward with 1 and 2 unfused adapters, against the base UNet in the same rounds."""

from __future__ import annotations

import torch

from harness import DP, LL, timed
from report import Row, med, verdict
from sd_setup import SDBench


def fig_forward(sd: SDBench) -> None:
    size = sd.size
    lat = size.latent
    print(f"\n== forward: UNet forward on 1x4x{lat}x{lat} latents, unfused, 1 and 2 adapters", flush=True)
    sd.ensure_ab()
    g = torch.Generator().manual_seed(7)
    hidden = size.text["hidden_size"]
    x = torch.randn(1, 4, lat, lat, generator=g)
    ehs = torch.randn(1, 77, hidden, generator=g)
    t = torch.tensor([500])
    unets = {"base": sd.base_unet, LL: sd.ll.unet, "other": sd.dp.unet}

    def forward(which: str):
        with torch.no_grad():
            return unets[which](x, t, encoder_hidden_states=ehs).sample

    for k, names, weights in ((1, ["A"], [1.0]), (2, ["A", "B"], [0.7, 0.5])):
        for pipe in sd.pipes.values():
            pipe.set_adapters(names, weights)
        outs = {w: forward(w) for w in ("base", LL, "other")}  # warm-up (and lora_loader's concatenation)
        diff = (outs[LL] - outs["other"]).abs().max().item()
        moved = (outs[LL] - outs["base"]).abs().max().item()
        line = f"UNet output with {k} adapter(s): max |{LL} - {DP}| = {diff:.2e} (the LoRA moves it by {moved:.2e})"
        sd.report.checks.append(line)
        print("  " + line, flush=True)
        samples = {"base": [], LL: [], "other": []}
        overhead = {LL: [], "other": []}
        perms = [("base", LL, "other"), ("other", "base", LL), (LL, "other", "base")]
        for r in range(sd.repeats):
            for which in perms[r % 3]:
                samples[which].append(timed(lambda: forward(which))[0])
            for lib in (LL, "other"):
                overhead[lib].append((samples[lib][-1] / samples["base"][-1] - 1) * 100)
            print(f"  round {r + 1}: base {samples['base'][-1]:.3f} s, {LL} {samples[LL][-1]:.3f} s, {DP} {samples['other'][-1]:.3f} s", flush=True)
        sd.report.add(Row("forward", f"reference: UNet forward 1x4x{lat}x{lat}, base model (no LoRA)", "s", None, samples["base"], "base model", kind="plain"))
        sd.report.add(Row("forward", f"UNet forward, {k} adapter(s) unfused", "s", samples[LL], samples["other"], DP))
        row = Row("forward", f"overhead over base, {k} adapter(s) (per round)", "%", overhead[LL], overhead["other"], DP, kind="plain")
        if k == 2:
            o = med(overhead[LL])
            row.target, row.met = "two adapters <= +15%", o <= 15
            row.verdict = verdict(o <= 15, f"{o:+.1f}%" + ("" if o <= 15 else f" ({o - 15:.1f} points over)"))
        sd.report.add(row)
