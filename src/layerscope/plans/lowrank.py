"""LowrankPlan: a rank for every linear layer of every block (None = left dense), and how it was chosen.

Budget: the parameters of the blocks' linear layers shrink by `reduction` (a rank-r pair costs
r·(in + out), a dense layer in·out). Allocations:

* uniform: every layer at the rank whose factor pair holds (1 − reduction) of its parameters.
* exact: the one exact allocator (plans/allocator.py) over each layer's measured loss at keep
  fractions 0.1, 0.2, …, 0.9 of its parameters and "dense" (loss 0), with the loss the layer's
  relative output error on the calibration statistics, ‖(W − Ŵ)X‖² / ‖WX‖² (exact from XᵀX).
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from layerscope.errors import LayerscopeError
from layerscope.plans.base import Plan

ALLOCATIONS = ("uniform", "exact")
KEEP_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class RankEntry(BaseModel):
    name: str  # full module name
    block: int
    linear: str
    shape: list[int]  # [out, in]
    rank: int | None  # None: left dense
    params: int  # parameters after the plan (r·(in+out) or in·out)


class LowrankPlan(Plan):
    kind = "lowrank"

    method: str = Field(description="svd | whitened")
    reduction: float = Field(description="target fraction of the blocks' linear parameters removed")
    allocation: str = Field(description="uniform | exact")
    achieved_reduction: float
    num_layers: int
    blocks_path: str = ""
    entries: list[RankEntry]
    calibration: dict[str, Any] = Field(default_factory=dict)
    damp: float = 1e-4
    predicted_loss: float | None = None
    loss_model: str | None = None
    exact_loss: str | None = Field(None, description="exact allocation's loss: fisher (predicted ΔNLL) | relative")
    notes: list[str] = Field(default_factory=list)
    provenance: dict[str, Any] = Field(default_factory=dict)

    def ranks(self) -> dict[str, int | None]:
        return {e.name: e.rank for e in self.entries}

    def block_reduction(self) -> list[float]:
        """Fraction of each block's linear parameters removed."""
        out = []
        for i in range(self.num_layers):
            es = [e for e in self.entries if e.block == i]
            dense = sum(e.shape[0] * e.shape[1] for e in es)
            out.append(1 - sum(e.params for e in es) / dense if dense else 0.0)
        return out


def check_reduction(r: float) -> float:
    r = float(r)
    if not 0.0 < r < 1.0:
        raise LayerscopeError(f"--reduction must be in (0, 1), got {r:g}")
    return r


def achieved_reduction(entries: list[RankEntry]) -> float:
    dense = sum(e.shape[0] * e.shape[1] for e in entries)
    return 1 - sum(e.params for e in entries) / dense
