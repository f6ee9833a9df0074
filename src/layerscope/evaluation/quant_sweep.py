"""Sweep: move 0 %..100 % of the blocks to a lower bit width in a metric's order; perplexity each time.

For every ordering (a metric's ranking, least important first, or a random permutation) and every
share p on the grid, the first round(p * L) blocks of the ordering are fake-quantized at the low
scheme and all other blocks at the high scheme; the model is evaluated with the full held-out
perplexity protocol (no prefix reuse). The reference is the all-high model (p = 0). An ordering's
*tolerated share* is the largest grid share p such that every share up to p stays within
(1 + threshold) x the reference perplexity (default threshold 5 %).

Fake-quant weights are bit-exact with HQQ's dequantized weights (see backend.py); each (block,
scheme) is quantized once and cached, so a grid point costs one perplexity evaluation.
"""
from __future__ import annotations

import math
import random
import time
from typing import Callable, Sequence

import torch
from pydantic import BaseModel, Field

from layerscope.compress.quant import FakeQuantizer, Scheme, WeightCache, full_name
from layerscope.errors import LayerscopeError

PRE_ROUNDED_NOTE = ("SmolLM2's shipped weights were already rounded to 4 bits (GGUF Q4_1, blocks of 32); the "
                    "baseline is that dequantized fp32 model, and the schemes used here (2/3-bit, and any width with "
                    "groups of 64/128 sharing one float16 scale and zero) lie off that Q4_1 grid, so they are not a "
                    "free re-rounding.")


class SweepRow(BaseModel):
    ordering: str
    share: float
    n_low: int
    perplexity: float
    low_blocks: list[int]


class SweepResult(BaseModel):
    model_id: str = ""
    high: dict
    low: dict
    protocol: dict
    threshold: float
    baseline_perplexity: float | None = Field(None, description="unquantized (fp32) model")
    reference_perplexity: float = Field(description="every block at the high scheme (share 0)")
    grid: list[float]
    rows: list[SweepRow]
    tolerated_share: dict[str, float]
    orderings: dict[str, list[int]]
    early_stop: bool = True
    notes: list[str] = Field(default_factory=list)
    wall_time_s: float | None = None

    def random_summary(self) -> dict[str, float] | None:
        vals = [v for k, v in self.tolerated_share.items() if k.startswith("random")]
        if not vals:
            return None
        m = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        return {"mean": m, "sd": sd, "min": min(vals), "max": max(vals), "n": len(vals)}


class Evaluator:
    """Perplexity of a model under fake-quant assignments, on one tokenized held-out stream."""

    def __init__(self, model, tokenizer, protocol=None, ids: torch.Tensor | None = None):
        from layerscope.evaluation.perplexity import PerplexityProtocol, token_stream
        from layerscope.model.adapter import find_parts

        self.model = model
        self.parts = find_parts(model)
        self.protocol = protocol or PerplexityProtocol()
        self.ids = ids if ids is not None else token_stream(tokenizer, self.protocol)
        self.fq = FakeQuantizer(self.parts, WeightCache())
        self._memo: dict[tuple, float] = {}
        self.evaluations = 0
        self.seconds = 0.0

    def block_assignment(self, block_schemes: Sequence[Scheme]) -> dict[str, Scheme]:
        return {full_name(self.parts, i, n): s for i, s in enumerate(block_schemes)
                for n in self.parts.block_linears(i)}

    def perplexity(self, assignment: dict[str, Scheme] | None) -> float:
        from layerscope.evaluation.perplexity import perplexity

        key = tuple(sorted((k, v) for k, v in (assignment or {}).items()))
        if key in self._memo:
            return self._memo[key]
        t0 = time.perf_counter()
        try:
            if assignment:
                self.fq.apply(assignment)
            r = perplexity(self.model, ids=self.ids, protocol=self.protocol)
        finally:
            self.fq.restore()
        self.seconds += time.perf_counter() - t0
        self.evaluations += 1
        self._memo[key] = r.perplexity
        return r.perplexity


def complete_ordering(order: Sequence[int], L: int) -> list[int]:
    """A ranking (which may skip undefined layers) extended to all L blocks, missing ones last."""
    seen = [i for i in order if 0 <= i < L]
    return seen + [i for i in range(L) if i not in set(seen)]


def random_orderings(L: int, seeds: Sequence[int]) -> dict[str, list[int]]:
    out = {}
    for s in seeds:
        order = list(range(L))
        random.Random(s).shuffle(order)
        out[f"random:{s}"] = order
    return out


def run_sweep(evaluator: Evaluator, orderings: dict[str, Sequence[int]], high: Scheme, low: Scheme,
              grid: Sequence[float] = tuple(k / 10 for k in range(11)), threshold: float = 0.05,
              early_stop: bool = True, baseline: bool = True, model_id: str = "",
              log: Callable[[str], None] | None = None) -> SweepResult:
    """Perplexity at every grid share for every ordering (see module doc)."""
    if not 0 < threshold < 10:
        raise LayerscopeError("threshold must be a positive fraction, e.g. 0.05 for 5 %")
    if low.bits >= high.bits and low.group_size >= high.group_size:
        raise LayerscopeError(f"the low scheme ({low.label}) must be cheaper than the high one ({high.label})")
    grid = sorted({round(float(p), 6) for p in grid} | {0.0})
    if grid[0] < 0 or grid[-1] > 1:
        raise LayerscopeError("sweep shares must lie in [0, 1]")
    L = evaluator.parts.num_layers
    t0 = time.perf_counter()
    say = log or (lambda m: None)
    base = evaluator.perplexity(None) if baseline else None
    if base is not None:
        say(f"baseline (fp32) perplexity {base:.4f}")
    ref = evaluator.perplexity(evaluator.block_assignment([high] * L))
    say(f"all blocks {high.label}: perplexity {ref:.4f}")
    limit = ref * (1 + threshold)
    rows: list[SweepRow] = []
    tolerated: dict[str, float] = {}
    full = {name: complete_ordering(o, L) for name, o in orderings.items()}
    for name, order in full.items():
        best, broken = 0.0, False
        for p in grid:
            k = int(round(p * L))
            if broken and early_stop:
                break
            low_set = sorted(order[:k])
            schemes = [low if i in set(low_set) else high for i in range(L)]
            ppl = ref if k == 0 else evaluator.perplexity(evaluator.block_assignment(schemes))
            rows.append(SweepRow(ordering=name, share=p, n_low=k, perplexity=ppl, low_blocks=low_set))
            say(f"{name:>28s} {p:4.0%} ({k:2d} blocks at {low.label}): perplexity {ppl:.4f}")
            if not broken and ppl <= limit:
                best = p
            else:
                broken = True
        tolerated[name] = best
    notes = [f"reference = every block at {high.label}; tolerated share = largest grid share with perplexity "
             f"<= {1 + threshold:.2f} x reference at it and every smaller share"]
    if early_stop:
        notes.append("an ordering stops at its first grid point above the limit (later points not evaluated)")
    return SweepResult(model_id=model_id, high=high.to_dict(), low=low.to_dict(),
                       protocol=evaluator.protocol.model_dump(), threshold=threshold, baseline_perplexity=base,
                       reference_perplexity=ref, grid=list(grid), rows=rows, tolerated_share=tolerated,
                       orderings={k: list(v) for k, v in full.items()}, early_stop=early_stop, notes=notes,
                       wall_time_s=round(time.perf_counter() - t0, 1))


def sweep_table_text(res: SweepResult) -> str:
    """Plain-text table: ordering x share -> perplexity, and the tolerated share."""
    names = list(res.orderings)
    shares = res.grid
    cell: dict[tuple[str, float], float] = {(r.ordering, r.share): r.perplexity for r in res.rows}
    w = max(12, *(len(n) for n in names)) + 1
    L = len(next(iter(res.orderings.values()))) if res.orderings else 0
    if len(shares) <= 12:
        lines = [f"{'ordering':<{w}}" + "".join(f"{p:>8.0%}" for p in shares) + "   tolerated"]
        for n in names:
            vals = "".join(f"{cell[(n, p)]:>8.2f}" if (n, p) in cell else f"{'·':>8s}" for p in shares)
            lines.append(f"{n:<{w}}{vals}   {res.tolerated_share[n]:>6.0%}")
    else:  # fine grid: list the evaluated points only
        lines = [f"{'ordering':<{w}} tolerated  evaluated points (blocks at low bits: perplexity)"]
        for n in names:
            pts = [r for r in res.rows if r.ordering == n]
            k = round(res.tolerated_share[n] * L)
            lines.append(f"{n:<{w}} {res.tolerated_share[n]:>5.0%} ({k:2d})  "
                         + ", ".join(f"{r.n_low}: {r.perplexity:.2f}" for r in pts))
    rs = res.random_summary()
    if rs:
        lines.append(f"random (n={rs['n']}): tolerated share mean {rs['mean']:.0%} ± {rs['sd']:.0%} "
                     f"(min {rs['min']:.0%}, max {rs['max']:.0%})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- report section
def attach(table, *, plan=None, evaluations: list[dict] | None = None, sweep: SweepResult | None = None,
           allocation_bench: list[dict] | None = None) -> None:
    """Store quantization results in `table.extras['quantization']` for the report section."""
    q = dict(table.extras.get("quantization") or {})
    if plan is not None:
        q["plan"] = plan.model_dump(mode="json")
    if evaluations is not None:
        q["evaluations"] = evaluations
    if sweep is not None:
        q["sweep"] = sweep.model_dump(mode="json")
    if allocation_bench is not None:
        q["allocation_bench"] = allocation_bench
    q.setdefault("notes", [PRE_ROUNDED_NOTE])
    table.extras["quantization"] = q


