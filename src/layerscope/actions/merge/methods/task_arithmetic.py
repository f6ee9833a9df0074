"""Task arithmetic (Ilharco et al. 2023, Editing Models with Task Arithmetic): θ = θ₀ + Σ_t w_t τ_t."""
from __future__ import annotations

import torch


def combine(base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], density: float = 1.0,
            generator: torch.Generator | None = None) -> torch.Tensor:
    d = torch.stack(deltas, dim=0)
    w = torch.tensor(weights, dtype=d.dtype).view(-1, *([1] * (d.dim() - 1)))
    return (base + (d * w).sum(dim=0)).to(base.dtype)
