"""DARE-TIES (Yu et al. 2024, Language Models are Super Mario): drop each task-vector entry with
probability 1 − density, rescale the survivors so the tensor keeps its L1 norm (mergekit's `rescale`),
then TIES sign election. The drop masks are random: mergekit draws other ones, so its tensors differ
from ours (the expected merge is the same)."""
from __future__ import annotations

import torch

from layerscope.actions.merge.methods.ties import merge_signed


def drop(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    if density >= 1:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, density, dtype=torch.float32), generator=generator)
    kept = delta * mask
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def combine(base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], density: float = 1.0,
            generator: torch.Generator | None = None) -> torch.Tensor:
    return merge_signed(base, [drop(d, density, generator) for d in deltas], weights)
