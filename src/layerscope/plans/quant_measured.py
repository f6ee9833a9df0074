"""Per-linear bit allocation from losses measured for every candidate (`--by measured`).

Each linear layer is one unit; its options are the requested (bits x group) schemes as that layer
really gets them (`compress.quant_stats.effective_scheme`: GPTQ groups must divide the input
width), each with its storage cost in the plan's format and the loss estimate measured with the
actual quantizer (`compress.quant_stats.measure_candidates`). The exact MILP of `plans.allocator`
picks one option per layer under the bits-per-weight budget; the plan's `objective` is the
predicted increase of the mean next-token NLL (nats/token), checked later against the measured one.
The uniform baseline is costed with the same effective schemes. `measured_search` solves the same
MILP inside trust regions around the uniform plan and keeps the plan whose loss *measures* least
(`quantize --search`, the default).
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


def exact_plan(layers, losses, budget: float, *, fmt: str, num_layers: int, blocks_path: str, method: str,
               anchor: QuantPlan | None = None, max_changes: int | None = None) -> QuantPlan:
    """The exact MILP plan; with `anchor` and `max_changes`, at most that many layers leave the anchor's scheme."""
    from layerscope.plans.allocator import allocate_exact

    units = measured_units(layers, losses, fmt)
    n = sum(l.shape[0] * l.shape[1] for l in layers)
    labels = None
    if anchor is not None:
        labels = [Scheme(e.bits, e.group_size, method) for e in anchor.entries]
    alloc = allocate_exact(units, budget * n, labels, max_changes)
    return _plan(layers, alloc.chosen, strategy="milp", by="measured", fmt=fmt, budget=budget,
                 predicted=alloc.predicted_loss, num_layers=num_layers, blocks_path=blocks_path, method=method,
                 options=losses.options,
                 notes=[f"objective = predicted increase of the mean next-token NLL (nats/token): sum over layers of "
                        f"the {losses.loss_model} estimate of each candidate, measured with its quantizer"
                        + (", times the option's measured ÷ predicted ratio of its uniform plan"
                           if any(j.get("factor", 1.0) != 1.0 for j in losses.joint) else "")])


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


SEARCH_STEPS = (1, 2, 4, 8, 16, 32, 64, None)  # trust-region sizes tried (None: the unconstrained plan)
SEARCH_Z = 2.0  # a plan replaces the uniform one only when its mean gain exceeds this many standard errors


def measured_search(layers, losses, budget: float, score, *, fmt: str, num_layers: int, blocks_path: str,
                    method: str, steps: Sequence[int | None] = SEARCH_STEPS, z: float = SEARCH_Z,
                    log=lambda m: None) -> tuple[QuantPlan, list[dict]]:
    """The plan with the least *measured* loss among the uniform plan and the exact plans that leave it
    in at most k layers, k ∈ `steps` (None: no limit). `score(plans)` returns each plan's ΔNLL on each
    calibration sequence (nats/token) -- all plans at once, so they can be measured in parallel. The
    additive estimate chooses *which* layers change for a given k; the measurement decides how far from
    the uniform plan to go. A plan is preferred to the uniform one only when its gain, paired over the
    same sequences, exceeds `z` standard errors — near a good uniform plan the differences are of the
    size of the text-to-text noise, and a gain that is not clear on calibration text does not carry to
    held-out text. Returns (plan, trials)."""
    import numpy as np

    common = dict(fmt=fmt, num_layers=num_layers, blocks_path=blocks_path, method=method)
    uniform = uniform_plan(layers, losses.options, budget, losses=losses, **common)
    base_key = tuple((e.bits, e.group_size) for e in uniform.entries)
    plans: dict[tuple, tuple[int | None, QuantPlan]] = {}  # distinct plans, in the order of `steps`
    for k in [0, *steps]:
        p = uniform if k == 0 else exact_plan(layers, losses, budget, anchor=uniform, max_changes=k, **common)
        plans.setdefault(tuple((e.bits, e.group_size) for e in p.entries), (k, p))
    seqs = [np.asarray(s, dtype=float).reshape(-1) for s in score([p for _, p in plans.values()])]
    u_seq = seqs[0]
    best, best_m, trials = uniform, float(u_seq.mean()), []
    for (key, (k, p)), seq in zip(plans.items(), seqs):
        m = float(seq.mean())
        t = {"max_changes": k, "changed": sum(a != b for a, b in zip(key, base_key)), "predicted": p.objective,
             "measured": m, "bpw": p.achieved_bpw, "gain_vs_uniform": None, "standard_error": None,
             "clear_gain": None}
        if k != 0:
            d = u_seq - seq
            se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("inf")
            t.update(gain_vs_uniform=float(d.mean()), standard_error=se, clear_gain=bool(d.mean() > z * se))
            if t["clear_gain"] and m < best_m:
                best, best_m = p, m
        trials.append(t)
        log(f"  search: {'uniform' if k == 0 else f'≤ {k} changes' if k else 'unconstrained'}: {t['changed']} layers "
            f"changed, predicted ΔNLL {p.objective:.4g}, measured {m:.4g} nats/token"
            + (f" (gain {t['gain_vs_uniform']:+.4g} ± {t['standard_error']:.2g}{'' if t['clear_gain'] else ', not clear'})"
               if k else ""))
    best.notes.append(f"chosen by measurement on {u_seq.size} calibration sequences among the uniform plan and "
                      "exact plans leaving it in at most 1, 2, 4, ... 64 layers or any number (a plan replaces the "
                      f"uniform one only with a gain above {z:g} standard errors): "
                      + "; ".join(f"{t['changed']} changed → {t['measured']:.4g}" for t in trials))
    return best, trials
