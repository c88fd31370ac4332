"""The embedded model: a small Stable Diffusion trained from scratch on drawn shapes, and two style adapters.

Nothing is downloaded: the weights ship inside the package. ``shapes-sd/`` is
an ordinary diffusers ``StableDiffusionPipeline`` folder (UNet, VAE, CLIP text
encoder with CLIP's own BPE tokenizer, DDIM scheduler) that draws 32x32 images
of "a {color} {shape} on a {background} background"
(`lora_loader.embedded.shapes` has the vocabulary). ``adapters/`` holds two
style LoRAs trained with lora_loader itself, each in Kohya and diffusers
layout. ``examples/train_embedded_model.py`` and
``examples/train_embedded_adapters.py`` rebuild them all.

>>> import torch, lora_loader
>>> from lora_loader import embedded
>>> pipe = embedded.load_pipeline()
>>> sorted(embedded.ADAPTERS)
['neon', 'pastel']
>>> report = pipe.load_lora_weights(embedded.adapter_path("neon"), adapter_name="neon")
>>> images = pipe(["a red circle on a blue background"], num_inference_steps=4,
...               generator=torch.Generator().manual_seed(0)).images
>>> images[0].size
(32, 32)
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..attach import attach
from ..errors import LoraError, LoraNameError

_HERE = Path(__file__).resolve().parent

# Sampling defaults the model was checked with (tests/test_embedded.py): 32x32 images, DDIM.
SIZE = 32
STEPS = 20
GUIDANCE = 4.0

# The adapters: name -> what it does. Neither needs a trigger word: loaded and active, it restyles
# whatever the prompt asks for (the prompt still picks shape and colours).
ADAPTERS: dict[str, str] = {
    "neon": "neon outlines: a near-black background and a glowing outline of the shape in its colour",
    "pastel": "pastel stripes: colours mixed towards white, the shape filled with horizontal stripes",
}
LAYOUTS = ("kohya", "diffusers")


def model_path() -> Path:
    """The folder of the embedded ``StableDiffusionPipeline`` (``model_index.json``, ``unet/``, ``vae/``, ...).

    >>> (model_path() / "model_index.json").is_file()
    True
    """
    return _HERE / "shapes-sd"


def adapter_path(name: str, layout: str = "kohya") -> Path:
    """The ``.safetensors`` file of an embedded adapter, in ``kohya`` or ``diffusers`` layout.

    >>> adapter_path("pastel", "diffusers").name
    'pastel.diffusers.safetensors'
    """
    if name not in ADAPTERS:
        raise LoraNameError(f"no embedded adapter named {name!r}; the embedded adapters are {sorted(ADAPTERS)}")
    if layout not in LAYOUTS:
        raise LoraError(f"layout={layout!r}; the embedded adapters ship as {LAYOUTS}")
    return _HERE / "adapters" / f"{name}.{layout}.safetensors"


def load_pipeline(dtype: torch.dtype = torch.float32):
    """The embedded ``StableDiffusionPipeline``, attached (``lora_loader.attach``), on the CPU, progress bar off.

    The weights are stored in fp16 and cast to ``dtype``. The scheduler is DDIM
    with trailing timesteps, so ``num_inference_steps=STEPS`` (20) is enough;
    the pipeline draws ``SIZE`` x ``SIZE`` (32x32) images unless told otherwise.

    >>> pipe = load_pipeline()
    >>> type(pipe).__name__, pipe.unet.dtype
    ('StableDiffusionPipeline', torch.float32)
    """
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model_path(), dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return attach(pipe)


__all__ = ["ADAPTERS", "GUIDANCE", "LAYOUTS", "SIZE", "STEPS", "adapter_path", "load_pipeline", "model_path"]
