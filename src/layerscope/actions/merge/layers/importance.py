"""Importance: per-layer, per-task coefficients from measured layer importance.

c_{t,g,ℓ} = λ_t · min(r_{t,g,ℓ}, cap), where r is task t's relative importance of sublayer g of block ℓ
(mean 1 over the blocks), so the task vector is kept where it matters for its task and shrunk where it
does not (the layer-wise view of LiNeS, AdaMerging and aTLAS; Expert Merging++ uses task-vector
magnitude as its layer importance). Parameters outside the blocks keep λ_t. Two sources:

* ``task_vectors`` (no data): r ∝ ‖τ_{t,g,ℓ}‖ / ‖θ₀_{g,ℓ}‖ (how far fine-tuning moved the sublayer),
  divided by 1 + Σ_{u≠t} max(0, cos(τ_t, τ_u)) at that sublayer (aligned task vectors would be counted
  twice when added).
* ``scores``: a ScoreTable of each fine-tuned model on its own task's data (a file per task, or scanned
  now with metric `by`, e.g. ``taylor`` or ``ablation_dloss``); r = 2·rank/(L−1), rank 0 = least
  important under the column's direction (`importance_order`), so r spans [0, 2] with mean 1. Per
  sublayer when the table has ``by@attention`` / ``by@mlp`` columns; layers it leaves undefined get 1.
"""
from __future__ import annotations

from typing import Any

import torch

from layerscope.actions.merge.groups import LAYER_GROUPS
from layerscope.errors import LayerscopeError


def _mean_one(values: list[float]) -> list[float]:
    m = sum(values) / len(values)
    return [v / m for v in values] if m > 0 else [1.0] * len(values)


def task_vector_importance(ctx) -> tuple[list[dict[str, list[float]]], dict[str, Any]]:
    T, L = len(ctx.deltas), ctx.num_layers
    base_sq = torch.zeros(len(LAYER_GROUPS), L, dtype=torch.float64)
    dots = torch.zeros(T, T, len(LAYER_GROUPS), L, dtype=torch.float64)
    for name, info in ctx.infos.items():
        if info.layer is None:
            continue
        g = LAYER_GROUPS.index(info.group)
        flat = torch.stack([d[name].reshape(-1).double() for d in ctx.deltas])
        dots[:, :, g, info.layer] += flat @ flat.T
        base_sq[g, info.layer] += float(ctx.base[name].double().pow(2).sum())
    sq = torch.diagonal(dots, dim1=0, dim2=1).permute(2, 0, 1)  # [T, G, L]
    norm = sq.clamp_min(0).sqrt()
    cos = dots / (norm[:, None] * norm[None, :]).clamp_min(1e-30)
    rel = norm / base_sq.sqrt().clamp_min(1e-30)
    out, cos_out = [], {}
    for t in range(T):
        overlap = sum(cos[t, u].clamp_min(0) for u in range(T) if u != t) if T > 1 else torch.zeros_like(rel[t])
        r = rel[t] / (1 + overlap)
        out.append({g: _mean_one(r[gi].tolist()) for gi, g in enumerate(LAYER_GROUPS)})
    if T > 1:
        cos_out = {g: [float(cos[0, 1, gi, l]) for l in range(L)] for gi, g in enumerate(LAYER_GROUPS)}
    return out, {"relative_norm": [{g: rel[t, gi].tolist() for gi, g in enumerate(LAYER_GROUPS)} for t in range(T)],
                 "cosine_task0_task1": cos_out}


def _rank_importance(values: list[Any], direction: str | None, L: int) -> list[float] | None:
    from layerscope.metrics.order import importance_order

    order = importance_order(values, direction)
    if not order:
        return None
    r = [1.0] * L
    n = len(order)
    for rank, layer in enumerate(order):
        r[layer] = 2.0 * rank / (n - 1) if n > 1 else 1.0
    return r


def score_importance(ctx) -> tuple[list[dict[str, list[float]]], dict[str, Any]]:
    plan, L = ctx.plan, ctx.num_layers
    out, used = [], []
    for t, table in enumerate(ctx.score_tables()):
        table.check_same_model(None, L, where=f"the score table of model {t}")
        block = table.column(plan.by)
        if block.direction is None:
            raise LayerscopeError(f"'{plan.by}' is descriptive (no importance direction): choose a ranked metric")
        rb = _rank_importance(block.values, block.direction, L)
        if rb is None:
            raise LayerscopeError(f"'{plan.by}' does not vary over the blocks of model {t}: it ranks nothing")
        coefs = {"block": rb}
        for g in ("attention", "mlp"):
            key = f"{plan.by}@{g}"
            col = table.columns.get(key)
            rg = _rank_importance(col.values, col.direction, L) if col is not None else None
            coefs[g] = rg if rg is not None else rb
            used.append(key if rg is not None else f"{plan.by} (block) for {g}")
        out.append(coefs)
    return out, {"by": plan.by, "columns": sorted(set(used)), "sources": ctx.score_sources}


def coefficients(ctx) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    plan = ctx.plan
    rel, details = (task_vector_importance if plan.importance == "task_vectors" else score_importance)(ctx)
    lams = ctx.lambdas()
    coefs = []
    for lam, r in zip(lams, rel):
        c = {g: [lam * min(max(v, 0.0), plan.cap) for v in r[g]] for g in LAYER_GROUPS}
        coefs.append({**c, "embed": lam, "head": lam})
    return coefs, {"source": plan.importance, "cap": plan.cap, "lambdas": lams,
                   "relative_importance": rel, **details}
