"""`merge --lambda-grid`: choose the task-vector scale λ on held-out text of every task.

Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic"), TIES-Merging (Yadav et al.
2023), DARE (Yu et al. 2024) and LiNeS (Wang et al. 2025) all pick the scaling λ of the task vectors on
held-out validation data: the merge is only as good as that λ, and the best one differs by method, layer
scheme and models. For every grid value g this module merges with λ_t = g·λ_t (the given or default λ of
each fine-tuned model, the same scale for all of them) by the plan's method and layer scheme, and
measures each task's mean next-token NLL on held-out text of that task; the grid value with the least
mean task NLL wins (ties: the smaller λ, the more conservative merge).

Held-out text is never what AdaMerging or the importance scans read: for a built-in corpus it is its
"evaluation" split (those read "calibration"); for a file, every 5th document (the last one when there
are fewer than five) is held out, and while a grid runs the schemes read only the other documents.

Grid points are independent: `run_grid` hands them to `engine.ray_pool.task_runner`, so with `ray` each
point is a Ray task running the same `grid_point` function on the same token streams as a local run.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from layerscope.actions.merge.context import MergeContext
from layerscope.errors import LayerscopeError
from layerscope.plans.merge import MergePlan

CHOICE_RULE = "least mean task NLL on held-out text (ties: the smaller λ)"
HOLD_OUT_EVERY = 5


def _is_builtin(source: str) -> bool:
    from layerscope.data.splits import BUILTIN_SOURCES

    return source in BUILTIN_SOURCES


def held_out_indices(n: int) -> set[int]:
    """Which of a file's n documents are held out: every 5th, or the last one of a short file."""
    if n < 2:
        raise LayerscopeError("--lambda-grid holds out part of each task's data file: it needs at least two "
                              "documents (blank-line-separated blocks, or lines of a .jsonl/.csv)")
    return set(range(HOLD_OUT_EVERY - 1, n, HOLD_OUT_EVERY)) or {n - 1}


def task_texts(source: str, split: str) -> list[str]:
    """A task's documents of `split`: "calibration" (what the schemes read) or "evaluation" (held out)."""
    from layerscope.data.sources import load_texts

    if _is_builtin(source):
        return load_texts(source, split=split)
    docs = load_texts(source)
    held = held_out_indices(len(docs))
    return [d for i, d in enumerate(docs) if (i in held) == (split == "evaluation")]


def held_out_stream(tokenizer: Any, texts: list[str], max_tokens: int) -> torch.Tensor:
    """The held-out documents as one token stream (EOS after each, BOS first when the tokenizer adds one),
    at most `max_tokens` text tokens -- the layout of `evaluation.perplexity.token_stream`."""
    from layerscope.evaluation.perplexity import adds_bos

    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for text in texts:
        ids += list(tokenizer(text, add_special_tokens=False)["input_ids"]) + ([eos] if eos is not None else [])
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    if adds_bos(tokenizer):
        ids = [tokenizer.bos_token_id] + ids
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class GridShared:
    """What every grid point reads (the Ray payload, put into the object store once)."""

    ctx: MergeContext  # base, task vectors and the plan with its per-model λ
    streams: list[torch.Tensor]  # per task: held-out token stream
    protocols: list[Any]  # per task: the PerplexityProtocol the stream is measured under


def prepare(ctx: MergeContext) -> GridShared:
    """Every task's held-out token stream, made once on the caller (workers need no data files)."""
    from layerscope.evaluation.perplexity import PerplexityProtocol

    plan, streams, protocols = ctx.plan, [], []
    for t, src in enumerate(plan.models):
        if not src.data:
            raise LayerscopeError(f"--lambda-grid measures every task on its held-out text: give --data for "
                                  f"model {t} ({src.model})")
        split = "evaluation" if _is_builtin(src.data) else f"held-out documents (every {HOLD_OUT_EVERY}th)"
        ids = held_out_stream(ctx.tokenizer, task_texts(src.data, "evaluation"), plan.tokens)
        protocols.append(PerplexityProtocol(dataset=src.data, split=split, context_length=plan.seq_len,
                                            stride=plan.seq_len, max_tokens=plan.tokens, batch_size=plan.batch))
        streams.append(ids)
    return GridShared(ctx=ctx, streams=streams, protocols=protocols)


def scaled_plan(plan: MergePlan, lambdas: list[float], g: float) -> MergePlan:
    """The plan at grid value g: λ_t·g for every task, coefficients to be resolved by the layer scheme."""
    return plan.model_copy(update={"lambdas": [g * lam for lam in lambdas], "coefficients": None, "details": {}})


def grid_point(shared: GridShared, g: float) -> dict[str, Any]:
    """One grid point: resolve the plan at λ·g, merge a copy of the base, and its NLL on each task's held-out
    text. Module-level, so a Ray task ships it by reference; returns the resolved plan with the numbers."""
    from layerscope.actions.merge.apply import merged_state
    from layerscope.evaluation.perplexity import perplexity

    base = shared.ctx
    ctx = dataclasses.replace(base, plan=scaled_plan(base.plan, base.lambdas(), g), score_sources=[])
    plan = ctx.resolve()
    model = copy.deepcopy(base.model)
    state = merged_state(ctx, plan.coefficients)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[name].to(p.dtype))
    tasks = []
    for src, ids, proto in zip(plan.models, shared.streams, shared.protocols):
        r = perplexity(model, base.tokenizer, proto, ids=ids)
        tasks.append({"model": src.model, "data": src.data, "nll": r.mean_nll, "perplexity": r.perplexity,
                      "tokens": r.tokens_scored})
    mean = sum(t["nll"] for t in tasks) / len(tasks)
    point = {"lambda": g, "lambdas": plan.lambdas, "tasks": tasks, "mean_nll": mean,
             "mean_perplexity": math.exp(mean)}
    return {"point": point, "plan": plan.model_copy(update={"lambda_grid": None}).to_dict()}


def choose(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The point with the least mean task NLL; among equal ones the smaller λ."""
    return min(points, key=lambda p: (p["mean_nll"], p["lambda"]))


def run_grid(ctx: MergeContext, ray: str | None = None) -> tuple[MergeContext, dict[str, Any]]:
    """Evaluate every grid value (here, or as Ray tasks on `ray`) and return the context with the chosen,
    resolved plan (its λ = chosen g · λ) and the grid's record for merge.json."""
    from layerscope.engine.ray_pool import task_runner

    grid = list(ctx.plan.lambda_grid or [])
    shared = prepare(ctx)
    with task_runner(shared, grid_point, ray) as run:
        results = run(grid)
    points = [r["point"] for r in results]
    best = choose(points)
    chosen = results[points.index(best)]["plan"]
    record = {"grid": grid, "lambdas": ctx.lambdas(), "rule": CHOICE_RULE, "chosen": best["lambda"],
              "chosen_lambdas": best["lambdas"], "points": points,
              "evaluation": [p.describe() for p in shared.protocols]}
    return dataclasses.replace(ctx, plan=MergePlan.from_dict(chosen, where="chosen grid plan")), record
