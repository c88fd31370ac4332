"""Find the live module a file's name refers to, by building every alias of every module once.

Files name modules in several ways: diffusers' dotted paths, Kohya's
underscore-mangled paths (``down_blocks_0_attentions_0_proj_in``), Stability's
original UNet layout that sd-scripts writes for SDXL (``input_blocks_4_1_...``),
and text-encoder paths with or without transformers' ``text_model.`` segment.
Underscores are ambiguous (``to_q``, ``proj_in``, ``time_emb_proj``), so we
never parse a name: we enumerate the live model's modules, generate each
one's aliases, and look names up in that dict (as ComfyUI and A1111 do).
"""

from __future__ import annotations

import weakref

from torch import nn

from .formats.original_names.sgm import sgm_name, unet_sgm_prefixes

def mangle(name: str) -> str:
    """Kohya's spelling of a module path: dots become underscores."""
    return name.replace(".", "_")


# Containers our wrapping adds to a module: adapters, never targets of a file.
_OUR_CONTAINERS = frozenset({"lora_adapters", "lora_copies", "lora_biases", "lora_norms", "lora_params"})
_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _walk(root: nn.Module):
    """``named_modules()`` without the adapters our wrapping holds (a model with ten adapters
    loaded has ten times as many adapter modules as layers; none of them is a target)."""
    stack = [("", root)]
    seen = set()
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        wrapped = "_lora_base_class" in module.__dict__
        for child_name, child in reversed(module._modules.items()):
            if child is None or (wrapped and child_name in _OUR_CONTAINERS):
                continue
            stack.append((f"{name}.{child_name}" if name else child_name, child))


class ModuleIndex:
    """Every alias of every module of one component, built with a single walk of its modules.

    `cached` keeps the index of a component between loads; every lookup checks
    that the module found is still at its path, and rebuilds the index once if
    not (or if the name is unknown), so a model changed in between is seen as it is now.

    >>> index = ModuleIndex(nn.Sequential(nn.Linear(2, 2)))
    >>> index.lookup("0") is index.lookup("0")
    True
    """

    def __init__(self, root: nn.Module):
        self._root = weakref.ref(root)
        self._fresh = True
        self._build(root)

    @classmethod
    def cached(cls, root: nn.Module) -> ModuleIndex:
        """The index built for ``root`` by an earlier load, if any, to be checked as it is used."""
        index = _cache.get(root)
        if index is None:
            index = cls(root)
            _cache[root] = index
        else:
            index._fresh = False
        return index

    def _build(self, root: nn.Module) -> None:
        self.modules: dict[str, nn.Module] = {}
        self._aliases: dict[str, str] = {}
        self._ambiguous: set[str] = set()
        sgm = unet_sgm_prefixes(root)
        for name, module in _walk(root):
            if not name:
                continue
            self.modules[name] = module
            for alias in self._aliases_of(name, sgm):
                self._add(alias, name)

    def _current(self, path: str) -> bool:
        """Is ``self.modules[path]`` still the module at ``path``?"""
        module = self._root()
        for part in path.split("."):
            module = None if module is None else module._modules.get(part)
        return module is not None and module is self.modules.get(path)

    @staticmethod
    def _aliases_of(name: str, sgm: dict[str, str]) -> list[str]:
        dotted = [name]
        # transformers 5 dropped CLIPTextModel.text_model; files written before keep it (and vice versa).
        if name.startswith("text_model."):
            dotted.append(name[len("text_model."):])
        else:
            dotted.append("text_model." + name)
        if sgm:
            stability = sgm_name(name, sgm)
            if stability is not None:
                dotted.append(stability)
        return dotted + [mangle(d) for d in dotted]

    def _add(self, alias: str, name: str) -> None:
        owner = self._aliases.get(alias)
        if owner is None:
            self._aliases[alias] = name
        elif owner != name:
            # Real module names win over generated aliases; two generated aliases that collide are ambiguous.
            if alias == name:
                self._aliases[alias] = name
                self._ambiguous.discard(alias)
            elif alias != owner:
                self._ambiguous.add(alias)

    def _find(self, alias: str) -> str | None:
        if alias in self._ambiguous:
            return None
        return self._aliases.get(alias)

    def lookup(self, alias: str) -> str | None:
        """The live module path ``alias`` refers to, or None."""
        path = self._find(alias)
        if self._fresh or (path is not None and self._current(path)):
            return path
        root = self._root()
        if root is None:
            return None
        self._build(root)  # the model changed since the index was built
        self._fresh = True
        return self._find(alias)
