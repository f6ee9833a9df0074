"""TIES merging (Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models).

Trim each task vector to its `density` largest magnitudes, elect each parameter's sign as the sign of
the sum of the weighted task vectors, and add the weighted entries that agree with it. As in mergekit
with ``normalize: false``: the agreeing entries are summed, not averaged, so per-layer coefficients
keep their meaning (with normalisation equal coefficients would cancel out).
"""
from __future__ import annotations

import torch


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density · n) largest |entries| (ties broken as torch.argsort does)."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    if k <= 0:
        return torch.zeros_like(delta)
    mask = torch.zeros_like(delta)
    order = torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:k]
    mask.view(-1)[order] = 1
    return delta * mask


def elect(weighted: torch.Tensor) -> torch.Tensor:
    """Mask [T, ...] of the entries whose sign agrees with the sign of the sum over tasks (sum >= 0 is +)."""
    majority = (weighted.sum(dim=0) >= 0).to(weighted.dtype) * 2 - 1
    return weighted.sign() == majority


def merge_signed(base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    d = torch.stack(deltas, dim=0)
    w = torch.tensor(weights, dtype=d.dtype).view(-1, *([1] * (d.dim() - 1)))
    weighted = d * w
    return (base + (weighted * elect(weighted)).sum(dim=0)).to(base.dtype)


def combine(base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], density: float = 1.0,
            generator: torch.Generator | None = None) -> torch.Tensor:
    return merge_signed(base, [trim(d, density) for d in deltas], weights)
