"""`sparsify`'s independent work, run here or as Ray tasks (`--ray`) with the local run's numbers.

Kept apart from actions/sparsify.py (the passes, the plan and the apply flow) so that file reads in one
sitting. Two kinds of work: the exact allocation's loss curves, dealt out to Ray workers block by block
(`loss_curves_ray`), and the jobs of applying a plan (actions/compress_jobs.py) -- pruning the plan and
the uniform plan on copies of the dense model with their selection perplexities, and the held-out
perplexities -- for which this module supplies the pruning (`prune_job`) and the shared inputs.
"""
from __future__ import annotations

from typing import Any

from layerscope.actions.compress_jobs import Shared, eval_texts
from layerscope.plans.sparsify import SparsifyPlan


def _curve_rows(payload: tuple, blocks: list[int]) -> list[list[float]]:
    """Ray task: the loss-curve rows of `blocks`, measured on the worker's copy of the dense model."""
    from layerscope.actions.sparsify import loss_curves
    from layerscope.model.adapter import find_parts

    model, ids, method, pattern, levels, options = payload
    curves = loss_curves(find_parts(model), ids, method, pattern, levels, **options, blocks=set(blocks))
    return [curves[i] for i in blocks]


def loss_curves_ray(parts, ids, method: str, pattern: str, levels: list[float], *, address: str,
                    log=lambda m: None, **options) -> list[list[float]]:
    """`loss_curves` with the blocks dealt out round-robin to Ray workers (the same rows, bit for bit).

    Each worker repeats the cheap statistics pass over the dense model and measures the levels of its
    blocks only (the expensive part: one pruning and one loss measurement per block and level)."""
    from layerscope.engine.ray_pool import WorkerPool

    with WorkerPool((parts.model, ids, method, pattern, list(levels), options), address) as pool:
        curves = pool.map_dealt(_curve_rows, parts.num_layers)
    for i, row in enumerate(curves):
        log(f"  block {i}: loss " + " ".join(f"{s:.2f}:{e:.4g}" for s, e in zip(levels, row)))
    return curves


def prune_job(shared: Shared, model, arg: tuple[list[float], bool]) -> dict[str, Any]:
    """Compress function of a `compress_jobs.Job`: prune `model` (a copy of the dense one) at `levels` with
    sequential statistics; "measured" is each block's loss, "kl" (when asked) KL(dense ‖ pruned) on the
    first `kl_rows` calibration windows, the curves' own loss with every block pruned at once."""
    from layerscope.actions.sparsify import prune_model
    from layerscope.compress.blockwise import OutputTap
    from layerscope.model.adapter import find_parts

    levels, kl = arg
    o = shared.options
    out: dict[str, Any] = {"measured": prune_model(find_parts(model), shared.ids, o["method"], o["pattern"], levels,
                                                   damp=o["damp"])}
    if kl:
        out["kl"] = OutputTap(find_parts(shared.dense), shared.ids[:o["kl_rows"]]).kl_of(find_parts(model))
    return out


def shared_inputs(lm, plan: SparsifyPlan, ids, *, evaluate: bool, compare: bool, eval_tokens: int,
                  select_tokens: int) -> Shared:
    """The dense model, calibration windows and evaluation token streams the jobs of this run read.

    kl_rows: calibration windows of the output KL, measured (exact plans with output_kl) only when the
    dense model is kept for a comparison or an evaluation anyway; None: not measured."""
    from layerscope.actions.sparsify import _loss_rows

    kl = plan.allocation == "exact" and plan.exact_loss == "output_kl" and (compare or evaluate)
    return Shared(dense=lm.model, tokenizer=lm.tokenizer, ids=ids,
                  texts=eval_texts(lm.tokenizer, compare=compare, evaluate=evaluate, select_tokens=select_tokens,
                                   eval_tokens=eval_tokens),
                  options={"method": plan.method, "pattern": plan.pattern, "damp": plan.damp,
                           "kl_rows": _loss_rows(ids, plan.exact_loss_tokens) if kl else None})
