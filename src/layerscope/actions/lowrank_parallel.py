"""`lowrank`'s independent work, run here or as Ray tasks (`--ray`) with the local run's numbers.

Two kinds of work, as in `sparsify` (actions/sparsify_parallel.py): the exact allocation's truncation-loss
curves, dealt out to Ray workers block by block (`loss_curves_ray`: every layer's curve depends only on
the dense model's statistics and, for the fisher loss, the dense model's output Fisher, which each worker
recomputes), and the jobs of applying a plan (actions/compress_jobs.py) -- factorizing the plan and the
uniform plan on copies of the dense model with their selection perplexities, and the held-out
perplexities -- for which this module supplies the factorization (`factorize_job`).
"""
from __future__ import annotations

from typing import Any

from layerscope.actions.compress_jobs import Shared
from layerscope.plans.lowrank import LowrankPlan


def _curve_rows(payload: tuple, blocks: list[int]) -> list[dict[str, list[float]]]:
    """Ray task: {layer: curve} of each of `blocks`, measured on the worker's copy of the dense model."""
    from layerscope.actions.lowrank import loss_curves
    from layerscope.model.adapter import find_parts

    model, ids, method, damp, keeps, loss = payload
    parts = find_parts(model)
    curves = loss_curves(parts, ids, method, damp, keeps, loss=loss, blocks=set(blocks))
    return [{n: c for n, c in curves.items() if n.startswith(f"{parts.blocks_path}.{i}.")} for i in blocks]


def loss_curves_ray(parts, ids, method: str, damp: float, keeps, loss: str = "fisher", *, address: str,
                    log=lambda m: None) -> dict[str, list[float]]:
    """`loss_curves` with the blocks dealt out round-robin to Ray workers (the same curves, bit for bit).

    Each worker repeats the statistics pass (and the fisher loss's one backward pass) over the dense model
    and factorizes the layers of its blocks only (the expensive part: one SVD per layer)."""
    from layerscope.engine.ray_pool import WorkerPool

    with WorkerPool((parts.model, ids, method, damp, list(keeps), loss), address) as pool:
        rows = pool.map_dealt(_curve_rows, parts.num_layers)
    curves: dict[str, list[float]] = {}
    for i, block in enumerate(rows):
        curves.update(block)
        log(f"  block {i}: measured {len(block)} layers at keep {list(keeps)}")
    return curves


def factorize_job(shared: Shared, model, plan: LowrankPlan) -> dict[str, Any]:
    """Compress function of a `compress_jobs.Job`: factorize `model` (a copy of the dense one) by `plan` with
    sequential statistics; "factors" are the {name: (A, B)} pairs, "losses" each layer's measured loss."""
    from layerscope.actions.lowrank import factorize_model
    from layerscope.model.adapter import find_parts

    factors, losses = factorize_model(find_parts(model), shared.ids, plan)
    return {"factors": factors, "losses": losses}
