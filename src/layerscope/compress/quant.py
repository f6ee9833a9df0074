"""Quantization backend: HQQ (mobiusml/hqq), with a fake-quant path that rounds exactly like it.

Why HQQ. Checked on this CPU-only machine (torch 2.13 CPU) with a 576x192 nn.Linear:

* HQQ 0.2.8 (``HQQLinear``): quantizes and runs on CPU at 2, 3, 4 and 8 bits with group 64 and
  128 (groups are cut from the row-major flattened weight, so 128 works on 576-wide rows too),
  stores bit-packed codes (2/4/8 bit in uint8, 3 bit as ten codes per int32) plus one scale and
  one zero per group in the compute dtype, keeps a per-module config, and a whole model saves and
  loads with ``AutoHQQHFModel.save_quantized`` / ``from_quantized`` (``torch.load(weights_only=True)``).
* torchao 0.18 (``IntxWeightOnlyConfig``): runs on CPU at 2/3/4/8 bits with group 64, refuses
  group 128 when the row length (576) is not a multiple, and stores 2/3/4-bit codes unpacked in
  int8 (no memory saving); reloading needs ``weights_only=False`` (tensor subclasses).
* bitsandbytes 0.50 (CPU backend): only 4-bit NF4/FP4 and 8-bit LLM.int8; no 2- or 3-bit.

So the applied quantization uses HQQ. Two rounding methods, both run by HQQ's own
``Quantizer.quantize``:

* ``rtn``  - round to nearest with min/max scale and zero (HQQ with ``optimize=False``);
* ``hqq``  - HQQ's half-quadratic proximal optimisation of scale/zero (``optimize=True``, the
  library's default).

``fake_quant(W, scheme)`` returns the dequantized weight that ``HQQLinear.dequantize()`` would
return, bit for bit: the ``rtn`` codes are computed here (the same float32 arithmetic as HQQ), the
``hqq`` codes come from HQQ's optimiser itself, and dequantization mirrors HQQ's (codes - zero) *
scale in the compute dtype (float16 by default). tests/test_quant.py checks equality with HQQLinear
for every bit width and group size.

Storage cost (bits per weight, bpw) of one [out, in] weight with N = out*in weights, R = N/g groups:

* ``hqq``    codes: 8-bit R*g*8, 4-bit ceil(R/2)*g*8, 2-bit ceil(R/4)*g*8, 3-bit ceil(R/10)*g*32;
             plus 2*16*R (float16 scale and zero per group)       -> b + 32/g (3-bit: 3.2 + 32/g)
* ``gptq``   (GPTQModel) b*N + R*(16 + b) (fp16 scale, b-bit packed zero) + 32*in (g_idx)
                                                                  -> b + (16 + b)/g + 32/out
* ``compressed-tensors`` (llm-compressor pack-quantized, symmetric int) b*N + 16*R -> b + 16/g
* ``llamacpp`` the ggml type's block size and bytes (gguf.GGML_QUANT_SIZES): q2_K 2.625,
             q3_K 3.4375, q4_K 4.5, q8_0 8.5 bpw (group size fixed by the type)

16 bits means "leave this layer unquantized" (float16, 16 bpw) in every format.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn

from layerscope.errors import LayerscopeError

SUPPORTED_BITS = (2, 3, 4, 8)
UNQUANTIZED = 16  # "keep this layer in float16"
METHODS = ("rtn", "hqq", "gptq")
FORMATS = ("hqq", "gptq", "compressed-tensors", "llamacpp")
DEFAULT_COMPUTE_DTYPE = torch.float16

# HQQ packing per bit width: (codes per container, container bits)
_HQQ_PACK = {8: (1, 8), 4: (2, 8), 3: (10, 32), 2: (4, 8)}
# llama.cpp type per bit width (k-quants need rows that are a multiple of 256 values)
GGML_TYPE_FOR_BITS = {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 8: "Q8_0", 16: "F16"}


@dataclass(frozen=True, order=True)
class Scheme:
    """One quantization choice for a weight: bit width, group size, rounding method."""

    bits: int
    group_size: int = 64
    method: str = "rtn"

    @property
    def quantized(self) -> bool:
        return self.bits != UNQUANTIZED

    @property
    def label(self) -> str:
        return "fp16" if not self.quantized else f"{self.bits}b/g{self.group_size}"

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "method": self.method}


def check_scheme(bits: int, group_size: int, method: str = "rtn") -> Scheme:
    """A validated Scheme, or a LayerscopeError naming what is wrong."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise LayerscopeError(f"bit width must be an integer, got {bits!r}")
    if bits not in SUPPORTED_BITS and bits != UNQUANTIZED:
        raise LayerscopeError(
            f"unknown bit width {bits}: the hqq backend packs {', '.join(map(str, SUPPORTED_BITS))} bits "
            f"(16 = leave the layer unquantized); 5/6 bits would be stored in 8-bit containers"
        )
    if method not in METHODS:
        raise LayerscopeError(f"unknown rounding method '{method}' (known: {', '.join(METHODS)})")
    if bits != UNQUANTIZED and (group_size < 8 or group_size % 8):
        raise LayerscopeError(f"group size must be a positive multiple of 8 (hqq), got {group_size}")
    return Scheme(bits=bits, group_size=group_size, method=method)


def parse_bits(text: str | Iterable[int]) -> list[int]:
    """'2,3,4,8' -> [2, 3, 4, 8] (sorted, unique, validated)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: set[int] = set()
    for item in items:
        s = str(item).strip()
        if not s:
            continue
        try:
            b = int(s)
        except ValueError:
            raise LayerscopeError(f"bit width must be an integer, got '{s}'") from None
        check_scheme(b, 64)
        out.add(b)
    if not out:
        raise LayerscopeError("no bit widths given")
    return sorted(out)


# --------------------------------------------------------------------------- which layers
def is_quantizable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def check_linear(name: str, module: nn.Module, scheme: Scheme) -> None:
    """Raise a one-line LayerscopeError if HQQ cannot quantize `module` with `scheme`."""
    if not scheme.quantized:
        return
    if scheme.method == "gptq" and isinstance(module, nn.Linear):
        return  # GPTQ groups run along rows (compress.quant_stats.effective_scheme picks a group that divides them)
    if not isinstance(module, nn.Linear):
        raise LayerscopeError(
            f"the hqq backend cannot quantize layer '{name}' ({type(module).__name__}): it quantizes nn.Linear only"
        )
    n = module.weight.numel()
    if n % scheme.group_size:
        raise LayerscopeError(
            f"the hqq backend cannot quantize layer '{name}' with group size {scheme.group_size}: "
            f"its {tuple(module.weight.shape)} weight has {n} values, not a multiple of the group size"
        )


def block_linears(parts, i: int) -> dict[str, nn.Module]:
    """The weight layers of block i that a plan covers (every 2-D weight layer of the block)."""
    return parts.block_linears(i)


def full_name(parts, i: int, linear: str) -> str:
    return f"{parts.blocks_path}.{i}.{linear}"


# --------------------------------------------------------------------------- storage cost
def _ggml_bpw(ggml_type: str) -> float:
    import gguf

    t = gguf.GGMLQuantizationType[ggml_type]
    block, type_size = gguf.GGML_QUANT_SIZES[t]
    return type_size * 8 / block


def storage_bits(shape: tuple[int, int] | torch.Size, scheme: Scheme, fmt: str = "hqq") -> int | float:
    """Bits needed to store one [out, in] weight under `scheme` in library format `fmt`."""
    out_f, in_f = int(shape[0]), int(shape[1])
    n = out_f * in_f
    if not scheme.quantized:
        return 16 * n
    b, g = scheme.bits, scheme.group_size
    if fmt == "hqq":
        r = math.ceil(n / g)
        per, container = _HQQ_PACK[b]
        return math.ceil(r / per) * g * container + 2 * 16 * r
    if fmt == "gptq":
        r = out_f * math.ceil(in_f / g)
        return b * n + r * (16 + b) + 32 * in_f
    if fmt == "compressed-tensors":
        r = out_f * math.ceil(in_f / g)
        return b * n + 16 * r
    if fmt == "llamacpp":
        return _ggml_bpw(GGML_TYPE_FOR_BITS[b]) * n
    raise LayerscopeError(f"unknown storage format '{fmt}' (known: {', '.join(FORMATS)})")


def bits_per_weight(shape, scheme: Scheme, fmt: str = "hqq") -> float:
    return storage_bits(shape, scheme, fmt) / (int(shape[0]) * int(shape[1]))


# --------------------------------------------------------------------------- HQQ configs
def hqq_quant_config(scheme: Scheme) -> dict:
    """HQQ's own BaseQuantizeConfig for `scheme` (axis 1; optimize only for method 'hqq')."""
    from hqq.core.quantize import BaseQuantizeConfig

    cfg = BaseQuantizeConfig(nbits=scheme.bits, group_size=scheme.group_size, axis=1)
    cfg["weight_quant_params"]["optimize"] = scheme.method == "hqq"
    return cfg


def _weight_params(scheme: Scheme) -> dict:
    return hqq_quant_config(scheme)["weight_quant_params"]


# --------------------------------------------------------------------------- fake quant
@torch.no_grad()
def quantize_codes(W: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [R, g] float32, scale [R, 1] float32 (multiplicative, dequant), zero [R, 1] float32).

    'rtn': HQQ's round-to-nearest arithmetic, vectorised here; 'hqq': HQQ's optimiser itself.
    """
    if scheme.method == "gptq":
        raise LayerscopeError("gptq weights come from compress.gptq (they need the calibration Hessian), not fake_quant")
    p = _weight_params(scheme)
    g = scheme.group_size
    if scheme.method == "hqq":
        from hqq.core.quantize import Quantizer

        W_q, meta = Quantizer.quantize(W.float(), device=str(W.device), bitpack=False, compute_dtype=torch.float32, **p)
        return W_q.float().reshape(-1, g), meta["scale"].float().reshape(-1, 1), meta["zero"].float().reshape(-1, 1)
    Wg = W.float().reshape(-1, g)
    mn = Wg.min(dim=1, keepdim=True)[0]
    mx = Wg.max(dim=1, keepdim=True)[0]
    max_v = float(round(2 ** scheme.bits - 1))
    denom = mx - mn
    inv = max_v / denom
    inv = torch.where(denom.abs() <= 1e-4, torch.full_like(inv, 1.0), inv)
    inv = inv.clamp(max=2e4)
    zero = -mn * inv
    if p["round_zero"]:
        zero = torch.round(zero)
    codes = (Wg * inv + zero).round_().clamp_(0.0, max_v)
    return codes, 1.0 / inv, zero


@torch.no_grad()
def fake_quant(W: torch.Tensor, scheme: Scheme, compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE) -> torch.Tensor:
    """The weight HQQLinear would reconstruct (dequantize) for `scheme`, returned in W's dtype."""
    if not scheme.quantized:
        return W.to(torch.float16).to(W.dtype)
    codes, scale, zero = quantize_codes(W, scheme)
    Wr = (codes.to(compute_dtype) - zero.to(compute_dtype)) * scale.to(compute_dtype)
    return Wr.reshape(W.shape).to(W.dtype)


def relative_mse(W: torch.Tensor, scheme: Scheme) -> float:
    """||W - Q(W)||^2 / ||W||^2 for one weight."""
    Wf = W.float()
    d = fake_quant(W, scheme).float() - Wf
    return float((d * d).sum() / (Wf * Wf).sum().clamp_min(1e-30))


class WeightCache:
    """Fake-quantized weights per (module name, scheme), computed once."""

    def __init__(self, compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE):
        self.compute_dtype = compute_dtype
        self._cache: dict[tuple[str, Scheme], torch.Tensor] = {}

    def get(self, name: str, W: torch.Tensor, scheme: Scheme) -> torch.Tensor:
        key = (name, scheme)
        t = self._cache.get(key)
        if t is None:
            t = fake_quant(W, scheme, self.compute_dtype)
            self._cache[key] = t
        return t


class FakeQuantizer:
    """Swap fake-quantized weights into a model's blocks and restore the originals.

    `assignment` maps full module names (e.g. 'model.layers.3.mlp.up_proj') to a Scheme; names not
    listed keep their original weights.
    """

    def __init__(self, parts, cache: WeightCache | None = None):
        self.parts = parts
        self.cache = cache or WeightCache()
        self.modules: dict[str, nn.Module] = {}
        for i in range(parts.num_layers):
            for lin, m in block_linears(parts, i).items():
                self.modules[full_name(parts, i, lin)] = m
        self.original: dict[str, torch.Tensor] = {n: m.weight.data for n, m in self.modules.items()}

    def check(self, assignment: dict[str, Scheme]) -> None:
        for name, scheme in assignment.items():
            if name not in self.modules:
                raise LayerscopeError(f"the plan names layer '{name}', which this model does not have")
            check_linear(name, self.modules[name], scheme)

    def apply(self, assignment: dict[str, Scheme]) -> None:
        self.check(assignment)
        self.restore()
        for name, scheme in assignment.items():
            m = self.modules[name]
            m.weight.data = self.cache.get(name, self.original[name], scheme)

    def restore(self) -> None:
        for name, m in self.modules.items():
            m.weight.data = self.original[name]

    def __enter__(self) -> "FakeQuantizer":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


# --------------------------------------------------------------------------- real HQQ model
def _hqq_name_modules(model: nn.Module) -> None:
    from hqq.models.hf.base import AutoHQQHFModel

    AutoHQQHFModel.setup_model(model)


@torch.no_grad()
def quantize_model_hqq(model: nn.Module, assignment: dict[str, Scheme],
                       compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE) -> nn.Module:
    """Replace every planned nn.Linear of `model` (in place) by HQQ's HQQLinear on the CPU.

    Layers assigned 16 bits stay nn.Linear; the rest of the model is cast to `compute_dtype`.
    """
    from hqq.core.quantize import HQQLinear

    modules = dict(model.named_modules())
    for name, scheme in assignment.items():
        if name not in modules:
            raise LayerscopeError(f"the plan names layer '{name}', which this model does not have")
        check_linear(name, modules[name], scheme)
    for name, scheme in assignment.items():
        if not scheme.quantized:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, child)
        # HQQ quantizes from the float32 weight, exactly as fake_quant does
        q = HQQLinear(lin, hqq_quant_config(scheme), compute_dtype=compute_dtype, device="cpu", del_orig=True)
        setattr(parent, child, q)
    for m in model.modules():  # the rest (embeddings, norms, fp16 layers) in the compute dtype
        if isinstance(m, HQQLinear):
            continue
        for p in m.parameters(recurse=False):
            p.data = p.data.to(compute_dtype)
    _hqq_name_modules(model)
    return model


def hqq_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from hqq.core.quantize import HQQLinear

    for n, m in model.named_modules():
        if isinstance(m, HQQLinear):
            yield n, m


def save_hqq_model(model: nn.Module, directory) -> None:
    """HQQ's own serialisation: config.json + qmodel.pt (per-module state, bits and group kept)."""
    from hqq.models.hf.base import AutoHQQHFModel

    AutoHQQHFModel.save_quantized(model, str(directory))


def load_hqq_model(directory, compute_dtype: torch.dtype = DEFAULT_COMPUTE_DTYPE, device: str = "cpu") -> nn.Module:
    """Load a directory written by save_hqq_model with HQQ's own loader."""
    from hqq.models.hf.base import AutoHQQHFModel

    return AutoHQQHFModel.from_quantized(str(directory), compute_dtype=compute_dtype, device=device)
