"""Every failure lora_loader raises is a `LoraError`.

Messages name the file, the key or module, and what was expected, so a user
can act on them without reading our code.
"""

from __future__ import annotations


class LoraError(ValueError):
    """Base class of every error lora_loader raises.

    A `ValueError`, as the errors diffusers and transformers raise for the same mistakes (an unknown
    adapter name, a weights list of the wrong length), so ``except ValueError`` code keeps working.
    """


class LoraFileError(LoraError, OSError):
    """The source could not be found or read (missing, corrupt, truncated, pickled); also an `OSError`,
    as diffusers' and huggingface_hub's errors for a missing or unreadable file are."""


class LoraFormatError(LoraError):
    """The file was read, but its keys are not a LoRA we can apply."""


class LoraShapeError(LoraError):
    """A tensor's shape does not fit the module it targets."""


class LoraNameError(LoraError):
    """An adapter name is unknown, already in use, or not a valid name."""


class LoraTargetError(LoraError):
    """A key targets no module of the model, or a module type we cannot adapt."""


class LoraWarning(UserWarning):
    """Something was skipped on purpose (all-zero tensors, `strict=False`)."""
