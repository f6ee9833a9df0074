"""Bit allocation under an average bits-per-weight budget, solved exactly, and its baselines.

Problem. Units u (blocks, or single linear layers) each pick one option c (bit width, group size)
from a set. Storage cost is counted in real bits, scales and zeros included (see
`backend.storage_bits` for the formula of each library format). Choose x[u, c] in {0, 1} to

    minimise   sum_u sum_c err[u, c] * x[u, c]
    subject to sum_c x[u, c] = 1                                   (one option per unit)
               sum_u sum_c bits[u, c] * x[u, c] <= budget * N      (N = weights covered)

solved exactly as a 0/1 integer program with `scipy.optimize.milp` (HiGHS branch and bound, relative
gap 0), so the plan is optimal for its error model and never over budget.

Error models, best first:

* measured KL: err[u, c] = KL_u(c), the mean KL(full || block u quantized with c) on calibration
  text (metric `quant_sensitivity` recorded at every bit width). Options not measured are
  extrapolated from the nearest measured bit width by the ratio of weight relative MSEs.
* importance x distortion: err[u, c] = s_u * mse_u(c), with s_u the unit's score under a ScoreTable
  metric, oriented by its direction and min-max scaled to [0.1, 1.1] (every layer costs something),
  and mse_u(c) the relative squared quantization error ||W - Q(W)||^2 / ||W||^2 measured on the
  weights (or 4^-bits when no weights are given).

Baselines at the same budget: uniform bits, llama.cpp's layer rule, random placement.
"""
from __future__ import annotations

import math
import random as _random
from typing import Any, Callable, Sequence

import numpy as np
from pydantic import BaseModel

from layerscope.compress.quant import (
    UNQUANTIZED,
    Scheme,
    bits_per_weight,
    check_scheme,
    storage_bits,
)
from layerscope.errors import LayerscopeError
from layerscope.plans.allocator import solve  # noqa: F401  (the one exact allocator; re-exported)
from layerscope.plans.quantize import PlanEntry, QuantPlan

# --------------------------------------------------------------------------- plan model


# --------------------------------------------------------------------------- units
class Layer(BaseModel):
    name: str
    block: int
    linear: str
    sublayer: str
    shape: list[int]


def model_layers(parts) -> list[Layer]:
    """Every weight layer of every block (what a plan covers)."""
    out = []
    for i in range(parts.num_layers):
        for lin, m in parts.block_linears(i).items():
            w = m.weight
            shape = list(w.shape) if type(m).__name__ != "Conv1D" else [w.shape[1], w.shape[0]]
            out.append(Layer(name=f"{parts.blocks_path}.{i}.{lin}", block=i, linear=lin,
                             sublayer=parts.sublayer_of(lin), shape=shape))
    return out


def make_units(layers: Sequence[Layer], granularity: str = "block") -> list[list[int]]:
    """Indices into `layers` grouped into allocation units."""
    if granularity == "block":
        blocks: dict[int, list[int]] = {}
        for k, l in enumerate(layers):
            blocks.setdefault(l.block, []).append(k)
        return [blocks[b] for b in sorted(blocks)]
    if granularity == "linear":
        return [[k] for k in range(len(layers))]
    raise LayerscopeError(f"unknown granularity '{granularity}' (block or linear)")


def parse_options(bits: Sequence[int], groups: Sequence[int], method: str = "rtn") -> list[Scheme]:
    """All (bits, group) combinations; 16 bits (unquantized) has no group."""
    if not bits:
        raise LayerscopeError("no bit widths given")
    if not groups:
        raise LayerscopeError("no group sizes given")
    out: list[Scheme] = []
    for b in sorted(set(bits)):
        if b == UNQUANTIZED:
            out.append(Scheme(UNQUANTIZED, 0, method))
            continue
        for g in sorted(set(groups)):
            out.append(check_scheme(b, g, method))
    return out


def cost_matrix(layers: Sequence[Layer], units: list[list[int]], options: Sequence[Scheme], fmt: str) -> np.ndarray:
    """[U, C] storage bits."""
    C = np.zeros((len(units), len(options)))
    for u, idx in enumerate(units):
        for c, s in enumerate(options):
            C[u, c] = sum(storage_bits(layers[k].shape, s, fmt) for k in idx)
    return C


def total_params(layers: Sequence[Layer]) -> int:
    return sum(l.shape[0] * l.shape[1] for l in layers)


# --------------------------------------------------------------------------- exact solver
def check_budget(budget_bpw: float, cost: np.ndarray, n_params: int, options: Sequence[Scheme], fmt: str) -> None:
    """One-line errors for budgets no plan can meet or that leave nothing to allocate."""
    if not isinstance(budget_bpw, (int, float)) or not math.isfinite(budget_bpw):
        raise LayerscopeError(f"budget must be a finite number of bits per weight, got {budget_bpw!r}")
    nominal = sorted({s.bits for s in options})
    lo, hi = cost.min(axis=1).sum() / n_params, cost.max(axis=1).sum() / n_params
    if budget_bpw < nominal[0]:
        raise LayerscopeError(f"budget {budget_bpw:g} bpw is below the smallest bit width ({nominal[0]} bits)")
    if budget_bpw < lo - 1e-12:
        raise LayerscopeError(
            f"budget {budget_bpw:g} bpw is below the cheapest plan: {lo:.4f} bpw in the {fmt} format "
            f"(every layer at its cheapest option, scales and zeros included)"
        )
    if budget_bpw > hi + 1e-12:
        raise LayerscopeError(
            f"budget {budget_bpw:g} bpw is above the largest option: every layer at "
            f"{max(options, key=lambda s: s.bits).label} costs {hi:.4f} bpw in the {fmt} format; nothing to allocate"
        )


# --------------------------------------------------------------------------- error models
def relative_mse_table(layers: Sequence[Layer], options: Sequence[Scheme], weights: dict[str, Any] | None,
                       ) -> np.ndarray:
    """[layers, options] relative squared quantization error, measured (weights) or 4^-bits."""
    from layerscope.compress.quant import relative_mse

    M = np.zeros((len(layers), len(options)))
    for k, l in enumerate(layers):
        for c, s in enumerate(options):
            if not s.quantized:
                M[k, c] = 0.0
            elif weights is None:
                M[k, c] = 4.0 ** (-s.bits)
            else:
                M[k, c] = relative_mse(weights[l.name], s)
    return M


def unit_mse(layers: Sequence[Layer], units: list[list[int]], mse: np.ndarray) -> np.ndarray:
    """Parameter-weighted mean relative MSE per unit."""
    out = np.zeros((len(units), mse.shape[1]))
    for u, idx in enumerate(units):
        n = np.array([layers[k].shape[0] * layers[k].shape[1] for k in idx], dtype=float)
        out[u] = (n[:, None] * mse[idx]).sum(0) / n.sum()
    return out


def orient(values: Sequence[float], direction: str | None) -> np.ndarray:
    """Importance scaled to [0.1, 1.1]: larger = more important, whatever the metric's direction."""
    v = np.asarray(values, dtype=float)
    if direction not in ("higher", "lower"):
        raise LayerscopeError("a descriptive metric (no direction) cannot rank layers for allocation")
    if direction == "lower":
        v = -v
    if np.isnan(v).any():
        fill = np.nanmedian(v) if not np.isnan(v).all() else 0.0
        v = np.where(np.isnan(v), fill, v)
    span = v.max() - v.min()
    return 0.1 + ((v - v.min()) / span if span > 0 else np.zeros_like(v))


def errors_from_importance(importance_per_block: Sequence[float], layers: Sequence[Layer], units: list[list[int]],
                           mse: np.ndarray, importance_per_layer: Sequence[float] | None = None) -> np.ndarray:
    """err[u, c] = importance_u * mse_u(c)."""
    um = unit_mse(layers, units, mse)
    imp = np.zeros(len(units))
    for u, idx in enumerate(units):
        if importance_per_layer is not None:
            imp[u] = float(np.mean([importance_per_layer[k] for k in idx]))
        else:
            imp[u] = float(importance_per_block[layers[idx[0]].block])
    return imp[:, None] * um


def errors_from_kl(kl: dict[Scheme, Sequence[float]], layers: Sequence[Layer], units: list[list[int]],
                   options: Sequence[Scheme], mse: np.ndarray) -> np.ndarray:
    """err[u, c] from per-block KL measured at some options (scheme -> [L] values).

    An option not measured takes the KL of the measured option nearest in bits (same group size
    preferred) times the ratio of the unit's weight relative MSEs. With linear granularity a
    block's KL is shared among its layers in proportion to each layer's squared weight error.
    """
    if not kl:
        raise LayerscopeError("no measured quantization sensitivities to allocate with")
    measured = [s for s in kl]
    n_par = np.array([l.shape[0] * l.shape[1] for l in layers], dtype=float)

    def ref_for(s: Scheme) -> Scheme:
        same = [m for m in measured if m.group_size == s.group_size] or measured
        return min(same, key=lambda m: (abs(m.bits - s.bits), -m.bits))

    # relative MSE of the measured reference options (computed on the same layers)
    err = np.zeros((len(units), len(options)))
    for c, s in enumerate(options):
        if not s.quantized:
            continue
        r = ref_for(s)
        exact = (r.bits, r.group_size) == (s.bits, s.group_size)
        for u, idx in enumerate(units):
            block = layers[idx[0]].block
            kl_b = float(kl[r][block]) if kl[r][block] is not None else float("nan")
            # squared error of the unit under s, and of the whole block under s / under r
            blk = [k for k, l in enumerate(layers) if l.block == block]
            sq_s = (n_par[blk] * mse[blk, c]).sum()
            if exact:
                ratio = 1.0
            else:
                rc = next((k for k, o in enumerate(options)
                           if (o.bits, o.group_size) == (r.bits, r.group_size)), None)
                if rc is None:
                    raise LayerscopeError(f"measured option {r.label} is not among the allocation options")
                sq_r = (n_par[blk] * mse[blk, rc]).sum()
                ratio = sq_s / sq_r if sq_r > 0 else 0.0
            share = (n_par[idx] * mse[idx, c]).sum() / sq_s if sq_s > 0 else len(idx) / len(blk)
            err[u, c] = max(kl_b, 0.0) * ratio * share
    return err


# --------------------------------------------------------------------------- plans
def build_plan(layers: Sequence[Layer], units: list[list[int]], options: Sequence[Scheme], choice: Sequence[int],
               *, strategy: str, fmt: str, budget_bpw: float | None, by: str | None = None,
               objective: float | None = None, granularity: str = "block", num_layers: int | None = None,
               blocks_path: str = "", notes: Sequence[str] = ()) -> QuantPlan:
    entries: list[PlanEntry | None] = [None] * len(layers)
    for u, idx in enumerate(units):
        s = options[choice[u]]
        for k in idx:
            l = layers[k]
            entries[k] = PlanEntry(name=l.name, block=l.block, linear=l.linear, sublayer=l.sublayer, shape=l.shape,
                                   bits=s.bits, group_size=s.group_size, bpw=bits_per_weight(l.shape, s, fmt))
    es = [e for e in entries if e is not None]
    n = total_params(layers)
    achieved = sum(storage_bits(e.shape, Scheme(e.bits, e.group_size), fmt) for e in es) / n
    nominal = sum(e.bits * e.shape[0] * e.shape[1] for e in es) / n
    method = options[0].method if options else "rtn"
    return QuantPlan(strategy=strategy, by=by, granularity=granularity, method=method, fmt=fmt,
                     budget_bpw=budget_bpw, achieved_bpw=achieved, nominal_bits=nominal, objective=objective,
                     options=[s.to_dict() for s in options],
                     num_layers=num_layers if num_layers is not None else (max(l.block for l in layers) + 1),
                     blocks_path=blocks_path, entries=es, notes=list(notes))


def allocate(layers: Sequence[Layer], options: Sequence[Scheme], budget_bpw: float, err_fn: Callable[[list[list[int]]], np.ndarray],
             *, fmt: str = "hqq", granularity: str = "block", by: str | None = None, num_layers: int | None = None,
             blocks_path: str = "", notes: Sequence[str] = ()) -> QuantPlan:
    """Optimal plan for the error model `err_fn(units) -> [U, C]` within `budget_bpw`."""
    units = make_units(layers, granularity)
    cost = cost_matrix(layers, units, options, fmt)
    n = total_params(layers)
    check_budget(budget_bpw, cost, n, options, fmt)
    err = np.asarray(err_fn(units), dtype=float)
    choice, obj = solve(err, cost, budget_bpw * n)
    return build_plan(layers, units, options, choice, strategy="milp", fmt=fmt, budget_bpw=budget_bpw, by=by,
                      objective=obj, granularity=granularity, num_layers=num_layers, blocks_path=blocks_path,
                      notes=notes)


def uniform_plan(layers: Sequence[Layer], scheme: Scheme, *, fmt: str = "hqq", budget_bpw: float | None = None,
                 num_layers: int | None = None, blocks_path: str = "") -> QuantPlan:
    units = make_units(layers, "block")
    return build_plan(layers, units, [scheme], [0] * len(units), strategy="uniform", by=f"uniform {scheme.label}",
                      fmt=fmt, budget_bpw=budget_bpw, num_layers=num_layers, blocks_path=blocks_path)


def uniform_for_budget(layers: Sequence[Layer], options: Sequence[Scheme], budget_bpw: float, *, fmt: str = "hqq",
                       num_layers: int | None = None, blocks_path: str = "") -> list[QuantPlan]:
    """The best uniform plan within the budget and, if it is not met exactly, the cheapest one above."""
    n = total_params(layers)
    costed = sorted(((sum(storage_bits(l.shape, s, fmt) for l in layers) / n, s) for s in options),
                    key=lambda t: (t[0], -t[1].bits))
    below = [t for t in costed if t[0] <= budget_bpw + 1e-12]
    above = [t for t in costed if t[0] > budget_bpw + 1e-12]
    out = []
    if below:
        out.append(uniform_plan(layers, below[-1][1], fmt=fmt, budget_bpw=budget_bpw, num_layers=num_layers,
                                blocks_path=blocks_path))
    if above:
        p = uniform_plan(layers, above[0][1], fmt=fmt, budget_bpw=budget_bpw, num_layers=num_layers,
                         blocks_path=blocks_path)
        p.notes.append(f"over budget: {p.achieved_bpw:.4f} > {budget_bpw:g} bpw (nearest uniform above)")
        out.append(p)
    return out


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's rule (src/llama-quant.cpp, `use_more_bits`), integer arithmetic as in C++.

    i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2: the first and last eighth of the layers and every
    third layer in between.
    """
    e = n // 8
    return i < e or i >= (7 * n) // 8 or (i - e) % 3 == 2


def llamacpp_plan(layers: Sequence[Layer], options: Sequence[Scheme], budget_bpw: float, *, fmt: str = "hqq",
                  num_layers: int | None = None, blocks_path: str = "") -> QuantPlan:
    """Blocks picked by llama.cpp's use_more_bits() get the higher option, the rest the lower one.

    Our reading: llama.cpp's k-quant mixes (Q4_K_M, Q3_K_M, ...) give attn_v and ffn_down of the
    layers where use_more_bits() holds a higher type. Here the rule picks whole blocks; the
    (lower, higher) pair is the most expensive pair of options whose plan fits the budget.
    """
    units = make_units(layers, "block")
    L = num_layers if num_layers is not None else max(l.block for l in layers) + 1
    more = [use_more_bits(layers[idx[0]].block, L) for idx in units]
    cost = cost_matrix(layers, units, options, fmt)
    n = total_params(layers)
    best = None
    for lo in range(len(options)):
        for hi in range(len(options)):
            if options[hi].bits <= options[lo].bits:
                continue
            choice = [hi if m else lo for m in more]
            c = sum(cost[u, k] for u, k in enumerate(choice)) / n
            if c <= budget_bpw + 1e-12 and (best is None or c > best[0]):
                best = (c, choice)
    notes = [f"higher option on blocks {[layers[idx[0]].block for idx, m in zip(units, more) if m]}"]
    if best is None:  # no (lower, higher) pair fits: every block at the best single option that does
        fits = [(cost[:, k].sum() / n, k) for k in range(len(options)) if cost[:, k].sum() / n <= budget_bpw + 1e-12]
        if not fits:
            raise LayerscopeError(f"the llama.cpp rule has no option within {budget_bpw:g} bpw")
        k = max(fits)[1]
        best = (max(fits)[0], [k] * len(units))
        notes = [f"no pair of options fits {budget_bpw:g} bpw with the rule: every block at {options[k].label}"]
    return build_plan(layers, units, options, best[1], strategy="llamacpp", by="llama.cpp use_more_bits",
                      fmt=fmt, budget_bpw=budget_bpw, num_layers=L, blocks_path=blocks_path, notes=notes)


def random_plans(plan: QuantPlan, layers: Sequence[Layer], seeds: Sequence[int]) -> list[QuantPlan]:
    """The plan's options shuffled over units of equal size: same histogram, same cost, random places."""
    units = make_units(layers, plan.granularity)
    by_name = {e.name: e for e in plan.entries}
    opts: list[Scheme] = []
    unit_opt = []
    for idx in units:
        e = by_name[layers[idx[0]].name]
        s = Scheme(e.bits, e.group_size, plan.method)
        if s not in opts:
            opts.append(s)
        unit_opt.append(opts.index(s))
    sig = [tuple(tuple(layers[k].shape) for k in idx) for idx in units]
    out = []
    for seed in seeds:
        rng = _random.Random(seed)
        choice = list(unit_opt)
        for key in set(sig):  # shuffle among units with identical shapes so the cost is unchanged
            pos = [u for u in range(len(units)) if sig[u] == key]
            vals = [choice[u] for u in pos]
            rng.shuffle(vals)
            for u, v in zip(pos, vals):
                choice[u] = v
        p = build_plan(layers, units, opts, choice, strategy="random", by=f"random seed {seed}", fmt=plan.fmt,
                       budget_bpw=plan.budget_bpw, granularity=plan.granularity, num_layers=plan.num_layers,
                       blocks_path=plan.blocks_path)
        out.append(p)
    return out
