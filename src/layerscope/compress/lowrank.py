"""Low-rank factorization of one linear layer: plain SVD and activation-aware (whitened) SVD.

* svd: W ≈ U_r Σ_r V_rᵀ, the best rank-r approximation in Frobenius norm of the weights alone.
* whitened (SVD-LLM, Wang et al. 2024, "SVD-LLM: Truncation-aware Singular Value Decomposition
  for Large Language Model Compression"): with S the Cholesky factor of the input second moment
  (XᵀX = S Sᵀ, lightly damped), W S = U Σ Vᵀ and Ŵ = U_r Σ_r V_rᵀ S⁻¹. Truncating σ_i then costs
  exactly σ_i² of the layer's output error ‖(W − Ŵ)X‖²_F (their Theorem 3.2), so the rank-r
  truncation is optimal for the calibration inputs.

Factors: A = Σ_r^½ V_rᵀ (S⁻¹) [r, in] and B = U_r Σ_r^½ [out, r], Ŵ = B A: the layer becomes
Linear(in, r) → Linear(r, out). The loss of a rank is measured as the relative output error on the
calibration statistics, ‖(W − Ŵ)X‖² / ‖WX‖² = tr(Δ XᵀX Δᵀ) / tr(W XᵀX Wᵀ).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from layerscope.errors import LayerscopeError

METHODS = ("svd", "whitened")


@dataclass
class Factorization:
    """The SVD of W (whitened or not), from which any rank is cut without recomputation."""

    U: torch.Tensor  # [out, k] float64
    S: torch.Tensor  # [k]
    Vh: torch.Tensor  # [k, in] (already multiplied by the inverse whitening when whitened)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r]) with B A the rank-r approximation."""
        r = int(rank)
        if not 1 <= r <= self.S.numel():
            raise LayerscopeError(f"rank {r} is outside 1..{self.S.numel()}")
        root = self.S[:r].sqrt()
        return root[:, None] * self.Vh[:r], self.U[:, :r] * root[None, :]

    def tail_loss(self, rank: int) -> float:
        """Σ_{i>r} σ_i² / Σ σ_i²: for the whitened SVD this is ‖(W − Ŵ_r)X‖² / ‖WX‖² on the (damped)
        calibration statistics (SVD-LLM's truncation loss), without forming Ŵ_r."""
        s2 = self.S.double() ** 2
        tot = float(s2.sum())
        return float(s2[int(rank):].sum()) / tot if tot > 0 else 0.0

    def weight(self, rank: int) -> torch.Tensor:
        a, b = self.factors(rank)
        return b @ a


def fisher_loss(W: torch.Tensor, approx: torch.Tensor, M: torch.Tensor, fisher: torch.Tensor) -> float:
    """Predicted ΔNLL per token of replacing W by `approx`: ½ Σ_j F_j (E M Eᵀ)_jj, E = W − approx,
    M = XᵀX / tokens, F_j the mean squared loss gradient at output j (second-order, diagonal output
    Fisher, as compress.quant_stats). float64; each channel's term is clamped at 0: XᵀX accumulated from
    float32 products can be indefinite by rounding, and a change in its near-null space could read < 0."""
    E = W.double() - approx.double()
    return 0.5 * float(((E @ M.double()) * E).sum(1).clamp_min(0) @ fisher.double())


def whitening_factor(xtx: torch.Tensor, damp: float = 1e-4) -> torch.Tensor:
    """Lower-triangular S with S Sᵀ = XᵀX + damp·mean(diag)·I (float64)."""
    h = xtx.double().clone()
    lam = float(damp) * float(torch.diagonal(h).mean())
    h.diagonal().add_(lam if lam > 0 else 1e-8)
    for extra in (0.0, 1e-6, 1e-4, 1e-2):
        try:
            return torch.linalg.cholesky(h + extra * float(torch.diagonal(h).mean()) * torch.eye(h.shape[0], dtype=h.dtype))
        except RuntimeError:  # torch's _LinAlgError: not positive definite at this damping
            continue
    raise LayerscopeError("the input second moment is not positive definite even with damping")


def factorize(weight: torch.Tensor, method: str = "whitened", xtx: torch.Tensor | None = None,
              damp: float = 1e-4) -> Factorization:
    """SVD of W (`svd`) or of W S (`whitened`, needs XᵀX)."""
    W = weight.detach().double()
    if method == "svd":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return Factorization(U, S, Vh)
    if method != "whitened":
        raise LayerscopeError(f"unknown low-rank method '{method}' ({', '.join(METHODS)})")
    if xtx is None:
        raise LayerscopeError("whitened SVD needs the layer's input statistics")
    L = whitening_factor(xtx, damp)
    U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
    # Vh S⁻¹ without forming the inverse: solve Lᵀ Zᵀ = Vhᵀ  →  Z = Vh L⁻¹
    Z = torch.linalg.solve_triangular(L.t(), Vh.t(), upper=True).t()
    return Factorization(U, S, Z)


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, xtx: torch.Tensor) -> float:
    """‖(W − Ŵ)X‖² / ‖WX‖² from XᵀX."""
    W = weight.detach().double()
    x = xtx.double()
    d = W - approx.double()
    den = float(((W @ x) * W).sum())
    num = max(float(((d @ x) * d).sum()), 0.0)
    if den <= 0:  # the layer's outputs are zero on the calibration inputs: only a change there is an error
        return 0.0 if num <= 1e-12 else float("inf")
    return num / den


def rank_for_keep(shape: tuple[int, int], keep: float) -> int:
    """The rank whose factor pair holds `keep` × the dense parameters (at least 1)."""
    out, inp = shape
    return max(1, int(keep * out * inp / (out + inp)))


def factor_params(shape: tuple[int, int], rank: int) -> int:
    out, inp = shape
    return rank * (out + inp)
