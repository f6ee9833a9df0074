"""MergePlan: which fine-tuned models to merge into which base, by which method and layer scheme.

`plan_merge(...)` resolves the request into per-task, per-layer, per-sublayer coefficients (for
``importance`` and ``adamerging`` that means measuring / learning them); `layerscope merge --dry-run`
prints that plan and `--plan FILE` applies it without measuring again, so the same plan always gives
the same model. Edit `coefficients` by hand to merge with your own.
"""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from layerscope.plans.base import Plan


class MergeSource(BaseModel):
    """One fine-tuned model and (for importance from scores, and AdaMerging) its task's unlabelled data."""

    model_config = ConfigDict(extra="forbid")
    model: str
    data: str | None = Field(None, description="'wikipedia', 'shakespeare' or a .txt/.jsonl/.csv file of task inputs")
    entropy: Literal["all", "last"] = Field("all", description="AdaMerging: entropy at every position or the last")
    scores: str | None = Field(None, description="importance from scores: this model's scores.json (else scanned)")


class MergePlan(Plan):
    kind = "merge"

    base: str = Field(description="the pre-trained model every task vector is taken from")
    models: list[MergeSource] = Field(min_length=1)
    method: Literal["task_arithmetic", "ties", "dare_ties"] = "task_arithmetic"
    layers: Literal["uniform", "lines", "importance", "adamerging"] = "uniform"
    lambdas: list[float] | None = Field(None, description="λ per task (uniform coefficient); null = 1.0 each")
    lambda_grid: list[float] | None = Field(
        None, description="scales g of every λ to try on held-out task text; the least mean NLL wins (null: no grid)")
    density: float = Field(0.5, gt=0, le=1, description="ties / dare_ties: share of each task vector kept")
    alpha: float | None = Field(None, description="lines: scale of the first block; null = LiNeS's rule")
    beta: float | None = Field(None, description="lines: added at the last block; null = mean(λ) − α")
    importance: Literal["task_vectors", "scores"] = "task_vectors"
    by: str = Field("taylor", description="importance from scores: the ranked ScoreTable column")
    cap: float = Field(2.0, gt=0, description="importance: largest relative coefficient")
    tokens: int = Field(1024, ge=16, description="tokens per task for scans and AdaMerging")
    seq_len: int = Field(128, ge=8)
    steps: int = Field(20, ge=0, description="AdaMerging: optimiser steps")
    lr: float = Field(0.02, gt=0)
    patience: int = Field(3, ge=1, description="AdaMerging: stop after this many steps without held-out gain")
    batch: int = Field(8, ge=1)
    init: float | None = Field(None, description="AdaMerging: starting coefficient; null = λ_t")
    seed: int = 0
    coefficients: list[dict[str, Any]] | None = Field(
        None, description="resolved: per task {attention|mlp|block: [one per block], embed, head}")
    details: dict[str, Any] = Field(default_factory=dict, description="how the coefficients were obtained")

    @field_validator("lambda_grid")
    @classmethod
    def _grid_positive(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or not all(math.isfinite(g) and g > 0 for g in v)):
            raise ValueError(f"the λ grid needs one or more finite values > 0, got {v}")
        return v

    @model_validator(mode="after")
    def _grid_unresolved(self) -> "MergePlan":
        if self.lambda_grid and self.coefficients is not None:
            raise ValueError("a plan with a λ grid is resolved per grid point: drop its coefficients or its grid")
        return self

    def describe(self) -> str:
        return (f"{self.method} of {len(self.models)} model(s) into {self.base} with {self.layers} layer coefficients"
                + (f" ({self.importance})" if self.layers == "importance" else ""))


def plan_merge(base: str, models: list[str | dict | MergeSource], **request: Any) -> MergePlan:
    """Resolve a merge request into a plan with its coefficients (measured or learned where the scheme says).
    A plan with a λ grid stays unresolved: `merge` resolves it at every grid point and keeps the best."""
    from layerscope.actions.merge.context import load_context

    srcs = [m.model_dump() if isinstance(m, MergeSource) else dict(m) if isinstance(m, dict) else {"model": str(m)}
            for m in models]
    plan = MergePlan.from_dict({"base": str(base), "models": srcs, **request}, where="merge request")
    if plan.lambda_grid:
        return plan
    return load_context(plan).resolve()
