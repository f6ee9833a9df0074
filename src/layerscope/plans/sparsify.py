"""SparsifyPlan: a sparsity level for every block, the pruner and the pattern, and how the levels were chosen.

Allocations (the global sparsity S is over all linear weights of the blocks):

* uniform: every block at S.
* owl (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity (OWL)"): per block the outlier ratio
  LOD = % of Wanda scores |W|·‖X‖ of the block's linears above M × their mean; LOD rescaled to
  [0, 2λ], centred, plus (1 − S) is the block's *keep* ratio (λ = 0.08, M = 5 as in the paper's
  LLaMA runs). More outliers → fewer weights pruned.
* metric:NAME: any ScoreTable metric in place of LOD (importance oriented by its direction, same
  rescaling with λ): more important → fewer weights pruned.
* exact: the one exact allocator (plans/allocator.py) over each block's measured loss-vs-sparsity
  curve: for every candidate level the block is pruned by the actual pruner (its own calibration
  statistics) and the loss is the relative squared error of the block's output,
  Σ‖B̂(h) − B(h)‖² / Σ‖B(h)‖², on calibration windows taken from the dense model; least total loss
  with kept weights ≤ (1 − S) × all weights.

With an N:M pattern every block is at the pattern's sparsity (1 − N/M): the allocation is uniform.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from layerscope.errors import LayerscopeError
from layerscope.plans.base import Plan

ALLOCATIONS = ("uniform", "owl", "exact")
OWL_LAMBDA = 0.08
OWL_M = 5.0


class SparsifyPlan(Plan):
    kind = "sparsify"

    method: str = Field(description="magnitude | wanda | sparsegpt")
    pattern: str = "unstructured"
    sparsity: float = Field(description="target sparsity over all linear weights of the blocks")
    allocation: str = Field(description="uniform | owl | exact | metric:NAME")
    levels: list[float] = Field(description="sparsity per block")
    block_params: list[int] = Field(default_factory=list, description="linear weights per block")
    achieved_sparsity: float | None = None
    num_layers: int
    blocks_path: str = ""
    calibration: dict[str, Any] = Field(default_factory=dict)
    damp: float = 0.01
    owl_lambda: float = OWL_LAMBDA
    owl_m: float = OWL_M
    scores: list[float | None] | None = Field(None, description="what the allocation read per block (LOD, metric)")
    predicted_loss: float | None = None
    loss_model: str | None = None
    exact_loss: str = Field("output_kl", description="exact allocation's loss: output_kl | block_error")
    exact_loss_tokens: int = Field(1024, description="calibration tokens the output_kl curves are measured on")
    notes: list[str] = Field(default_factory=list)
    provenance: dict[str, Any] = Field(default_factory=dict)

    def check(self) -> "SparsifyPlan":
        if len(self.levels) != self.num_layers:
            raise LayerscopeError(f"the plan has {len(self.levels)} levels for {self.num_layers} blocks")
        for s in self.levels:
            if not 0.0 <= s < 1.0:
                raise LayerscopeError(f"plan level {s} is not a sparsity in [0, 1)")
        if len(self.block_params) == self.num_layers:  # a hand-edited plan: what it really achieves
            self.achieved_sparsity = achieved(self.levels, self.block_params)
        return self


def achieved(levels: list[float], block_params: list[int]) -> float:
    n = np.asarray(block_params, dtype=float)
    return float((np.asarray(levels) * n).sum() / n.sum())


def spread_levels(values: list[float], sparsity: float, lam: float, *, more_is_denser: bool = True,
                  block_params: list[int] | None = None) -> list[float]:
    """OWL's rule: values rescaled to [0, 2λ], centred, added to the keep ratio (1 − S).

    The centring is parameter-weighted so the global sparsity is S also for blocks of unequal size
    (OWL's plain mean when all blocks are equal). Levels are clipped to [0, 0.99].
    """
    v = np.asarray(values, dtype=float)
    if np.isnan(v).any():
        raise LayerscopeError("the allocation scores have missing values")
    if not more_is_denser:
        v = -v
    span = v.max() - v.min()
    r = (v - v.min()) / span * (2 * lam) if span > 0 else np.zeros_like(v)
    w = np.ones_like(v) if block_params is None else np.asarray(block_params, dtype=float)
    keep = r - (r * w).sum() / w.sum() + (1 - sparsity)
    return [float(x) for x in np.clip(1 - keep, 0.0, 0.99)]


def outlier_ratio(scores: list, m: float) -> float:
    """% of the values above m × their mean (OWL's layer-wise outlier distribution, LOD)."""
    import torch

    flat = torch.cat([s.flatten().double() for s in scores])
    return float((flat > flat.mean() * m).double().mean() * 100)


def candidate_levels(sparsity: float, step: float = 0.05, span: int = 3) -> list[float]:
    """The grid the exact allocator chooses from: S ± k·step, inside [0, 0.95]."""
    out = sorted({round(sparsity + k * step, 4) for k in range(-span, span + 1)})
    return [s for s in out if 0.0 <= s <= 0.95]


def parse_allocation(allocation: str) -> tuple[str, str | None]:
    if allocation.startswith("metric:"):
        name = allocation.split(":", 1)[1]
        if not name:
            raise LayerscopeError("--allocation metric:NAME needs a metric name")
        return "metric", name
    if allocation not in ALLOCATIONS:
        raise LayerscopeError(f"--allocation must be one of {', '.join(ALLOCATIONS)} or metric:NAME, got '{allocation}'")
    return allocation, None
