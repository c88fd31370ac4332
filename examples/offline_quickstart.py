"""Load, blend, disable and delete LoRAs on a tiny Stable Diffusion pipeline, fully offline.

Run:  python examples/offline_quickstart.py

It builds a tiny SD-1.5-shaped pipeline from configs (random weights), writes two LoRA
files the way trainers do (one Kohya / sd-scripts, one diffusers / PEFT with its
rank and alpha in the safetensors header), then loads and blends them with lora_loader.
Swap the tiny pipeline for `StableDiffusionPipeline.from_pretrained(...)` and the files
for real ones and the calls stay the same.
"""

import json
import os
import sys
import tempfile

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from tiny import tiny_sd_pipeline  # noqa: E402  (a tiny pipeline built from configs)

import lora_loader  # noqa: E402


def write_kohya_lora(pipe, path, rank=4, alpha=2.0, seed=1):
    """sd-scripts naming: lora_unet_<module path with '_'>.lora_down.weight / .lora_up.weight / .alpha"""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in pipe.unet.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_v", "attn2.to_k", "resnets.0.conv1")):
            out_f, in_f, *kernel = module.weight.shape
            key = "lora_unet_" + name.replace(".", "_")
            tensors[key + ".lora_down.weight"] = torch.randn(rank, in_f, *kernel, generator=g) * 0.3
            tensors[key + ".lora_up.weight"] = torch.randn(out_f, rank, *([1, 1] if kernel else []), generator=g) * 0.3
            tensors[key + ".alpha"] = torch.tensor(alpha)
    save_file(tensors, path, metadata={"ss_network_module": "networks.lora"})


def write_diffusers_lora(pipe, path, rank=2, alpha=4, seed=2):
    """diffusers naming, with rank and alpha only in the header, as diffusers' training scripts write them."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in pipe.text_encoder.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            tensors[f"text_encoder.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.3
            tensors[f"text_encoder.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.3
    header = {"text_encoder.r": rank, "text_encoder.lora_alpha": alpha}
    save_file(tensors, path, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(header)})


def main():
    pipe = lora_loader.attach(tiny_sd_pipeline(0))
    folder = tempfile.mkdtemp()
    write_kohya_lora(pipe, os.path.join(folder, "style_kohya.safetensors"))
    write_diffusers_lora(pipe, os.path.join(folder, "pytorch_lora_weights.safetensors"))

    def render():
        return pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    base = render()
    print(pipe.load_lora_weights(os.path.join(folder, "style_kohya.safetensors"), adapter_name="style"))
    print(pipe.load_lora_weights(folder, adapter_name="text"))  # the folder's pytorch_lora_weights.safetensors
    pipe.set_adapters(["style", "text"], weights=[0.7, 0.3])
    blended = render()
    pipe.set_adapters(["style"], weights=[{"unet": {"down": 0.0, "up": 1.0}}])
    print("active:", pipe.get_active_adapters(), "per component:", pipe.get_list_adapters())
    pipe.disable_lora()
    print("disabled == base:", torch.equal(render(), base), "| blend changed the image:", not torch.equal(blended, base))
    pipe.enable_lora()
    pipe.delete_adapters(["style", "text"])
    print("after delete == base:", torch.equal(render(), base))


if __name__ == "__main__":
    main()
