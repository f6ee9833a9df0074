"""Per-linear bit allocation from losses measured for every candidate (`--by measured`).

Each linear layer is one unit; its options are the requested (bits x group) schemes as that layer
really gets them (`compress.quant_stats.effective_scheme`: GPTQ groups must divide the input
width), each with its storage cost in the plan's format and the loss estimate measured with the
actual quantizer (`compress.quant_stats.measure_candidates`). The exact MILP of `plans.allocator`
picks one option per layer under the bits-per-weight budget; the plan's `objective` is the
predicted increase of the mean next-token NLL (nats/token), checked later against the measured one.
The uniform baseline is costed with the same effective schemes.
"""
from __future__ import annotations

from typing import Sequence

from layerscope.compress.quant import Scheme, storage_bits
from layerscope.errors import LayerscopeError
from layerscope.plans.quantize import PlanEntry, QuantPlan


def measured_units(layers, losses, fmt: str):
    """UnitOptions per layer: effective schemes (deduplicated, least loss kept), costs, losses."""
    from layerscope.compress.quant_stats import effective_scheme
    from layerscope.plans.allocator import UnitOptions

    units = []
    for l in layers:
        row = losses.losses.get(l.name)
        if row is None:
            raise LayerscopeError(f"no measured losses for {l.name}")
        best: dict[Scheme, float] = {}
        for o, v in zip(losses.options, row):
            s = effective_scheme(o, l.shape)
            best[s] = min(v, best.get(s, float("inf")))
        opts = sorted(best)
        units.append(UnitOptions(l.name, opts, [float(storage_bits(l.shape, s, fmt)) for s in opts],
                                 [best[s] for s in opts]))
    return units


def _plan(layers, chosen: Sequence[Scheme], *, strategy: str, by: str, fmt: str, budget: float, predicted: float | None,
          num_layers: int, blocks_path: str, method: str, options: Sequence[Scheme], notes=()) -> QuantPlan:
    entries, n, bits_sum, nominal = [], 0, 0.0, 0.0
    for l, s in zip(layers, chosen):
        size = l.shape[0] * l.shape[1]
        b = storage_bits(l.shape, s, fmt)
        entries.append(PlanEntry(name=l.name, block=l.block, linear=l.linear, sublayer=l.sublayer, shape=l.shape,
                                 bits=s.bits, group_size=s.group_size, bpw=b / size))
        n, bits_sum, nominal = n + size, bits_sum + b, nominal + s.bits * size
    return QuantPlan(strategy=strategy, by=by, granularity="linear", method=method, fmt=fmt, budget_bpw=budget,
                     achieved_bpw=bits_sum / n, nominal_bits=nominal / n, objective=predicted,
                     options=[s.to_dict() for s in options], num_layers=num_layers, blocks_path=blocks_path,
                     entries=entries, notes=list(notes))


def exact_plan(layers, losses, budget: float, *, fmt: str, num_layers: int, blocks_path: str, method: str
               ) -> QuantPlan:
    from layerscope.plans.allocator import allocate_exact

    units = measured_units(layers, losses, fmt)
    n = sum(l.shape[0] * l.shape[1] for l in layers)
    alloc = allocate_exact(units, budget * n)
    return _plan(layers, alloc.chosen, strategy="milp", by="measured", fmt=fmt, budget=budget,
                 predicted=alloc.predicted_loss, num_layers=num_layers, blocks_path=blocks_path, method=method,
                 options=losses.options,
                 notes=["objective = predicted increase of the mean next-token NLL (nats/token): "
                        "sum over layers of ½ Σ_j F_j (E XᵀX/n Eᵀ)_jj, each candidate measured with its quantizer"])


def uniform_plan(layers, options: Sequence[Scheme], budget: float, *, fmt: str, num_layers: int, blocks_path: str,
                 method: str, losses=None) -> QuantPlan:
    """The best single option within the budget, costed as each layer really gets it (largest cost ≤ budget;
    among equal costs the most bits). Its predicted loss comes from `losses` when given."""
    from layerscope.compress.quant_stats import effective_scheme

    n = sum(l.shape[0] * l.shape[1] for l in layers)
    best = None
    for c, o in enumerate(options):
        chosen = [effective_scheme(o, l.shape) for l in layers]
        cost = sum(storage_bits(l.shape, s, fmt) for l, s in zip(layers, chosen)) / n
        if cost <= budget + 1e-12 and (best is None or (cost, o.bits) > (best[0], best[1].bits)):
            best = (cost, o, chosen, c)
    if best is None:
        raise LayerscopeError(f"no uniform option fits {budget:g} bpw")
    _, o, chosen, c = best
    predicted = None
    if losses is not None:
        predicted = float(sum(losses.losses[l.name][c] for l in layers))
    return _plan(layers, chosen, strategy="uniform", by=f"uniform {o.label}", fmt=fmt, budget=budget,
                 predicted=predicted, num_layers=num_layers, blocks_path=blocks_path, method=method,
                 options=options)
