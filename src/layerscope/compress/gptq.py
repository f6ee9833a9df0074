"""GPTQ: layer-wise quantization with second-order error compensation (Frantar et al. 2022, "GPTQ:
Accurate Post-Training Quantization for Generative Pre-trained Transformers", arXiv:2210.17323).

For one linear layer with weight W [out, in] and the Hessian of its reconstruction loss
‖WX − ŴX‖², H = 2XᵀX/n (+ damping λ·mean(diag H)·I), the columns are quantized one at a time; the
error of column i, divided by [H⁻¹]ᵢᵢ, is spread over the columns not yet quantized through row i
of the upper Cholesky factor of H⁻¹ (the OBQ update, Frantar & Alistarh 2022). Columns go in blocks
of `block_size` ("lazy batch" updates): inside a block the update is applied column by column, the
block's accumulated error reaches the remaining columns in one matrix product.

The grid. Groups of `group_size` consecutive input columns of a row share one scale; codes are
symmetric integers q ∈ [−2^(b−1), 2^(b−1)−1], Ŵ = q·scale, scale = r·max|w| / ((2^b − 1)/2) with
the clipping ratio r searched per group (`group_scale`), the scale rounded to float16 (as the project's HQQ grid stores it). This is compressed-tensors' "int,
symmetric, strategy group" scheme, the format vLLM and transformers load (`pack-quantized`); the
asymmetric variant is not used because compressed-tensors 0.20 + transformers 5 cannot reload
packed zero points (shape mismatch on load, checked here). Without act-order the scale of a group is
taken from the already-updated weights when the group's first column is reached (GPTQ's default);
with act-order (columns in decreasing diag(H)) the group scales are fixed from the original weights
before the pass ("static groups"), so groups stay contiguous and no g_idx is needed on export.

`rtn_sym` is the same grid with no compensation (GPTQ with H = I).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from layerscope.errors import LayerscopeError

SCALE_DTYPE = torch.float16  # scales are representable in float16 (stored as float32 on export)


@dataclass
class QuantizedWeight:
    """One quantized weight: dequantized values, integer codes and the per-group scales."""

    weight: torch.Tensor  # float32 [out, in] = codes * scale (per group)
    codes: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # float32 [out, in // group_size]
    bits: int
    group_size: int


def qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


SHRINK = tuple(1.0 - 0.05 * k for k in range(7))  # clipping ratios tried per group (1.0 = min-max)


def group_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """[out] symmetric scale of each row of w [out, g] (float16-representable, never 0): of the scales
    max|w|·r / ((2^b − 1)/2), r ∈ SHRINK, the one with the least squared rounding error of the row
    (clipping search, as GPTQ's reference code does with its `mse` option and llm-compressor's MSE
    observer: a symmetric grid spends a level on the sign, and one outlier per group otherwise sets
    the step for all)."""
    amax = w.abs().amax(dim=1)
    lo, hi = qrange(bits)
    best, best_err = None, None
    for r in SHRINK:
        scale = amax * r / ((2 ** bits - 1) / 2)
        scale = torch.where(amax > 0, scale, torch.ones_like(scale))
        scale = scale.to(SCALE_DTYPE).clamp_min(torch.finfo(SCALE_DTYPE).tiny).to(w.dtype)
        err = ((torch.clamp(torch.round(w / scale[:, None]), lo, hi) * scale[:, None] - w) ** 2).sum(dim=1)
        if best is None:
            best, best_err = scale, err
        else:
            take = err < best_err
            best, best_err = torch.where(take, scale, best), torch.where(take, err, best_err)
    return best


def quantize_column(w: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantized, codes) of one column w [out] with per-row scales [out]."""
    lo, hi = qrange(bits)
    q = torch.clamp(torch.round(w / scale), lo, hi)
    return q * scale, q


def check_grid(shape, bits: int, group_size: int, name: str = "weight") -> None:
    if bits < 2 or bits > 8:
        raise LayerscopeError(f"gptq quantizes 2..8 bits, got {bits}")
    if group_size <= 0 or int(shape[1]) % group_size:
        raise LayerscopeError(f"gptq cannot quantize {name} {tuple(shape)} with group size {group_size}: "
                              f"the input width {int(shape[1])} is not a multiple of it")


@torch.no_grad()
def rtn_sym(W: torch.Tensor, bits: int, group_size: int) -> QuantizedWeight:
    """Round to nearest on the GPTQ grid (no error compensation)."""
    check_grid(W.shape, bits, group_size)
    out, n = W.shape
    Wg = W.float().reshape(out, n // group_size, group_size)
    scale = torch.stack([group_scale(Wg[:, k], bits) for k in range(Wg.shape[1])], dim=1)
    lo, hi = qrange(bits)
    q = torch.clamp(torch.round(Wg / scale[..., None]), lo, hi)
    return QuantizedWeight((q * scale[..., None]).reshape(out, n), q.reshape(out, n).to(torch.int8),
                           scale, bits, group_size)


def _inverse_cholesky(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ (H symmetric positive definite); damping grows if needed."""
    d = torch.diagonal(H).mean()
    for extra in (0.0, 1e-6, 1e-4, 1e-2, 1e-1):
        Hd = H + extra * d * torch.eye(H.shape[0], dtype=H.dtype) if extra else H
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
    raise LayerscopeError("the Hessian is not positive definite even with damping: too few calibration tokens?")


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, *, act_order: bool = False,
                  block_size: int = 128, dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """GPTQ of W [out, in] given the damped Hessian H [in, in] (see the module docstring)."""
    check_grid(W.shape, bits, group_size)
    if H.shape != (W.shape[1], W.shape[1]):
        raise LayerscopeError(f"Hessian {tuple(H.shape)} does not match weight {tuple(W.shape)}")
    out, n = W.shape
    W = W.to(dtype).clone()
    H = H.to(dtype).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    G = n // group_size
    scale = torch.zeros(out, G, dtype=dtype)
    perm = None
    if act_order:
        for k in range(G):  # static groups from the original weights
            scale[:, k] = group_scale(W[:, k * group_size:(k + 1) * group_size], bits)
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_cholesky(H)
    if perm is None:  # a group must not straddle two column blocks (its scale is read at its first column)
        block_size = max(group_size, block_size // group_size * group_size)
    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i]) if perm is not None else i1 + i
            k = col // group_size
            if perm is None and col % group_size == 0:  # lazy group scale from the updated weights
                scale[:, k] = group_scale(torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :group_size], bits)
            w = W1[:, i]
            q, c = quantize_column(w, scale[:, k], bits)
            Q[:, i1 + i], codes[:, i1 + i] = q, c
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    if perm is not None:
        inv = torch.argsort(perm)
        Q, codes = Q[:, inv], codes[:, inv]
    return QuantizedWeight(Q.float(), codes.to(torch.int8), scale.float(), bits, group_size)


def output_error(E: torch.Tensor, xtx: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """Σ_j w_j · (E XᵀX Eᵀ)_jj for an error E [out, in] (w = 1 when not given): ‖E X‖² per output channel,
    weighted."""
    Ef = E.float()
    per_row = ((Ef @ xtx.float()) * Ef).sum(dim=1).double()
    if weights is not None:
        per_row = per_row * weights.double()
    return float(per_row.sum())
