"""Weight pruning of one linear layer: magnitude, Wanda and SparseGPT, unstructured or N:M.

* magnitude: zero the smallest |W_ij| of the whole layer (N:M: in each group of M inputs of a row).
* Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"): score
  |W_ij|·‖X_j‖₂, compared within each output row (N:M: within each group of M inputs of a row);
  no weight update.
* SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
  in One-Shot"): columns are processed left to right in blocks of 128; the mask of a block is
  chosen adaptively by w²/[H⁻¹]²_jj (unstructured: a threshold over the block, N:M: per group),
  and each pruned weight's error is compensated on the not-yet-processed columns by the OBS update
  through the upper Cholesky factor of H⁻¹ (H = 2XᵀX/n + damping, `LinearStats.hessian`).

Our own implementation (tested against a naive column-by-column least-squares re-solve); the
pattern "N:M" keeps N of every M consecutive input weights of a row (2:4 keeps 2 of 4).
"""
from __future__ import annotations

import torch

from layerscope.errors import LayerscopeError

METHODS = ("magnitude", "wanda", "sparsegpt")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """'unstructured' -> (0, 0); 'N:M' -> (N kept, M)."""
    if pattern in ("unstructured", "", None):
        return 0, 0
    try:
        n, m = (int(x) for x in str(pattern).split(":"))
    except ValueError:
        raise LayerscopeError(f"--pattern must be 'unstructured' or N:M such as 2:4, got '{pattern}'") from None
    if not (0 < n < m):
        raise LayerscopeError(f"pattern {pattern}: need 0 < N < M")
    return n, m


def check_sparsity(s: float, what: str = "sparsity") -> float:
    s = float(s)
    if not (0.0 <= s < 1.0):
        raise LayerscopeError(f"{what} must be in [0, 1), got {s:g}")
    return s


def _nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where pruned: in each group of m consecutive columns of a row, all but the n largest."""
    rows, cols = score.shape
    if cols % m:
        raise LayerscopeError(f"N:M pattern needs in_features ({cols}) divisible by M={m}")
    g = score.reshape(rows, cols // m, m)
    drop = torch.topk(g, m - n, dim=-1, largest=False).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, drop, True)
    return mask.reshape(rows, cols)


def score_mask(score: torch.Tensor, sparsity: float, pattern: str = "unstructured", per_row: bool = True
               ) -> torch.Tensor:
    """Boolean mask (True = pruned) of the lowest scores: per output row, over the layer, or N:M."""
    n, m = parse_pattern(pattern)
    if m:
        return _nm_mask(score, n, m)
    k = int(score.shape[1] * sparsity) if per_row else int(score.numel() * sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k <= 0:
        return mask
    if per_row:
        idx = torch.topk(score, k, dim=1, largest=False).indices
        return mask.scatter_(1, idx, True)
    idx = torch.topk(score.flatten(), k, largest=False).indices
    return mask.view(-1).scatter_(0, idx, True).view_as(score)


def wanda_score(weight: torch.Tensor, col_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij|·‖X_j‖₂ (weight [out, in], col_norms [in])."""
    return weight.detach().abs().float() * col_norms.float().reshape(1, -1)


def prune_magnitude(weight: torch.Tensor, sparsity: float, pattern: str = "unstructured") -> torch.Tensor:
    mask = score_mask(weight.detach().abs().float(), sparsity, pattern, per_row=False)
    return weight.detach().masked_fill(mask, 0)


def prune_wanda(weight: torch.Tensor, col_norms: torch.Tensor, sparsity: float, pattern: str = "unstructured"
                ) -> torch.Tensor:
    mask = score_mask(wanda_score(weight, col_norms), sparsity, pattern, per_row=True)
    return weight.detach().masked_fill(mask, 0)


def upper_inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ (in H's dtype; float32 as SparseGPT's reference, with damping)."""
    try:
        L = torch.linalg.cholesky(h)
        hinv = torch.cholesky_inverse(L)
        return torch.linalg.cholesky(hinv, upper=True)
    except RuntimeError as exc:  # torch raises _LinAlgError (a RuntimeError) for non-PD input
        raise LayerscopeError(f"the Hessian is not positive definite ({str(exc).splitlines()[0]}); "
                              "raise the damping") from None


def prune_sparsegpt(weight: torch.Tensor, hessian: torch.Tensor | None, sparsity: float, pattern: str = "unstructured",
                    blocksize: int = 128, mask: torch.Tensor | None = None, hinv_upper: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SparseGPT's pruned and error-compensated weight (weight [out, in], hessian damped [in, in]).

    `mask` (True = pruned) fixes the mask instead of choosing it adaptively (tests). `hinv_upper`:
    a precomputed `upper_inverse_cholesky(H)` (several sparsity levels of one layer share it).
    Computes in `dtype` (float32 as the reference implementation).
    """
    n, m = parse_pattern(pattern)
    W = weight.detach().to(dtype).clone()
    rows, cols = W.shape
    if hinv_upper is None:
        H = hessian.detach().to(dtype).clone()
        dead = torch.diagonal(H) == 0
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
        U = upper_inverse_cholesky(H)
    else:
        U = hinv_upper.to(dtype)
    if m and blocksize % m:
        blocksize = m * max(1, blocksize // m)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        d1 = torch.diagonal(U1)
        if mask is not None:
            M1 = mask[:, i1:i2].clone()
        elif m:
            M1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            tmp = W1 ** 2 / d1.reshape(1, -1) ** 2
            k = int(tmp.numel() * sparsity)
            M1 = torch.zeros_like(W1, dtype=torch.bool)
            if k > 0:
                M1.view(-1).scatter_(0, torch.topk(tmp.flatten(), k, largest=False).indices, True)
        for i in range(i2 - i1):
            if mask is None and m and i % m == 0:
                tmp = W1[:, i:i + m] ** 2 / d1[i:i + m].reshape(1, -1) ** 2
                M1[:, i:i + m] = _nm_mask(tmp, n, m) if tmp.shape[1] == m else M1[:, i:i + m]
            w = W1[:, i]
            q = w.masked_fill(M1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return W.to(weight.dtype)


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, xtx: torch.Tensor) -> float:
    """‖(W − Ŵ)X‖²_F = tr(Δ XᵀX Δᵀ) from the layer's input second moment."""
    d = (weight.detach().double() - pruned.detach().double())
    return float(((d @ xtx.double()) * d).sum())


def prune_weight(method: str, weight: torch.Tensor, sparsity: float, pattern: str, stats=None,
                 damp: float = 0.01) -> torch.Tensor:
    """One entry point: the pruned copy of `weight` ([out, in]) with the chosen method."""
    n, m = parse_pattern(pattern)
    if not m:
        sparsity = check_sparsity(sparsity)
        if sparsity == 0.0:
            return weight.detach().clone()
    if method == "magnitude":
        return prune_magnitude(weight, sparsity, pattern)
    if stats is None:
        raise LayerscopeError(f"{method} needs calibration statistics")
    if method == "wanda":
        return prune_wanda(weight, stats.col_norms(), sparsity, pattern)
    if method == "sparsegpt":
        cached = getattr(stats, "_sparsegpt_hinv", None)  # one factorization per layer for every level
        if cached is None or cached[0] != damp:
            H = stats.hessian(damp)
            dead = torch.diagonal(H) == 0
            H[dead, dead] = 1.0
            cached = (damp, upper_inverse_cholesky(H), dead)
            stats._sparsegpt_hinv = cached
        w = weight.detach().clone()
        w[:, cached[2]] = 0
        return prune_sparsegpt(w, None, sparsity, pattern, hinv_upper=cached[1])
    raise LayerscopeError(f"unknown pruning method '{method}' ({', '.join(METHODS)})")
