"""Two SDXL LoRAs from the Hub, blended 0.7 / 0.3 (needs the SDXL weights and a network or a filled HF cache).

Run:  python examples/sdxl_blend.py
"""

import torch
from diffusers import StableDiffusionXLPipeline

import lora_loader


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", torch_dtype=dtype)
    pipe = lora_loader.attach(pipe.to(device))
    print(pipe.load_lora_weights("artificialguybr/3DRedmond-V1",
                                 weight_name="3DRedmond-3DRenderStyle-3DRenderAF.safetensors", adapter_name="3d"))
    print(pipe.load_lora_weights("ostris/super-cereal-sdxl-lora",
                                 weight_name="cereal_box_sdxl_v1.safetensors", adapter_name="cereal"))
    pipe.set_adapters(["3d", "cereal"], weights=[0.7, 0.3])
    pipe("sushi rolls shaped like kawaii cat faces", num_inference_steps=30).images[0].save("sushi_blend.png")
    pipe.set_adapters(["3d"], weights=[{"unet": {"down": 0.0, "mid": 1.0, "up": 1.0}, "text_encoder": 0.5}])
    pipe("sushi rolls shaped like kawaii cat faces", num_inference_steps=30).images[0].save("sushi_3d_up_only.png")
    pipe.disable_lora()
    pipe("sushi rolls shaped like kawaii cat faces", num_inference_steps=30).images[0].save("sushi_base.png")


if __name__ == "__main__":
    main()
