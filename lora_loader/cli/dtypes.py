"""The ``--dtype`` names of ``convert`` and ``generate``, and the torch dtype each stands for.

>>> import torch
>>> getattr(torch, TORCH_DTYPE_NAMES["bf16"])
torch.bfloat16
"""

TORCH_DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
