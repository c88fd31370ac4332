"""lora_loader: LoRA adapters for diffusers pipelines and transformers models, without peft.

>>> import lora_loader
>>> sorted(n for n in lora_loader.__all__ if n.startswith("Lora"))[:3]
['LoraConfig', 'LoraError', 'LoraFileError']
"""

from ._version import __version__
from .attach import attach
from .auto import AutoLoraModelForCausalLM
from .config import LoraConfig
from .errors import (
    LoraError,
    LoraFileError,
    LoraFormatError,
    LoraNameError,
    LoraShapeError,
    LoraTargetError,
    LoraWarning,
)
from .host import LoadReport, prepare_hotswap
from .model import LoraModelMixin
from .pipeline import LoraPipelineMixin


__all__ = [
    "attach",
    "AutoLoraModelForCausalLM",
    "LoraConfig",
    "LoadReport",
    "prepare_hotswap",
    "LoraError",
    "LoraFileError",
    "LoraFormatError",
    "LoraModelMixin",
    "LoraNameError",
    "LoraPipelineMixin",
    "LoraShapeError",
    "LoraTargetError",
    "LoraWarning",
]
