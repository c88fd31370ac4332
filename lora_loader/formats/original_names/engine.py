"""The engine that applies a family's table of original checkpoint names (see `original_names`).

A `Family` is data: the original module names (Kohya-mangled: dots as underscores), grouped
into `Blocks` that repeat with an index and a few top-level modules, each mapped to a
`Target`: the diffusers module path(s) it becomes, how a fused projection's output rows
split between them, and whether its ``(shift, scale)`` halves swap. The engine does the
rest for every family alike:

- `Family.convert_module`: one original-named module's delta onto diffusers' module(s).
  A LoRA on a fused projection is one product ``B @ A`` over the fused output rows;
  each diffusers module gets the same ``A`` tensor (shared, not copied) and its own
  slice of ``B``'s rows (and of ``lora_B.bias``), which is that product restricted to
  its rows. A LyCORIS kind keeps its factors whole and each part takes its rows of
  their dense product (``rows=``); a full diff is cut by rows, a DoRA scale by output
  rows. A swapped module's ``B`` rows (or its dense rows) trade halves.
- `Family.original_name`: the way back, a diffusers path to its original name (and its
  part of a fused projection), for writing files in original names.

>>> fam = Family("Demo", hint="blocks_*", blocks=(Blocks("blocks_{i}_", "layers.{i}.", {"qkv": fused("q", "k", "v")}),))
>>> fam.targets("blocks_2_qkv").paths
('layers.2.q', 'layers.2.k', 'layers.2.v')
>>> fam.original_name("layers.2.k")
('blocks_2_qkv', 1)
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field

import torch

from ...algorithms.dora import dora_on_output
from ...delta import LoraDelta, take_rows

ALWAYS = "always"
IF_TWO_HALVES = "if_two_halves"  # only a module with two output rows per input feature: (shift, scale) alone


@dataclass(frozen=True)
class Target:
    """What one original module becomes: diffusers module path(s) (relative to its block's prefix).

    ``paths`` has one path for a rename, several for a fused projection whose output rows
    are theirs in order: ``ratios`` are their relative row counts (None: equal parts),
    ``counts`` their absolute row counts instead. ``swap`` is `ALWAYS` or `IF_TWO_HALVES`
    when the module's output is ``(shift, scale)`` in the original and ``(scale, shift)``
    in diffusers.
    """

    paths: tuple[str, ...]
    ratios: tuple[int, ...] | None = None
    counts: tuple[int, ...] | None = None
    swap: str | None = None

    def __post_init__(self):
        if self.swap not in (None, ALWAYS, IF_TWO_HALVES):
            raise ValueError(f"swap={self.swap!r}; expected None, {ALWAYS!r} or {IF_TWO_HALVES!r}")
        if self.swap and len(self.paths) != 1:
            raise ValueError("a swapped module is one module, not a fused projection")
        for split in (self.ratios, self.counts):
            if split is not None and len(split) != len(self.paths):
                raise ValueError(f"{split} gives {len(split)} parts for {len(self.paths)} paths")

    @property
    def fused(self) -> bool:
        return len(self.paths) > 1

    def sizes(self, rows: int) -> list[int] | None:
        """Row counts of the parts of a fused output of ``rows`` rows, or None if it does not split so."""
        if self.counts is not None:
            return list(self.counts) if sum(self.counts) == rows else None
        ratios = self.ratios or (1,) * len(self.paths)
        unit, left = divmod(rows, sum(ratios))
        return None if left else [ratio * unit for ratio in ratios]

    def under(self, prefix: str) -> Target:
        return dataclasses.replace(self, paths=tuple(prefix + path for path in self.paths))


def fused(*parts: str | tuple[str, int]) -> Target:
    """A fused projection: its parts in row order, each a path (an equal share) or ``(path, ratio)``.

    >>> fused(("to_q", 1), ("proj_mlp", 4)).sizes(10)
    [2, 8]
    """
    paths = tuple(p if isinstance(p, str) else p[0] for p in parts)
    ratios = tuple(1 if isinstance(p, str) else p[1] for p in parts)
    return Target(paths, ratios=None if set(ratios) == {1} else ratios)


def swapped(path: str, when: str = ALWAYS) -> Target:
    """A modulation whose ``(shift, scale)`` halves are ``(scale, shift)`` in diffusers."""
    return Target((path,), swap=when)


def _target(spec: str | tuple[str, ...] | Target) -> Target:
    if isinstance(spec, Target):
        return spec
    return Target((spec,)) if isinstance(spec, str) else Target(tuple(spec))


@dataclass(frozen=True)
class Blocks:
    """Repeated blocks: original names ``original`` + suffix, diffusers paths ``diffusers`` + path; ``{i}``
    is the block index in both. ``modules`` maps each suffix to a path, a tuple of paths (a fused
    projection in equal parts) or a `Target`. ``aliases`` are other spellings of a suffix that some
    producer writes (read as that suffix, never written).

    >>> fam = Family("Demo", hint="blocks_*", blocks=(Blocks("blocks_{i}_", "layers.{i}.", {"o": "to_out.0"}, {"to_out_0": "o"}),))
    >>> fam.targets("blocks_1_to_out_0").paths, fam.original_name("layers.1.to_out.0")
    (('layers.1.to_out.0',), ('blocks_1_o', 0))
    """

    original: str
    diffusers: str
    modules: dict
    aliases: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    """One model family's original names: `Blocks` and top-level ``modules`` (original name -> target).
    ``hint`` names a few originals for the message about a module the table lacks; ``key``, ``detect``
    and ``header_hints`` tell ``lora-loader inspect`` the family. With ``keep_unknown``, a name the table
    lacks is not refused but kept as the file spells it, for the live model's names to resolve: for a
    family whose original and diffusers names share their block prefix (Wan's ``blocks_N_``), so a Kohya
    file in diffusers' names (``blocks_0_attn1_to_q``) still loads.

    >>> fam = Family("Demo", hint="blocks_*", blocks=(Blocks("blocks_{i}_", "layers.{i}.", {"q": "to_q"}),), keep_unknown=True)
    >>> delta = LoraDelta(torch.ones(1, 2), torch.ones(2, 1))
    >>> [path for path, _ in fam.convert_module("blocks_0_q", delta)[0]], [path for path, _ in fam.convert_module("blocks_0_to_k", delta)[0]]
    (['layers.0.to_q'], ['blocks_0_to_k'])
    """

    name: str
    hint: str
    blocks: tuple[Blocks, ...] = ()
    modules: dict = field(default_factory=dict)
    # For `families.detect_family` (``lora-loader inspect``): the family's id, regexes (``re.search``) over a
    # file's denoiser module paths in diffusers' names with dots as underscores that only this family has,
    # and substrings of a producer's header (``ss_base_model_version``, ``modelspec.architecture``) naming it.
    key: str = ""
    detect: tuple[str, ...] = ()
    header_hints: tuple[str, ...] = ()
    keep_unknown: bool = False

    def __post_init__(self):
        compiled = []
        for blocks in self.blocks:
            head, _, tail = blocks.original.partition("{i}")
            pattern = re.compile(rf"^{re.escape(head)}(\d+){re.escape(tail)}(.+)$")
            table = {suffix: _target(spec) for suffix, spec in blocks.modules.items()}
            # Aliases first, so the way back (`original_name`) writes the suffix itself.
            table = {alias: table[suffix] for alias, suffix in blocks.aliases.items()} | table
            compiled.append((pattern, blocks.diffusers, table))
        object.__setattr__(self, "_blocks", tuple(compiled))
        object.__setattr__(self, "_modules", {name: _target(spec) for name, spec in self.modules.items()})
        object.__setattr__(self, "_back", None)

    def claims(self, module_names) -> bool:
        """True when some of a file's denoiser names (Kohya-mangled) are in this family's blocks."""
        return self.score(module_names)[1] > 0

    def score(self, module_names) -> tuple[int, int]:
        """``(names the table knows, names in one of its blocks)`` among ``module_names`` (Kohya-mangled)."""
        known = sum(1 for name in module_names if self.targets(name) is not None)
        in_blocks = sum(1 for name in module_names if any(p.match(name) for p, _, _ in self._blocks))
        return known, in_blocks

    def targets(self, name: str) -> Target | None:
        """The `Target` of an original module name, with full diffusers paths, or None."""
        for pattern, prefix, table in self._blocks:
            match = pattern.match(name)
            if match is not None:
                target = table.get(match.group(2))
                return None if target is None else target.under(prefix.replace("{i}", match.group(1)))
        return self._modules.get(name)

    def convert_module(self, name: str, delta) -> tuple[list[tuple[str, object]], str | None]:
        """``([(diffusers path, delta)], None)`` for one original-named module, or ``([], why)``."""
        target = self.targets(name)
        if target is None and self.keep_unknown:
            return [(name, delta)], None
        if target is None:
            return [], f"'{name}' is no {self.name} module lora_loader knows ({self.hint})"
        swap = target.swap == ALWAYS or (target.swap == IF_TWO_HALVES and _two_halves(delta))
        return split_module(delta, target, swap)

    def original_name(self, path: str) -> tuple[str, int] | None:
        """``(original name, part)`` of a diffusers module path (``part``: its place in a fused projection), or None."""
        if self._back is None:
            object.__setattr__(self, "_back", self._inverse())
        blocks, modules = self._back
        if path in modules:
            return modules[path]
        for pattern, original, table in blocks:
            match = pattern.match(path)
            if match is not None and match.group(2) in table:
                suffix, part = table[match.group(2)]
                return original.replace("{i}", match.group(1)) + suffix, part
        return None

    def _inverse(self):
        modules = {p: (name, part) for name, t in self._modules.items() for part, p in enumerate(t.paths)}
        blocks = []
        for spec, (_, prefix, table) in zip(self.blocks, self._blocks):
            head, _, tail = prefix.partition("{i}")
            pattern = re.compile(rf"^{re.escape(head)}(\d+){re.escape(tail)}(.+)$")
            back = {p: (suffix, part) for suffix, t in table.items() for part, p in enumerate(t.paths)}
            blocks.append((pattern, spec.original, back))
        return blocks, modules


def _two_halves(delta) -> bool:
    """A modulation with (shift, scale) only: two output rows per input feature."""
    if isinstance(delta, LoraDelta):
        rows, features = delta.up.shape[0], delta.down.shape[1]
    else:
        shape = delta.dense_shape()
        if shape is None:
            return False
        rows, features = shape[0], shape[1]
    return rows == 2 * features


def split_module(delta, target: Target, swap: bool) -> tuple[list[tuple[str, object]], str | None]:
    """One original module's delta onto ``target``'s diffusers module(s), its output halves swapped when ``swap``."""
    if isinstance(delta, LoraDelta):
        return _split_lora(target, delta, swap)
    if not target.fused and not swap:
        return [(target.paths[0], delta)], None
    shape = delta.dense_shape()
    if shape is None:
        return [], f"its {delta.kind} factors do not multiply out to one weight"
    total = shape[0]
    if swap:
        ranges = [((total // 2, total), (0, total // 2))]
    else:
        sizes = target.sizes(total)
        if sizes is None:
            return [], f"its weight has {total} rows, which do not split into the {len(target.paths)} fused projections"
        bounds = [0] + list(itertools.accumulate(sizes))
        ranges = [((a, b),) for a, b in zip(bounds, bounds[1:])]
    dora = delta.dora_scale
    if dora is not None and not dora_on_output(dora, shape):
        return [], "a DoRA scale on the input axis of a fused projection spans all its parts and cannot be split"
    out = []
    for path, rows in zip(target.paths, ranges):
        part_dora = take_rows(dora, rows)
        if delta.kind == "full":  # diff and diff_b are row-indexed already: cut them, nothing to share
            factors = {k: take_rows(v, rows) for k, v in delta.factors.items()}
            out.append((path, dataclasses.replace(delta, factors=factors, dora_scale=part_dora)))
        else:
            out.append((path, dataclasses.replace(delta, rows=rows, dora_scale=part_dora)))
    return out, None


def _swap_halves(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None:
        return None
    shift, scale = tensor.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


# A LoRA's tensors indexed by output row: they follow the rows of ``up`` when a module is split or swapped.
_ROW_FIELDS = ("up", "up_bias", "magnitude", "bias")


def _split_lora(target: Target, delta: LoraDelta, swap: bool):
    """``up`` (and ``lora_B.bias``, a DoRA magnitude, a trained bias: all indexed by output row) cut into the
    parts' rows, ``down`` shared; everything else (alpha, rsLoRA, dropout) kept."""
    rows = delta.up.shape[0]
    for name in _ROW_FIELDS[1:]:
        tensor = getattr(delta, name)
        if tensor is not None and (tensor.dim() != 1 or tensor.shape[0] != rows):
            return [], f"its {name} is {list(tensor.shape)}, expected one value per row of lora_B ([{rows}])"
    per_row = {name: getattr(delta, name) for name in _ROW_FIELDS if getattr(delta, name) is not None}
    if swap:
        per_row = {name: _swap_halves(tensor) for name, tensor in per_row.items()}
    if not target.fused:
        return [(target.paths[0], dataclasses.replace(delta, **per_row))], None
    sizes = target.sizes(rows)
    if sizes is None:
        return [], f"lora_up has {rows} rows, which do not split into the {len(target.paths)} fused projections"
    pieces = {name: tensor.split(sizes, dim=0) for name, tensor in per_row.items()}
    out = [(path, dataclasses.replace(delta, **{name: parts[i] for name, parts in pieces.items()}))
           for i, path in enumerate(target.paths)]
    return out, None
