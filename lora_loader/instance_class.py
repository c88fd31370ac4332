"""Giving one instance a mixin: its class becomes a subclass of its own class with the mixin first.

`attach` decides which mixin an object gets; this module does the swap, so that
`pipeline` can attach its components as models without importing `attach`.
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")
_attached: dict[tuple[type, type], type] = {}
_metaclasses: dict[type, type] = {}


def _attached_metaclass(meta: type) -> type:
    """A metaclass under which an attached class compares equal to the class it attaches to.

    diffusers' ``from_pipe`` keeps a model component only if ``type(component) in <the new pipeline's
    type hints>``, a tuple test that compares classes with ``==``: with this, ``pipe.unet`` of an attached
    pipeline still passes as a ``UNet2DConditionModel``, and its adapters go along, as with peft.
    Identity (``is``), ``issubclass`` and hashing are unchanged.
    """
    found = _metaclasses.get(meta)
    if found is None:

        def __eq__(cls, other):
            return cls is other or other is cls.__dict__.get("_lora_attached_to", cls)

        found = meta.__class__(f"LoraAttached{meta.__name__.title()}", (meta,), {"__eq__": __eq__, "__hash__": meta.__hash__})
        _metaclasses[meta] = found
    return found


def swap_in_mixin(obj: T, mixin: type) -> T:
    """Make ``obj`` an instance of ``(mixin, type(obj))``, a subclass that keeps the class's name and module,
    so ``save_pretrained`` still writes the original class name. One subclass per (mixin, class).

    >>> import torch
    >>> class Shout:
    ...     def hello(self): return "HELLO"
    >>> layer = swap_in_mixin(torch.nn.Linear(2, 2), Shout)
    >>> type(layer).__name__, layer.hello(), isinstance(layer, torch.nn.Linear)
    ('Linear', 'HELLO', True)
    """
    base = type(obj)
    cls = _attached.get((mixin, base))
    if cls is None:
        namespace = {"__module__": base.__module__, "__qualname__": base.__qualname__, "_lora_attached_to": base}
        cls = _attached_metaclass(type(base))(base.__name__, (mixin, base), namespace)
        _attached[(mixin, base)] = cls
    obj.__class__ = cls
    return obj
