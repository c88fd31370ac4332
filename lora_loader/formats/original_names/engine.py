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
  rows. A swapped module's ``B`` rows (or its dense rows) trade halves. A fused projection whose
  rows interleave per head (``interleaved``: head 0's q, k, v rows, then head 1's, ...) gives
  each part its rows head by head, the same way.
- `Family.original_name`: the way back, a diffusers path to its original name (and its
  part of a fused projection), for writing files in original names.
- A module may live in another pipeline component than the file's denoiser (``component``:
  LTX-2's text connectors sit in the checkpoint's diffusion model, in diffusers' ``connectors``),
  and a family whose checkpoint keeps most of diffusers' own names (LTX) says which names alone
  make a file its own (``claim``), so a file in diffusers' names is never taken for it.

>>> fam = Family("Demo", hint="blocks_*", blocks=(Blocks("blocks_{i}_", "layers.{i}.", {"qkv": fused("q", "k", "v")}),))
>>> fam.targets("blocks_2_qkv").paths
('layers.2.q', 'layers.2.k', 'layers.2.v')
>>> fam.original_name("layers.2.k")
('blocks_2_qkv', 1)

``aliases`` are other spellings of the same modules (ComfyUI's own names, another trainer's):
read like ``modules``, never written back (the way back names the canonical original).

>>> spelled = Family("Demo", hint="blocks_*", blocks=(Blocks("blocks_{i}_", "layers.{i}.", {"mlp_fc1": "ff.0"},
...                  aliases={"mlp_0": "ff.0"}),))
>>> spelled.targets("blocks_3_mlp_0").paths, spelled.original_name("layers.3.ff.0")
(('layers.3.ff.0',), ('blocks_3_mlp_fc1', 0))

>>> two = Family("Two", hint="blocks_*", blocks=(Blocks("text_blocks_{i}_", "blocks.{i}.", {"q": "to_q"}, component="text"),),
...              modules={"patchify": "proj_in"}, claim=(r"patchify$", r"text_blocks_"))
>>> two.targets("text_blocks_1_q").component, two.targets("patchify").component is None
('text', True)
>>> two.score(["patchify", "proj_out"]), Family("Plain", hint="", blocks=fam.blocks).score(["blocks_0_qkv", "x"])
((1, 1), (1, 1))
>>> Family("Typo", hint="", modules={"norm_linear": "norm.linear"}, prefix_aliases={"norm_norm_": "norm_"}).targets("norm_norm_linear").paths
('norm.linear',)
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
    in diffusers. ``component`` names the pipeline component the paths are in when that is
    not the file's denoiser (None: the component the file's key gave). ``head_dim`` set: the parts'
    rows interleave per head, ``head_dim`` rows of each part in turn for head 0, then for head 1, ...
    (equal parts); ``interleaved_if`` (a regex, ``re.search``) limits that to a module whose file keys
    match it, for a producer that keeps the checkpoint's interleaved rows where the others reorder them.
    """

    paths: tuple[str, ...]
    ratios: tuple[int, ...] | None = None
    counts: tuple[int, ...] | None = None
    swap: str | None = None
    component: str | None = None
    head_dim: int | None = None
    interleaved_if: str | None = None

    def __post_init__(self):
        if self.swap not in (None, ALWAYS, IF_TWO_HALVES):
            raise ValueError(f"swap={self.swap!r}; expected None, {ALWAYS!r} or {IF_TWO_HALVES!r}")
        if self.swap and len(self.paths) != 1:
            raise ValueError("a swapped module is one module, not a fused projection")
        for split in (self.ratios, self.counts):
            if split is not None and len(split) != len(self.paths):
                raise ValueError(f"{split} gives {len(split)} parts for {len(self.paths)} paths")
        if self.head_dim is not None and (not self.fused or self.ratios or self.counts or self.head_dim < 1):
            raise ValueError("an interleaved projection is a fused one in equal parts, with a head_dim of 1 or more")

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

    def row_ranges(self, rows: int) -> list[tuple[tuple[int, int], ...]] | None:
        """Each part's rows of a fused output of ``rows`` rows, as ``[start, stop)`` ranges in order, or None
        if it does not split so: one range per part, or with ``head_dim`` one per head.

        >>> fused("q", "k").row_ranges(4)
        [((0, 2),), ((2, 4),)]
        >>> interleaved("q", "k", head_dim=1).row_ranges(4)
        [((0, 1), (2, 3)), ((1, 2), (3, 4))]
        """
        sizes = self.sizes(rows)
        if sizes is None:
            return None
        if self.head_dim is None:
            bounds = [0] + list(itertools.accumulate(sizes))
            return [((a, b),) for a, b in zip(bounds, bounds[1:])]
        group = len(self.paths) * self.head_dim  # one head's rows of every part
        if rows % group:
            return None
        heads = range(rows // group)
        return [
            tuple((h * group + part * self.head_dim, h * group + (part + 1) * self.head_dim) for h in heads)
            for part in range(len(self.paths))
        ]

    def for_keys(self, keys) -> Target:
        """This target for a module with these file keys: not interleaved when ``interleaved_if`` matches none."""
        if self.head_dim is None or self.interleaved_if is None:
            return self
        if any(re.search(self.interleaved_if, key) for key in keys):
            return self
        return dataclasses.replace(self, head_dim=None, interleaved_if=None)

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


def interleaved(*paths: str, head_dim: int, only_if: str | None = None) -> Target:
    """A fused projection in equal parts whose rows interleave per head (``[q0 k0 v0 q1 k1 v1 ...]``, each
    ``head_dim`` rows), in files whose keys match the regex ``only_if`` (None: always).

    >>> interleaved("to_q", "to_k", "to_v", head_dim=2).row_ranges(12)[1]
    ((2, 4), (8, 10))
    """
    return Target(tuple(paths), head_dim=head_dim, interleaved_if=only_if)


def swapped(path: str, when: str = ALWAYS) -> Target:
    """A modulation whose ``(shift, scale)`` halves are ``(scale, shift)`` in diffusers."""
    return Target((path,), swap=when)


def _target(spec: str | tuple[str, ...] | Target) -> Target:
    if isinstance(spec, Target):
        return spec
    return Target((spec,)) if isinstance(spec, str) else Target(tuple(spec))


def _in_component(target: Target, component: str | None) -> Target:
    """``target`` in a block group's ``component``, unless it names its own."""
    return target if component is None or target.component is not None else dataclasses.replace(target, component=component)


@dataclass(frozen=True)
class Blocks:
    """Repeated blocks: original names ``original`` + suffix, diffusers paths ``diffusers`` + path; ``{i}``
    is the block index in both. ``modules`` maps each suffix to a path, a tuple of paths (a fused
    projection in equal parts) or a `Target`; ``aliases`` the same for other spellings of those
    modules, which are read but never written; ``component`` is the pipeline component of all of them
    when not the file's denoiser (see `Target`)."""

    original: str
    diffusers: str
    modules: dict
    aliases: dict = field(default_factory=dict)
    component: str | None = None


@dataclass(frozen=True)
class Family:
    """One model family's original names: `Blocks` and top-level ``modules`` (original name -> target).
    ``hint`` names a few originals for the message about a module the table lacks; ``aliases`` are
    other spellings of top-level modules (read, never written); ``key``, ``detect`` and
    ``header_hints`` tell ``lora-loader inspect`` the family. With ``keep_unknown``, a name
    the table lacks is not refused but kept as the file spells it, for the live model's names to resolve:
    for a family whose original and diffusers names share their block prefix (Wan's ``blocks_N_``), so a
    Kohya file in diffusers' names (``blocks_0_attn1_to_q``) still loads.

    >>> fam = Family("Demo", hint="blocks_*", blocks=(Blocks("blocks_{i}_", "layers.{i}.", {"q": "to_q"}),), keep_unknown=True)
    >>> delta = LoraDelta(torch.ones(1, 2), torch.ones(2, 1))
    >>> [path for path, _ in fam.convert_module("blocks_0_q", delta)[0]], [path for path, _ in fam.convert_module("blocks_0_to_k", delta)[0]]
    (['layers.0.to_q'], ['blocks_0_to_k'])
    """

    name: str
    hint: str
    blocks: tuple[Blocks, ...] = ()
    modules: dict = field(default_factory=dict)
    aliases: dict = field(default_factory=dict)
    # For `families.detect_family` (``lora-loader inspect``): the family's id, regexes (``re.search``) over a
    # file's denoiser module paths in diffusers' names with dots as underscores that only this family has,
    # and substrings of a producer's header (``ss_base_model_version``, ``modelspec.architecture``) naming it.
    key: str = ""
    detect: tuple[str, ...] = ()
    header_hints: tuple[str, ...] = ()
    # The diffusers model classes whose modules the table names: `save_lora_weights(format="kohya")` writes
    # an adapter on one of them in the original names (`writer.to_original`), as the family's trainers do.
    model_classes: tuple[str, ...] = ()
    # Regexes (``re.match``) over Kohya-mangled original names that alone make a file this family's; empty:
    # any name in one of its blocks does. For a family whose checkpoint keeps most of diffusers' own names
    # (LTX): its blocks list those names too, but only the names diffusers renamed claim a file.
    claim: tuple[str, ...] = ()
    # Other spellings producers write for some original names, as ``{prefix: the original's prefix}`` (ai-toolkit's
    # LTX-2.3 writes ``audio_prompt_adaln_single_single_*``): read, never written back.
    prefix_aliases: dict = field(default_factory=dict)
    # Regexes of the same kind that rule the family out when any name matches (names ``detect`` shares with
    # another family that has these too: CogVideoX's attn1-only blocks, LTX-Video's attn1 + attn2).
    detect_unless: tuple[str, ...] = ()
    # diffusers reads this family's network alpha from a numeric ``alpha`` entry of the safetensors header
    # when the file has no alpha tensors and no ``lora_adapter_metadata`` (MiniMax-H3's LightX2V files).
    metadata_alpha: bool = False
    keep_unknown: bool = False
    # For ``lora-loader inspect``: a file whose own keys are this table's original names (most of them, no other
    # table's as much) is this family's, before any rule over diffusers' names, which are another family's too
    # (Anima's DiT is Cosmos-Predict2's: ``blocks.0.cross_attn.k_proj`` is Anima's, ``attn2.to_k`` anyone's).
    detect_original: bool = False
    # ``(regex, rows per input feature)`` (``re.search`` over Kohya-mangled original names; an int, or ``(rows, features)``):
    # the output / input width ratio of a module whose widths tell this family from another with the same names
    # (Flux.1's and Flux.2's ``single_blocks_N_linear1``): a module whose widths are one family's ratio and not
    # another's rules the other out (widths that are no family's ratio decide nothing: `original_names.families_of`).
    shapes: tuple = ()
    # For `families.detect_family` too: ``(regex, input widths)`` pairs (``re.search`` over the same diffusers names as
    # ``detect``): a module whose name matches and whose input width is one of them names the family as ``detect`` does,
    # for names it shares with another family whose widths differ (SANA's attention is LTX-Video's names at 1152 / 2240).
    detect_widths: tuple = ()

    def __post_init__(self):
        compiled = []
        for blocks in self.blocks:
            _no_shadowing(blocks.modules, blocks.aliases, blocks.original)
            head, _, tail = blocks.original.partition("{i}")
            pattern = re.compile(rf"^{re.escape(head)}(\d+){re.escape(tail)}(.+)$")
            table = {suffix: _in_component(_target(spec), blocks.component) for suffix, spec in (blocks.modules | blocks.aliases).items()}
            compiled.append((pattern, blocks.diffusers, table))
        _no_shadowing(self.modules, self.aliases, "")
        object.__setattr__(self, "_blocks", tuple(compiled))
        object.__setattr__(self, "_modules", {name: _target(spec) for name, spec in (self.modules | self.aliases).items()})
        object.__setattr__(self, "_claim", tuple(re.compile(p) for p in self.claim))
        object.__setattr__(self, "_back", None)
        object.__setattr__(self, "_cache", {})

    def fits(self, name: str, delta) -> bool | None:
        """Whether ``delta``'s output / input widths are those ``shapes`` gives ``name``; None: no rule, or unknown widths.

        >>> fam = Family("Demo", hint="", modules={"linear1": "proj"}, shapes=((r"linear1$", 7),))
        >>> fam.fits("linear1", LoraDelta(torch.ones(1, 2), torch.ones(14, 1))), fam.fits("linear1", LoraDelta(torch.ones(1, 2), torch.ones(18, 1)))
        (True, False)
        """
        if not self.shapes:
            return None
        widths = _out_in(delta)
        if widths is None:
            return None
        for pattern, ratio in self.shapes:
            if re.search(pattern, name):
                rows, features = ratio if isinstance(ratio, tuple) else (ratio, 1)
                return widths[0] * features == widths[1] * rows
        return None

    def detected_by_width(self, name: str, in_features: int | None) -> bool:
        """Whether a module of this name and input width names this family (``detect_widths``).

        >>> fam = Family("Demo", hint="", detect_widths=((r"_attn1_to_q$", (1152, 2240)),))
        >>> fam.detected_by_width("blocks_0_attn1_to_q", 2240), fam.detected_by_width("blocks_0_attn1_to_q", 2048)
        (True, False)
        """
        return in_features is not None and any(re.search(p, name) and in_features in widths for p, widths in self.detect_widths)

    def claims(self, module_names) -> bool:
        """True when some of a file's denoiser names (Kohya-mangled) make it this family's (see `score`)."""
        return self.score(module_names)[1] > 0

    def score(self, module_names) -> tuple[int, int]:
        """``(names the table knows, names that claim the file)`` among ``module_names`` (Kohya-mangled): a name
        claims it when it matches one of ``claim``, or without ``claim``, when it is in one of the blocks."""
        known = claiming = 0
        for name in module_names:
            target, claims = self._read(name)
            known += target is not None
            claiming += claims
        return known, claiming

    def _read(self, name: str) -> tuple[Target | None, bool]:
        """``(targets(name), whether name claims a file)``, remembered: every load asks every family of every
        name (a causal LM adapter's 154 names x 17 tables of regexes was most of its conversion time)."""
        cache = self._cache
        if name not in cache:
            if len(cache) > 100_000:  # names come from files: bounded in practice, but never unbounded
                cache.clear()
            patterns = self._claim or [p for p, _, _ in self._blocks]
            cache[name] = (self._targets(name), any(p.match(name) for p in patterns))
        return cache[name]

    def targets(self, name: str) -> Target | None:
        """The `Target` of an original module name, with full diffusers paths, or None."""
        return self._read(name)[0]

    def _targets(self, name: str) -> Target | None:
        wrong = next((w for w in self.prefix_aliases if name.startswith(w)), None)
        if wrong is not None:
            name = self.prefix_aliases[wrong] + name[len(wrong):]
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
        return split_module(delta, target.for_keys(delta.keys), swap)

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
        """The way back, from the canonical names only (``modules``; aliases are never written)."""
        modules = {p: (name, part) for name, spec in self.modules.items() for part, p in enumerate(_target(spec).paths)}
        blocks = []
        for spec in self.blocks:
            head, _, tail = spec.diffusers.partition("{i}")
            pattern = re.compile(rf"^{re.escape(head)}(\d+){re.escape(tail)}(.+)$")
            back = {p: (suffix, part) for suffix, t in spec.modules.items() for part, p in enumerate(_target(t).paths)}
            blocks.append((pattern, spec.original, back))
        return blocks, modules


def _no_shadowing(modules: dict, aliases: dict, where: str) -> None:
    """An alias is another spelling: one that is also a canonical name would hide which one a table means."""
    both = sorted(set(modules) & set(aliases))
    if both:
        raise ValueError(f"{where or 'top-level'} names {both} both as modules and as aliases")


def _out_in(delta) -> tuple[int, int] | None:
    """``(output, input)`` width of the module a delta targets, or None when its factors do not say."""
    if isinstance(delta, LoraDelta):
        return (delta.up.shape[0], delta.down.shape[1]) if delta.up.dim() >= 2 and delta.down.dim() >= 2 else None
    shape = delta.dense_shape() if hasattr(delta, "dense_shape") else None
    return (shape[0], shape[1]) if shape is not None and len(shape) >= 2 else None


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
        ranges = target.row_ranges(total)
        if ranges is None:
            parts = f"the {len(target.paths)} fused projections{_heads(target)}"
            return [], f"its weight has {total} rows, which do not split into {parts}"
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
    ranges = target.row_ranges(rows)
    if ranges is None:
        return [], f"lora_up has {rows} rows, which do not split into the {len(target.paths)} fused projections{_heads(target)}"
    out = [(path, dataclasses.replace(delta, **{name: take_rows(tensor, part) for name, tensor in per_row.items()}))
           for path, part in zip(target.paths, ranges)]
    return out, None


def _heads(target: Target) -> str:
    return "" if target.head_dim is None else f" of interleaved {target.head_dim}-row heads"
