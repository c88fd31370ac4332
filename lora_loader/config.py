"""`LoraConfig`: PEFT's field names and defaults, read from and written to ``adapter_config.json``.

Fields lora_loader does not use are kept on a round trip (in ``extra``), and a
field that changes the math which lora_loader does not implement is a
`LoraError`, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import LoraError, LoraFileError, LoraFormatError

ADAPTER_CONFIG = "adapter_config.json"

# Fields that would change the adapter's math if set; lora_loader implements none of them.
_UNSUPPORTED_WHEN_SET = {
    "use_qalora": "QA-LoRA",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
    "megatron_config": "Megatron parallel layers",
    "loftq_config": "LoftQ initialisation",
    "eva_config": "EVA initialisation",
    "corda_config": "CorDA initialisation",
    "use_bdlora": "BD-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "arrow_config": "Arrow routing",
    "lora_ga_config": "LoRA-GA initialisation",
    "velora_config": "VeLoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
}
# What PEFT's ParamWrapper (LoRA on an nn.Parameter, target_parameters) refuses, with the field that asks for it.
_NOT_WITH_TARGET_PARAMETERS = {
    "use_dora": "DoRA",
    "lora_bias": "a lora_B bias",
    "fan_in_fan_out": "fan_in_fan_out",
    "lora_dropout": "dropout (the input cannot be factored out of a changed weight)",
}
# init_lora_weights values lora_loader can create (loading ignores init: the tensors come from the file).
_INITS = (True, False, "gaussian")


@dataclass
class LoraConfig:
    """PEFT's ``LoraConfig`` fields and defaults (the ones that shape a plain LoRA, plus the rest kept verbatim).

    >>> cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    >>> LoraConfig.from_dict(cfg.to_dict()) == cfg
    True
    """

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: int | float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, int | float] = field(default_factory=dict)
    use_dora: bool = False
    task_type: str | None = None
    peft_type: str = "LORA"
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    lora_bias: bool = False  # PEFT's lora_B.bias: part of the LoRA's output, scaled with it
    # LoRA on nn.Parameters by name (MoE experts' "mlp.experts.gate_up_proj"): see param_layer.py.
    target_parameters: list | None = None
    # PEFT fields lora_loader does not implement: accepted (so PEFT configs construct unchanged) and refused
    # by check_supported when set to anything but their default.
    use_qalora: bool = False
    qalora_group_size: int = 16
    layer_replication: list | None = None
    trainable_token_indices: list | dict | None = None
    megatron_config: dict | None = None
    megatron_core: str | None = "megatron.core"
    loftq_config: dict = field(default_factory=dict)
    eva_config: dict | None = None
    corda_config: dict | None = None
    # Every other field of adapter_config.json, written back unchanged.
    extra: dict[str, Any] = field(default_factory=dict)

    # -- (de)serialisation -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, source: str = "adapter config") -> LoraConfig:
        if not isinstance(data, dict):
            raise LoraError(f"{source}: expected a JSON object of PEFT's LoraConfig fields, got a {type(data).__name__}: {data!r:.80}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = data.get("extra", {})
        if not isinstance(extra, dict):
            raise LoraError(f"{source}: 'extra' must be a JSON object, got {extra!r:.80}")
        extra = dict(extra)
        extra.update({k: v for k, v in data.items() if k not in names and k != "extra"})
        config = cls(**known, extra=extra)
        config.check_supported(source)
        return config

    @classmethod
    def from_pretrained(cls, folder: str) -> LoraConfig:
        path = os.path.join(folder, ADAPTER_CONFIG)
        return cls.from_dict(read_adapter_config(path), path)

    @classmethod
    def from_deltas(cls, deltas: Mapping[str, Any], who: str = "an adapter", **fields) -> LoraConfig:
        """A config that reproduces each module's rank, alpha and scaling rule (`fields_from_deltas`, patterns
        escaped as regexes), plus ``fields``.

        >>> from lora_loader.delta import LoraDelta
        >>> import torch
        >>> LoraConfig.from_deltas({"a.b": LoraDelta(torch.ones(2, 4), torch.ones(4, 2), 4.0)}).lora_alpha
        4
        """
        return cls(**fields_from_deltas(deltas, escape=True, who=who), **fields)

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if isinstance(data["target_modules"], (set, tuple)):
            data["target_modules"] = sorted(data["target_modules"])
        data.update(self.extra)
        return data

    def save_pretrained(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    # -- checks ----------------------------------------------------------------------------------------
    def check_supported(self, source: str = "adapter config") -> None:
        """Raise for anything that would change the math and that lora_loader does not implement."""
        if str(self.peft_type).upper() != "LORA":
            raise LoraError(f"{source}: peft_type is {self.peft_type!r}; lora_loader reads LoRA adapters (peft_type 'LORA')")
        for name, what in _UNSUPPORTED_WHEN_SET.items():
            value = getattr(self, name, None) if hasattr(self, name) else self.extra.get(name)
            if value not in (None, False, [], {}, 0):
                raise LoraError(f"{source}: {name}={value!r} asks for {what}, which lora_loader does not implement")
        if self.bias not in ("none", "all", "lora_only"):
            raise LoraError(f"{source}: bias={self.bias!r}; expected 'none', 'all' or 'lora_only'")
        self.check_fields(source)
        if self.target_parameters:
            for name, what in _NOT_WITH_TARGET_PARAMETERS.items():
                if getattr(self, name):
                    raise LoraError(
                        f"{source}: {name}={getattr(self, name)!r} with target_parameters asks for {what} on a LoRA of "
                        "an nn.Parameter, which PEFT does not define either"
                    )

    def check_fields(self, source: str = "adapter config") -> None:
        """Each field that shapes the math has PEFT's type; a value of another type is a `LoraError` naming
        the field, never a bare Python error later (``float("abc")``) nor a silent misreading."""

        def bad(name: str, expected: str):
            return LoraError(f"{source}: {name}={getattr(self, name)!r:.80}; expected {expected}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def is_names(v) -> bool:
            return isinstance(v, (list, tuple, set)) and all(isinstance(x, str) for x in v)

        if not is_int(self.r) or self.r < 0:
            raise bad("r", "a positive int (the rank)")
        if not is_number(self.lora_alpha):
            raise bad("lora_alpha", "a finite number")
        if not is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise bad("lora_dropout", "a number in [0, 1)")
        for name in ("use_rslora", "use_dora", "fan_in_fan_out", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str) and not is_names(value):
                raise bad(name, "null, a regex string, or a list of module-name suffixes")
            if isinstance(value, str) and value != "all-linear":
                _check_regex(value, f"{source}: {name}")
        if self.target_parameters is not None and not is_names(self.target_parameters):
            raise bad("target_parameters", "null or a list of parameter names ('mlp.experts.gate_up_proj')")
        if not isinstance(self.lora_bias, bool):
            raise bad("lora_bias", "true or false")
        if self.modules_to_save is not None and not is_names(self.modules_to_save):
            raise bad("modules_to_save", "null or a list of module names")
        if self.layers_to_transform is not None and not is_int(self.layers_to_transform) and not (
            isinstance(self.layers_to_transform, (list, tuple)) and all(is_int(x) for x in self.layers_to_transform)
        ):
            raise bad("layers_to_transform", "null, an int or a list of ints")
        if self.layers_pattern is not None and not isinstance(self.layers_pattern, str) and not is_names(self.layers_pattern):
            raise bad("layers_pattern", "null, a string or a list of strings")
        for name, valid, what in (
            ("rank_pattern", lambda v: is_int(v) and v > 0, "positive ints"),
            ("alpha_pattern", is_number, "finite numbers"),
        ):
            patterns = getattr(self, name)
            if not isinstance(patterns, dict):
                raise bad(name, f"a JSON object mapping module-name patterns to {what}")
            for pattern, value in patterns.items():
                if not isinstance(pattern, str) or not valid(value):
                    raise LoraError(f"{source}: {name}[{pattern!r}]={value!r}; expected {what}")
                _check_regex(pattern, f"{source}: {name}[{pattern!r}]")

    def check_creatable(self) -> None:
        """What `add_adapter` needs on top of `check_supported`: an initialisation we implement."""
        if self.init_lora_weights not in _INITS:
            raise LoraError(
                f"init_lora_weights={self.init_lora_weights!r} is not implemented; use True (PEFT's default), "
                "False or 'gaussian'"
            )
        if self.r <= 0:
            raise LoraError(f"r must be a positive integer, got {self.r}")
        if self.lora_bias and self.use_dora:
            raise LoraError("lora_bias=True with use_dora=True: a lora_B bias on a DoRA adapter is not implemented")

    # -- per-module values, with PEFT's pattern rules ------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        key = pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else int(self.r)

    def alpha_for(self, module_name: str) -> float:
        key = pattern_key(self.alpha_pattern, module_name)
        return float(self.alpha_pattern[key]) if key is not None else float(self.lora_alpha)


_dataclass_init = LoraConfig.__init__


def _init(self, **fields) -> None:
    """Like PEFT's LoraConfig, take every PEFT field by keyword; those without a place here go to ``extra``."""
    names = {f.name for f in dataclasses.fields(LoraConfig)}
    extra = dict(fields.pop("extra", None) or {})
    extra.update({k: fields.pop(k) for k in list(fields) if k not in names})
    _dataclass_init(self, **fields, extra=extra)


_init.__signature__ = __import__("inspect").signature(_dataclass_init)
LoraConfig.__init__ = _init


def _check_regex(pattern: str, what: str) -> None:
    try:
        re.compile(rf"(.*\.)?({pattern})$")
    except re.error as err:
        raise LoraError(f"{what}: {pattern!r} is not a valid regular expression ({err})") from None


def pattern_key(patterns, module_name: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of the module name."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return pattern
    return None


def lycoris_peft_config(config: dict | None, keys, source: str) -> bool:
    """Whether ``config`` is PEFT's config of a LoKr / LoHa adapter whose file keys name their algorithm
    (diffusion-pipe saves one beside its ``lokr_*`` keys), and so says nothing more: its scale ``alpha / r``
    must be 1, what those keys mean without an ``alpha``; any other alpha would be lost (a `LoraFormatError`).
    Beside LoRA keys such a config stays, and is refused where it is read.

    >>> lycoris_peft_config({"peft_type": "LOKR", "r": 8, "alpha": 8}, ["x.lokr_w1", "x.lokr_w2"], "adapter_config.json")
    True
    """
    kind = str((config or {}).get("peft_type", "")).upper()
    factor = {"LOKR": ".lokr_", "LOHA": ".hada_"}.get(kind)
    if factor is None or not any(factor in k for k in keys) or any(".lora_" in k for k in keys):
        return False
    r, alpha = config.get("r", 8), config.get("alpha", config.get("r", 8))
    if not isinstance(r, (int, float)) or not isinstance(alpha, (int, float)) or alpha != r:
        raise LoraFormatError(
            f"{source}: a PEFT {config.get('peft_type')} config with alpha={alpha!r}, r={r!r}; lora_loader reads LoKr / LoHa "
            "keys with their own .alpha (alpha = rank without one): add .alpha tensors to the file"
        )
    return True


def read_adapter_config(path: str) -> dict:
    """The JSON object in a PEFT ``adapter_config.json``; a `LoraFileError` if it is unreadable or not an object.
    Its fields are checked where they are used (`LoraConfig.from_dict`)."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise LoraFileError(f"{path}: not a valid adapter_config.json ({type(err).__name__}: {err})") from None
    if not isinstance(config, dict):
        raise LoraFileError(f"{path}: an adapter_config.json holds a JSON object of PEFT's LoraConfig fields, got a {type(config).__name__}")
    return config


def _number(value):
    return int(value) if float(value).is_integer() else value


def fields_from_deltas(deltas: Mapping[str, Any], escape: bool = False, who: str = "an adapter") -> dict:
    """PEFT config fields that reproduce per-module rank and alpha: the most common ``r`` / ``lora_alpha``,
    ``rank_pattern`` / ``alpha_pattern`` for the rest (module paths as patterns, ``re.escape``d when ``escape``),
    ``target_modules``, ``use_rslora`` and ``use_dora``.

    ``deltas`` maps module paths to anything with ``rank``, ``alpha`` (None: alpha = rank), ``use_rslora`` and
    ``magnitude`` (a `LoraDelta`, a loaded adapter layer). Mixed rsLoRA and plain scaling is a `LoraError`
    naming ``who``.

    >>> from lora_loader.delta import LoraDelta
    >>> import torch
    >>> d = {"a": LoraDelta(torch.ones(2, 4), torch.ones(4, 2), 2.0), "b": LoraDelta(torch.ones(4, 4), torch.ones(4, 4))}
    >>> f = fields_from_deltas(d)
    >>> f["r"], f["lora_alpha"], f["rank_pattern"], f["alpha_pattern"]
    (2, 2, {'b': 4}, {'b': 4})
    """
    ranks = {p: d.rank for p, d in deltas.items()}
    alphas = {p: float(d.rank if d.alpha is None else d.alpha) for p, d in deltas.items()}
    rslora = {bool(d.use_rslora) for d in deltas.values()}
    if len(rslora) > 1:
        raise LoraError(f"{who} mixes rsLoRA and plain scaling, which one PEFT config cannot express")
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8  # 8: PEFT's defaults
    alpha = Counter(alphas.values()).most_common(1)[0][0] if alphas else 8
    name = re.escape if escape else str
    return {
        "r": r,
        "lora_alpha": _number(alpha),
        "rank_pattern": {name(p): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {name(p): _number(v) for p, v in alphas.items() if v != alpha},
        "target_modules": sorted(deltas),
        "use_rslora": bool(rslora and rslora.pop()),
        "use_dora": any(getattr(d, "magnitude", None) is not None for d in deltas.values()),
    }
