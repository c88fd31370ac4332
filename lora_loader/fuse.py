"""Fusing: the current blend written into the base weights, and undone bit for bit.

`fuse` computes ``W + delta`` in fp32 with one ``addmm`` per layer and gives
the parameter that new tensor; the original tensor object is kept, not a copy of
it, so `unfuse` is an exact, O(1) swap back (diffusers+peft subtract a
recomputed delta instead, which drifts in fp16/bf16). `disable_lora` on a
fused model swaps the original tensors in, `enable_lora` the fused ones:
nothing is recomputed at forward time. A fused layer moved or cast with the
model (``pipe.to("cuda")``, ``.half()``) converts the tensor it keeps aside too
(`follow_conversion`), so what unfuse restores is on the model's device and dtype.

A bitsandbytes 8-/4-bit layer is fused on its dequantized weight and the sum
quantized again (see `quantized`): lossy, like PEFT's merge, and still undone
exactly, since the original quantized parameter is what `unfuse` puts back.
A layer offloaded by accelerate has its fused weight written into its hook's
weights map instead (see `offload`).

Keeping the original tensors beside the fused ones doubles the targeted weights' memory
on the accelerator (20+ GB for Flux in bf16). ``fuse_lora(keep_originals=...)`` chooses
where the originals wait for `unfuse`: ``"device"`` (the tensors themselves, as above),
``"cpu"`` (a copy in CPU memory, page-locked when CUDA is available) or ``"disk"`` (a temporary
file); off the device, the fused weight is written into the parameter in place, so the
accelerator never holds more than one layer's temporary beside the model. ``"auto"``
(the default) keeps them on the device when its free memory holds the fused copies with a
margin, else in CPU memory, else on disk (`where_to_keep`). Unfuse copies the parked
values back: still bit-exact, and ``disable_lora`` / ``enable_lora`` of such a fused model
swap the values through the parking place (a copy per layer, not an O(1) swap).
"""

from __future__ import annotations

import ctypes
import tempfile
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from . import offload, quantized
from . import param_layer
from .algorithms import dora
from .algorithms.lora import low_rank_product
from .errors import LoraError
from .layers import FactorAdapter, LoraAdapter, LoraLayer, dense_base_weight, is_plain_lora, layer_type


def _base_dense(module: nn.Module) -> torch.Tensor:
    """The base weight as ``[out, in...]`` in fp32."""
    return dense_base_weight(module).detach().float()


def dense_delta(module: nn.Module, adapter: LoraAdapter, weight: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight delta in the base layout, bias delta or None)`` of one adapter at blend weight ``weight``, in fp32.
    A LoRA on parameters gives the changes of all its parameters, flattened and concatenated."""
    if isinstance(adapter, param_layer.ParamAdapter):
        changes = [(weight * p.scale * p.delta(torch.float32)).reshape(-1) for p in adapter.parts.values()]
        return torch.cat(changes), None
    if isinstance(adapter, FactorAdapter):
        return _factor_delta(module, adapter, weight)
    product = low_rank_product(adapter.up.detach().float(), adapter.down.detach().float())
    if adapter.magnitude is None:
        delta = weight * adapter.scale * product
    else:  # DoRA: rows of W + s*BA rescaled to the magnitude; weight w interpolates from W to that
        base = _base_dense(module)
        delta = weight * (dora.rescale(base + adapter.scale * product, adapter.magnitude.detach().float()) - base)
    if layer_type(module) in ("conv1d", "embedding"):
        delta = delta.T
    bias = None if adapter.bias_delta is None else weight * adapter.bias_delta.detach().float()
    if adapter.up_bias is not None:  # lora_B.bias, scaled like the LoRA
        up_bias = weight * adapter.scale * adapter.up_bias.detach().float()
        bias = up_bias if bias is None else bias + up_bias
    return delta, bias


def _factor_delta(module: nn.Module, adapter: FactorAdapter, weight: float):
    """A `FactorAdapter`'s ``weight * scale * dense`` (or its DoRA ``weight * (W_dora - W)``), base layout, fp32."""
    with torch.no_grad():
        dense = adapter.dense(torch.float32, module)
        if adapter.dora_scale is None:
            delta = None if dense is None else weight * adapter.scale * dense
        else:
            base = _base_dense(module)
            combined = base if dense is None else base + adapter.scale * dense
            delta = weight * (dora.lycoris_weight(combined, adapter.dora_scale.float()) - base)
        if delta is not None and layer_type(module) in ("conv1d", "embedding"):
            delta = delta.T
        bias = None if adapter.bias_delta is None else weight * adapter.bias_delta.detach().float()
    return delta, bias


def fuse_problem(module: LoraLayer, adapters) -> str | None:
    """Why ``adapters`` cannot be fused into ``module`` (checked for every layer before any is fused), or None."""
    if isinstance(module, param_layer.LoraParamMixin):
        return param_layer.fuse_problem(module)
    if getattr(module, "bias", None) is None and any(getattr(a, "up_bias", None) is not None for a, _ in adapters):
        return "it has no bias for the adapter's lora_B.bias to be fused into (it runs unfused as it is)"
    return None


def fuse_layer(module: LoraLayer, adapters: list[tuple[LoraAdapter, float]], keep: OriginalsKeeper | None = None) -> None:
    """Write ``sum(w * delta)`` into the module's weight (and bias); keep the original tensors to restore.

    The plain LoRA adapters of a layer are fused with one ``addmm`` in fp32 over
    their concatenated factors (``W + [w_i s_i B_i] @ [A_i]``; one adapter's own factors,
    ``w s`` as addmm's alpha): no dense delta in between,
    and no tensor allocated that the layer does not keep: an fp32 weight gets one new tensor
    (the original stays as it is), an fp16/bf16 one is fused in its fp32 upcast in place.
    DoRA adapters add their dense delta. A LoRA on parameters writes each adapted parameter
    (`param_layer.fuse_params`). Where ``keep`` parks the original weight off the device,
    the fused weight is written into the parameter in place.
    """
    if isinstance(module, param_layer.LoraParamMixin):
        param_layer.fuse_params(module, adapters)
        return
    is_quantized = quantized.is_quantized(module)
    parked = None
    if is_quantized:  # fused in fp32 on the dequantized weight, then quantized again (lossy, as PEFT's merge)
        original_weight = quantized.snapshot(module)
        base = quantized.dequantized_weight(module).float()
        owned = True  # the dequantized weight is a tensor of its own
    else:  # an offloaded layer (accelerate) holds meta tensors: its weights are in the hook's weights map
        original_weight = offload.real_tensor(module, "weight").data
        owned = original_weight.dtype != torch.float32  # its fp32 upcast is a new tensor, ours to write into
        base = original_weight.float() if owned else original_weight
        if keep is not None and not offload.is_offloaded(module) and keep.parks(original_weight):
            parked = keep.park(original_weight)
            owned = True  # the values are parked: the parameter is written in place
    fused = _fused_weight(module, base, adapters, in_place=owned and base.is_contiguous())
    bias_delta = None
    for adapter, w in adapters:
        if adapter.bias_delta is not None:
            b = w * adapter.bias_delta.detach().float()
            bias_delta = b if bias_delta is None else bias_delta + b
        if adapter.up_bias is not None:  # lora_B.bias, scaled like the LoRA (the planner saw the module has a bias)
            b = (w * adapter.scale) * adapter.up_bias.detach().float()
            bias_delta = b if bias_delta is None else bias_delta + b
    original_bias = fused_bias = None
    if bias_delta is not None:
        original_bias = offload.real_tensor(module, "bias").data
        fused_bias = (original_bias.float() + bias_delta.to(original_bias.device)).to(original_bias.dtype)
    if parked is not None:
        if fused.data_ptr() != original_weight.data_ptr():  # fused in an fp32 upcast (or out of place)
            original_weight.copy_(fused)  # the same rounding as ``fused.to(dtype)``
        del fused
        fusion = Fusion(base=(None, original_bias), fused=(None, fused_bias), shown_fused=True, parked=parked)
        module.set_lora_fusion(fusion)
        if fused_bias is not None:
            module.bias.data = fused_bias
        return
    if is_quantized:
        fused_weight = quantized.quantized_like(module, fused)
    else:
        fused_weight = fused if fused.dtype == original_weight.dtype else fused.to(original_weight.dtype)
    fusion = Fusion(base=(original_weight, original_bias), fused=(fused_weight, fused_bias))
    if offload.is_offloaded(module):
        # Which originals the hook keeps in memory (restored as they are) rather than reads from disk (forgotten).
        fusion.in_memory = {name: offload.stored_here(module, name) for name in _own_tensors(module)}
    module.set_lora_fusion(fusion)
    show_fused(module, True)


def _fused_weight(module: nn.Module, base: torch.Tensor, adapters, in_place: bool) -> torch.Tensor:
    """``base + sum(w * delta)`` in fp32, ``base`` being the layer's weight in fp32: written into ``base``
    when ``in_place`` (a contiguous tensor the caller owns, or whose values it parked), else a new tensor."""
    # Every dense delta first: DoRA's reads the layer's weight, which an in-place write changes.
    dense = [dense_delta(module, a, w)[0] for a, w in adapters if type(a) is FactorAdapter or a.magnitude is not None]
    plain = [(a, w) for a, w in adapters if is_plain_lora(a)]
    if plain:
        if len(plain) == 1:  # the factors as they are, the scale as addmm's alpha: no copy of either
            (a, w), = plain
            up, down, alpha = a.up.detach().flatten(1).float(), a.down.detach().flatten(1).float(), w * a.scale
        else:
            up = torch.cat([a.up.detach().flatten(1).float() * (w * a.scale) for a, w in plain], dim=1)
            down = torch.cat([a.down.detach().flatten(1).float() for a, _ in plain], dim=0)
            alpha = 1.0
        up, down = up.to(base.device), down.to(base.device)
        if layer_type(module) in ("conv1d", "embedding"):  # weight stored [in, out]: W + (B A)^T = W + A^T B^T
            fused = base.addmm_(down.T, up.T, alpha=alpha) if in_place else torch.addmm(base, down.T, up.T, alpha=alpha)
        elif in_place:
            fused = base.view(base.shape[0], -1).addmm_(up, down, alpha=alpha).view(base.shape)
        else:
            fused = torch.addmm(base.reshape(base.shape[0], -1), up, down, alpha=alpha).view(base.shape)
    else:
        fused = base if in_place else base.clone()
    for d in dense:
        if d is not None:
            fused += d.to(fused.device).view(fused.shape)
    return fused


@dataclass
class Fusion:
    """What a fused layer keeps: its original and its fused ``(weight, bias)`` tensors, which one it shows,
    for a layer offloaded by accelerate which originals its hook holds in memory, and, where the weight
    not shown waits off the device (`Parked`), that place: ``base[0]`` and ``fused[0]`` are then None,
    the parameter holding the weight shown."""

    base: tuple
    fused: tuple
    shown_fused: bool = False
    in_memory: dict[str, bool] | None = None
    parked: Parked | None = None

    @property
    def kept(self) -> str:
        """Where the weight not shown is: ``"device"`` (beside the parameter), ``"cpu"`` or ``"disk"``."""
        return "device" if self.parked is None else self.parked.kept

    def follow_conversion(self, module: LoraLayer, fn) -> None:
        """After ``module._apply(fn)`` (``.to(device)``, ``.to(dtype)``, ``.half()``, ``.cuda()``), convert the
        tensor kept aside too, so a later swap (unfuse, disable) gives a tensor on the model's device and
        dtype. The original converted is exactly what converting the unfused model gives, so unfuse stays
        bit-exact, and the kept tensor leaves the old device with the model. A parked weight stays where
        it is and takes the new dtype only (the same rounding on any device)."""
        if self.in_memory is not None or isinstance(self.base[0], tuple):
            return  # offloaded: the hook's weights map holds both; quantized: bitsandbytes owns its state
        with torch.no_grad():
            kept, shown = (self.base, self.fused) if self.shown_fused else (self.fused, self.base)
            weight, bias = kept
            if self.parked is None:
                weight = fn(weight)
            elif not module.weight.is_meta and module.weight.dtype != self.parked.dtype:
                self.parked.cast(module.weight.dtype)
            kept = (weight, None if bias is None else fn(bias))
            shown = (None if self.parked is not None else module.weight.data, None if shown[1] is None else module.bias.data)
            self.base, self.fused = (kept, shown) if self.shown_fused else (shown, kept)


def _own_tensors(module: nn.Module) -> list[str]:
    """The fusable tensors the module has: ``weight``, and ``bias`` unless it is None."""
    return [name for name in ("weight", "bias") if getattr(module, name, None) is not None]


def show_fused(module: LoraLayer, fused: bool) -> None:
    """Point the parameters at the fused or at the original tensors (an O(1) swap; a copy per layer where
    the weight not shown is parked off the device)."""
    fusion = module.__dict__.get("_lora_fusion")
    if fusion is None:
        return
    if isinstance(fusion, param_layer.ParamFusion):
        fusion.show(module, fused)
        return
    if fusion.parked is not None:
        if not offload.is_offloaded(module):
            _show_parked(module, fusion, fused)
            return
        _unpark(module, fusion)  # offloaded after fusing: the hook's weights map holds the weight shown
    weight, bias = fusion.fused if fused else fusion.base
    fusion.shown_fused = fused
    if fusion.in_memory is None and offload.is_offloaded(module):
        # Offloaded after fusing: the hook's map holds what was shown then; both tensors are here, in memory.
        fusion.in_memory = {name: True for name in _own_tensors(module)}
    if fusion.in_memory is not None:  # offloaded: the hook loads what its weights map holds for each call
        for name, value in (("weight", weight), ("bias", bias)):
            if value is not None:
                offload.store(module, name, value if fused or fusion.in_memory[name] else None)
        return
    if isinstance(weight, tuple):  # a bitsandbytes parameter and its scales
        quantized.restore(module, weight)
    else:
        module.weight.data = weight
    if bias is not None:
        module.bias.data = bias


def _show_parked(module: LoraLayer, fusion: Fusion, fused: bool, last: bool = False) -> None:
    """Show the fused or the original weight of a layer whose other weight is parked: the two exchange
    places (the parameter written in place); with ``last`` (unfuse), the weight shown is not kept."""
    with torch.no_grad():
        if fused != fusion.shown_fused:
            if last:
                fusion.parked.put_into(module.weight.data)
            else:
                fusion.parked.swap(module.weight.data)
        fusion.shown_fused = fused
        bias = (fusion.fused if fused else fusion.base)[1]
        if bias is not None:
            module.bias.data = bias


def _unpark(module: LoraLayer, fusion: Fusion) -> None:
    """A layer offloaded by accelerate after it was fused with a parked weight: its hook's weights map now
    holds the weight shown; bring the parked one back into memory beside it, as an offloaded fusion keeps both."""
    shown, other = offload.real_tensor(module, "weight"), fusion.parked.tensor()
    if fusion.shown_fused:
        fusion.base, fusion.fused = (other, fusion.base[1]), (shown, fusion.fused[1])
    else:
        fusion.base, fusion.fused = (shown, fusion.base[1]), (other, fusion.fused[1])
    fusion.parked = None


def unfuse_layer(module: LoraLayer) -> None:
    """Restore the exact original tensors and forget the fusion."""
    fusion = module.__dict__.get("_lora_fusion")
    if isinstance(fusion, Fusion) and fusion.parked is not None and not offload.is_offloaded(module):
        _show_parked(module, fusion, False, last=True)
    else:
        show_fused(module, False)
    module.set_lora_fusion(None)


def keep_fused(module: LoraLayer) -> None:
    """Make the fused weights the module's own for good (diffusers' "fuse, then unload")."""
    show_fused(module, True)
    module.set_lora_fusion(None)


# -- where the originals wait: on the device, in CPU memory or in a file ----------------------------------------

KEEP_ORIGINALS = ("auto", "device", "cpu", "disk")
# "auto" keeps the originals on the device when its free memory exceeds the fused copies' bytes by this
# much (the larger of the two): room for the activations of the next forward and the allocator's rounding.
AUTO_MARGIN_BYTES = 1 << 30
AUTO_MARGIN_FRACTION = 0.1


def _is_accelerator(device: torch.device) -> bool:
    """Whether tensors on ``device`` are accelerator memory, worth parking elsewhere."""
    return device.type not in ("cpu", "meta")


def _free_bytes(device: torch.device) -> int | None:
    """What new tensors can still take on ``device``: the driver's free memory plus what PyTorch's caching
    allocator holds unused; None for a device we cannot ask."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _available_ram() -> int | None:
    """The kernel's estimate of the memory available to new allocations (``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _margin(needed: int) -> int:
    return max(AUTO_MARGIN_BYTES, int(AUTO_MARGIN_FRACTION * needed))


def where_to_keep(keep_originals: str, weights: list[torch.Tensor]) -> str:
    """``"device"``, ``"cpu"`` or ``"disk"``: where a fuse of layers with these ``weights`` keeps the originals.

    ``"auto"``: on the device when every accelerator they are on has room for their fused copies (their
    bytes, plus `AUTO_MARGIN_BYTES` or `AUTO_MARGIN_FRACTION` of them); otherwise in CPU memory when
    ``MemAvailable`` holds them with the same margin, else on disk. Weights in CPU memory need no room.

    >>> import torch
    >>> where_to_keep("auto", [torch.zeros(4, 4)]), where_to_keep("disk", [torch.zeros(4, 4)])
    ('device', 'disk')
    """
    if keep_originals not in KEEP_ORIGINALS:
        raise LoraError(f"keep_originals={keep_originals!r}; expected one of {', '.join(map(repr, KEEP_ORIGINALS))}")
    if keep_originals != "auto":
        return keep_originals
    needed: dict[torch.device, int] = {}
    for weight in weights:
        if _is_accelerator(weight.device):
            needed[weight.device] = needed.get(weight.device, 0) + weight.numel() * weight.element_size()
    tight = False
    for device, n in needed.items():
        free = _free_bytes(device)
        tight = tight or (free is not None and free < n + _margin(n))
    if not tight:
        return "device"
    total, ram = sum(needed.values()), _available_ram()
    return "cpu" if ram is None or ram >= total + _margin(total) else "disk"


class OriginalsKeeper:
    """Where one ``fuse_lora`` call keeps the original weights that unfuse restores (one temporary file for
    all its layers with ``"disk"``).

    >>> import torch
    >>> keeper = originals_keeper("cpu", [torch.nn.Linear(2, 2)])
    >>> keeper.where, keeper.parks(torch.zeros(2))  # in CPU memory already: nothing to save, kept as it is
    ('cpu', False)
    """

    def __init__(self, where: str):
        self.where = where
        self._file: _OriginalsFile | None = None

    def parks(self, weight: torch.Tensor) -> bool:
        """Whether ``weight``'s original goes off the device (a weight in CPU memory is kept as it is, but on disk)."""
        return self.where == "disk" or (self.where == "cpu" and _is_accelerator(weight.device))

    def park(self, weight: torch.Tensor) -> Parked:
        if self.where == "cpu":
            return InMemory(weight)
        if self._file is None:
            self._file = _OriginalsFile()
        return OnDisk(self._file, weight)


def originals_keeper(keep_originals: str, modules) -> OriginalsKeeper:
    """The `OriginalsKeeper` for fusing ``modules`` (``keep_originals`` resolved by `where_to_keep` over the
    weights that could be parked: not quantized, not offloaded by accelerate, not a LoRA on parameters)."""
    weights = [] if keep_originals != "auto" else [  # only "auto" looks at them
        module.weight for module in modules
        if not isinstance(module, param_layer.LoraParamMixin) and not quantized.is_quantized(module)
        and not offload.is_offloaded(module) and isinstance(getattr(module, "weight", None), torch.Tensor)
    ]
    return OriginalsKeeper(where_to_keep(keep_originals, weights))


class Parked:
    """A weight waiting off the device while its layer shows the other one (the original while fused, the
    fused one while disabled). ``dtype`` is the dtype it has once converted as the model was since."""

    kept: str
    dtype: torch.dtype

    def put_into(self, target: torch.Tensor) -> None:
        """Write the parked values into ``target`` (the parameter's tensor), converted to its dtype and device."""
        raise NotImplementedError

    def swap(self, target: torch.Tensor) -> None:
        """Park ``target``'s values and write the parked ones into it."""
        raise NotImplementedError

    def cast(self, dtype: torch.dtype) -> None:
        """Convert the parked values to ``dtype`` (the model was converted)."""
        raise NotImplementedError

    def tensor(self) -> torch.Tensor:
        """The parked values as a tensor in CPU memory."""
        raise NotImplementedError


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` in CPU memory, page-locked when CUDA is available (see `_page_locked_empty`)."""
    return _page_locked_empty(tensor.shape, tensor.dtype).copy_(tensor)  # waits: the parameter can be written next


def _page_locked_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An empty CPU tensor CUDA copies to and from at full speed: page-locked with ``cudaHostRegister`` and
    unlocked when the tensor is collected; pageable without CUDA or when CUDA refuses. Not ``pin_memory=True``:
    PyTorch's pinned allocator rounds every block up to a power of two (a 72 MiB Flux weight takes 128 MiB)
    and keeps freed blocks for itself, so the originals' memory would outlive the unfuse."""
    out = torch.empty(shape, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    if nbytes and torch.cuda.is_available():
        cudart = torch.cuda.cudart()
        if int(cudart.cudaHostRegister(out.data_ptr(), nbytes, 0)) == 0:
            # Runs when the tensor object goes, before its memory is freed. Every copy from it is blocking,
            # so no transfer can still be reading it then.
            weakref.finalize(out, cudart.cudaHostUnregister, out.data_ptr())
    return out


class InMemory(Parked):
    """A weight parked in CPU memory."""

    kept = "cpu"

    def __init__(self, weight: torch.Tensor):
        self.values = _cpu_copy(weight)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def put_into(self, target: torch.Tensor) -> None:
        target.copy_(self.values)

    def swap(self, target: torch.Tensor) -> None:
        values = _cpu_copy(target)
        self.put_into(target)
        self.values = values

    def cast(self, dtype: torch.dtype) -> None:
        self.values = _cpu_copy(self.values.to(dtype))

    def tensor(self) -> torch.Tensor:
        return self.values


class _OriginalsFile:
    """An unnamed temporary file (in `tempfile.gettempdir()`: ``TMPDIR``), gone when closed or when the process
    ends, that one fuse's parked weights are written to, each at its own offset."""

    def __init__(self):
        self.file = tempfile.TemporaryFile(prefix="lora_loader_fuse_", buffering=0)
        self.size = 0

    def reserve(self, nbytes: int) -> int:
        offset, self.size = self.size, self.size + nbytes
        return offset

    def write(self, tensor: torch.Tensor, offset: int) -> None:
        view = _bytes(tensor)
        self.file.seek(offset)
        done = 0
        while done < len(view):
            done += self.file.write(view[done:])

    def read_into(self, tensor: torch.Tensor, offset: int) -> None:
        view = _bytes(tensor)
        self.file.seek(offset)
        done = 0
        while done < len(view):
            n = self.file.readinto(view[done:])
            if not n:
                raise LoraError(f"the file keeping the fused layers' original weights ({self.file.name}) ended early")
            done += n


def _bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (any dtype, bf16 included: no numpy needed)."""
    nbytes = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


class OnDisk(Parked):
    """A weight parked in a temporary file; conversions of the model are recorded and applied when it is read."""

    kept = "disk"

    def __init__(self, file: _OriginalsFile, weight: torch.Tensor):
        self.file, self.offset, self.capacity = file, 0, 0
        self._write(weight)

    def _write(self, tensor: torch.Tensor) -> None:
        values = tensor.detach().to("cpu").contiguous()  # a contiguous CPU tensor is written from where it is
        nbytes = values.numel() * values.element_size()
        if nbytes > self.capacity:
            self.offset, self.capacity = self.file.reserve(nbytes), nbytes
        self.file.write(values, self.offset)
        self.shape, self.stored, self.casts = values.shape, values.dtype, []

    @property
    def dtype(self) -> torch.dtype:
        return self.casts[-1] if self.casts else self.stored

    def tensor(self) -> torch.Tensor:
        values = torch.empty(self.shape, dtype=self.stored)
        self.file.read_into(values, self.offset)
        for dtype in self.casts:  # each conversion as the model had it, in order: the same values
            values = values.to(dtype)
        return values

    def put_into(self, target: torch.Tensor) -> None:
        if not self.casts and target.device.type == "cpu" and target.dtype == self.stored and target.is_contiguous():
            self.file.read_into(target, self.offset)  # straight into the parameter: no buffer
        else:
            target.copy_(self.tensor())

    def swap(self, target: torch.Tensor) -> None:
        values = self.tensor()
        self._write(target)
        target.copy_(values)

    def cast(self, dtype: torch.dtype) -> None:
        self.casts.append(dtype)
