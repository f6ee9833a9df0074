"""`quantize --ray`: the plan measurements of `--by measured` fanned out as Ray tasks, same numbers.

Two kinds of independent work: the trust-region search's trials (each candidate plan's ΔNLL on the
calibration sequences, `PlanScorer`) and the held-out evaluations (the unquantized model, the exact
plan and the uniform plan). Each Ray worker receives the model and the inputs once
(`engine.ray_pool.WorkerPool`) and runs exactly the local code on its items -- the same quantizer,
the same Hessians, the same forward passes with the caller's thread count -- so every number equals
the local run's and `plan.json`/`quantize.json` are the same files.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch


def _score_task(payload: dict, plan) -> torch.Tensor:
    """One search trial on a worker; the worker's PlanScorer (its base NLL and its cache of quantized
    (layer, scheme) weights) is built on its first trial and reused for the next ones."""
    from layerscope.actions.quantize_measured import PlanScorer
    from layerscope.model.adapter import find_parts

    if "scorer" not in payload:
        payload["scorer"] = PlanScorer(find_parts(payload["model"]), payload["batches"], tokens=payload["tokens"],
                                       hessians=payload["hessians"], act_order=payload["act_order"])
    return payload["scorer"](plan)


class RayPlanScorer:
    """`PlanScorer.many` with the plans dealt to Ray workers (in order; duplicates already removed by the search)."""

    def __init__(self, parts, batches, *, tokens: int, hessians=None, act_order: bool = False,
                 address: str | None = "local", workers: int | None = None):
        from layerscope.compress.quant_stats import leading_batches
        from layerscope.engine.ray_pool import WorkerPool

        payload = {"model": parts.model, "batches": leading_batches(batches, tokens), "tokens": tokens,
                   "hessians": hessians or {}, "act_order": act_order}
        self.pool = WorkerPool(payload, address, workers)

    def many(self, plans: Sequence[Any]) -> list[torch.Tensor]:
        return self.pool.map(_score_task, list(plans))

    def __enter__(self) -> "RayPlanScorer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.pool.close()


def _evaluate_task(payload: dict, plan):
    from layerscope.actions.quantize_measured import evaluate_plan
    from layerscope.model.adapter import find_parts

    return evaluate_plan(find_parts(payload["model"]), payload["ids"], payload["protocol"], payload["state"],
                         payload["sequential"], plan)


def evaluate_plans_ray(model, ids, protocol, state: dict, sequential: bool, plans: Sequence[Any],
                       address: str | None = "local", workers: int | None = None) -> list[tuple]:
    """`evaluate_plan` for each of `plans` (None: the unquantized model) as Ray tasks, in order.
    `state` must already hold GPTQ's inputs (batches, Hessians); only what the evaluation reads is sent."""
    from layerscope.engine.ray_pool import WorkerPool

    keep = ("losses", "batches", "damp", "act_order", "options", "tokens", "seq_len")
    payload = {"model": model, "ids": ids, "protocol": protocol, "sequential": sequential,
               "state": {k: state[k] for k in keep if k in state}}
    with WorkerPool(payload, address, workers) as pool:
        return pool.map(_evaluate_task, list(plans))
