"""LiNeS (Wang et al. 2025, Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging).

The merged task vector is scaled linearly with depth: λ(ℓ) = α + β·ℓ/(L−1) for block ℓ of L, and α
for every parameter outside the blocks (embeddings, final norm, head), as the reference code does.
For merging T tasks the reference sets α = ‖Σ_t τ_t‖₁ / ‖τ_merged‖₁ / T, where τ_merged is the merge
method's combined vector with unit weights (for task arithmetic α = 1/T); β is chosen on validation
data there. Here β defaults to mean(λ) − α, so the deepest block keeps the uniform coefficient and the
shallower ones less; set `beta` (or choose it on a validation split, as bench/merge.py does).
"""
from __future__ import annotations

from typing import Any

import torch

from layerscope.actions.merge.groups import per_layer


def lines_alpha(ctx) -> float:
    """‖Σ τ_t‖₁ / ‖τ_merged‖₁ / T with the method's merge at unit weights."""
    from layerscope.actions.merge.methods import method

    combine = method(ctx.plan.method)
    T = len(ctx.deltas)
    if ctx.plan.method == "task_arithmetic":
        return 1.0 / T
    summed = merged = 0.0
    for name, base in ctx.base.items():
        ds = [d[name] for d in ctx.deltas]
        summed += float(torch.stack(ds).sum(0).abs().sum())
        gen = ctx.generator(name)
        merged += float((combine(torch.zeros_like(base, dtype=torch.float32), ds, [1.0] * T,
                                 ctx.plan.density, gen)).abs().sum())
    return summed / merged / T if merged > 0 else 1.0 / T


def coefficients(ctx) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    plan, L = ctx.plan, ctx.num_layers
    alpha = plan.alpha if plan.alpha is not None else lines_alpha(ctx)
    lams = ctx.lambdas()
    beta = plan.beta if plan.beta is not None else sum(lams) / len(lams) - alpha
    scale = [alpha + beta * (l / (L - 1) if L > 1 else 1.0) for l in range(L)]
    coefs = [per_layer(scale, embed=alpha, head=alpha) for _ in ctx.deltas]
    return coefs, {"alpha": alpha, "beta": beta, "alpha_rule": "given" if plan.alpha is not None else
                   "|sum of task vectors|_1 / |merged|_1 / T (LiNeS reference)",
                   "beta_rule": "given" if plan.beta is not None else "mean(lambda) - alpha"}
