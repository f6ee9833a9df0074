"""The one exact allocator: per-unit options with a cost and a measured loss → least total loss under a budget.

Bits (quantize), sparsity levels (sparsify) and ranks (lowrank) are the same problem (a multiple-choice
knapsack): units u (blocks or linear layers) each pick exactly one option c from their own list, option c
of unit u costs cost[u][c] (storage bits, kept weights, parameters) and loses loss[u][c] (measured KL,
reconstruction error, ...). Choose x[u, c] ∈ {0, 1} to

    minimise   Σ_u Σ_c loss[u][c] · x[u, c]
    subject to Σ_c x[u, c] = 1                       (one option per unit)
               Σ_u Σ_c cost[u][c] · x[u, c] ≤ capacity

solved exactly as a 0/1 integer program with `scipy.optimize.milp` (HiGHS branch and bound, relative gap
0). Option lists may differ in length between units (ragged). The predicted total loss is the objective;
callers print it next to the measured result (the loss model is additive only by assumption).

Trust region (optional): with an `anchor` choice per unit and `max_changes` = k, at most k units may
leave their anchor option (Σ_u x[u, anchor_u] ≥ U − k). Solving for several k gives plans that move
step by step away from a plan whose loss is known (e.g. the uniform one), for callers that measure
them instead of trusting the additive estimate far from it.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from layerscope.errors import LayerscopeError


@dataclass
class UnitOptions:
    """One unit's candidates: option labels (e.g. sparsity 0.6, rank 128), their costs and measured losses."""

    name: str
    options: list[Any]
    cost: list[float]
    loss: list[float]

    def __post_init__(self) -> None:
        if not (len(self.options) == len(self.cost) == len(self.loss)) or not self.options:
            raise LayerscopeError(f"unit {self.name}: options, costs and losses must be non-empty and equally long")


@dataclass
class Allocation:
    choice: list[int]  # option index per unit
    chosen: list[Any]  # option label per unit
    predicted_loss: float
    cost: float
    capacity: float
    notes: list[str] = field(default_factory=list)


@contextmanager
def _solver_output_silenced() -> Iterator[None]:
    """HiGHS (scipy's milp) prints internal debug lines such as "HighsMipSolverData::
    transformNewIntegerFeasibleSolution tmpSolver.run();" straight to the C-level stdout on some
    trust-region problems, past `disp=False`; they are not ours to show, so both descriptors are
    pointed at /dev/null while the solver runs."""
    try:
        fds = [sys.stdout.fileno(), sys.stderr.fileno()]
    except (AttributeError, ValueError, OSError):  # no real descriptors (e.g. captured streams): nothing to silence
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in fds:
            os.dup2(null, fd)
        yield
    finally:
        for fd, keep in zip(fds, saved):
            os.dup2(keep, fd)
            os.close(keep)
        os.close(null)


def solve_ragged(loss: Sequence[Sequence[float]], cost: Sequence[Sequence[float]], capacity: float,
                 anchor: Sequence[int] | None = None, max_changes: int | None = None) -> tuple[list[int], float]:
    """Exact 0/1 program over ragged option lists. Returns (chosen option per unit, total loss)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    if len(loss) != len(cost) or not loss:
        raise LayerscopeError("the allocator needs one loss list and one cost list per unit")
    sizes = [len(r) for r in loss]
    if any(len(c) != s or s == 0 for c, s in zip(cost, sizes)):
        raise LayerscopeError("every unit needs as many costs as losses, at least one")
    e = np.concatenate([np.asarray(r, dtype=float) for r in loss])
    c = np.concatenate([np.asarray(r, dtype=float) for r in cost])
    if not np.all(np.isfinite(e)):
        raise LayerscopeError("the loss model has missing values (NaN): cannot allocate")
    if not np.all(np.isfinite(c)):
        raise LayerscopeError("the cost model has missing values (NaN): cannot allocate")
    cheapest = sum(float(np.min(r)) for r in cost)
    if cheapest > capacity * (1 + 1e-12):
        raise LayerscopeError(f"no allocation meets the budget: the cheapest plan costs {cheapest:g} > {capacity:g}")
    starts = np.cumsum([0] + sizes[:-1])
    U, n = len(sizes), int(sum(sizes))
    a_one = np.zeros((U, n))
    for u, (s, k) in enumerate(zip(starts, sizes)):
        a_one[u, s:s + k] = 1.0
    scale = float(np.abs(c).max()) or 1.0
    e_scale = float(np.abs(e).max()) or 1.0
    extra = []
    if max_changes is not None:
        if anchor is None or len(anchor) != U or any(not 0 <= int(a) < k for a, k in zip(anchor, sizes)):
            raise LayerscopeError("a trust region needs one valid anchor option per unit")
        keep = np.zeros((1, n))
        keep[0, [int(s + a) for s, a in zip(starts, anchor)]] = 1.0
        extra.append(LinearConstraint(keep, U - int(max_changes), np.inf))
    for shrink in (0.0, 1e-9, 1e-7, 1e-5):
        with _solver_output_silenced():
            res = milp(
                c=e / e_scale,
                constraints=[LinearConstraint(a_one, 1, 1),
                             LinearConstraint((c / scale)[None, :], -np.inf, capacity / scale * (1 - shrink)), *extra],
                integrality=np.ones(n), bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0, "presolve": True},
            )
        if res.x is None:
            raise LayerscopeError(f"no allocation meets the budget ({res.message})")
        choice = [int(np.argmax(res.x[s:s + k])) for s, k in zip(starts, sizes)]
        used = sum(float(cost[u][k]) for u, k in enumerate(choice))
        if used <= capacity * (1 + 1e-12):  # HiGHS tolerances can overshoot by ~1e-9: tighten and retry
            return choice, float(sum(float(loss[u][k]) for u, k in enumerate(choice)))
    raise LayerscopeError("the solver could not keep the plan within the budget")


def solve(err: np.ndarray, cost: np.ndarray, capacity: float) -> tuple[list[int], float]:
    """Rectangular form [units, options] of `solve_ragged` (the interface quantize uses)."""
    err, cost = np.asarray(err, dtype=float), np.asarray(cost, dtype=float)
    if err.shape != cost.shape or err.ndim != 2:
        raise LayerscopeError("err and cost must be [units, options] arrays of one shape")
    return solve_ragged(err.tolist(), cost.tolist(), capacity)


def allocate_exact(units: Sequence[UnitOptions], capacity: float, anchor: Sequence[Any] | None = None,
                   max_changes: int | None = None) -> Allocation:
    """Least total measured loss with total cost ≤ capacity (one option per unit); with `anchor` (an
    option label per unit) and `max_changes`, at most that many units differ from the anchor."""
    idx = None
    if anchor is not None:
        idx = []
        for u, lab in zip(units, anchor):
            if lab not in u.options:
                raise LayerscopeError(f"unit {u.name}: anchor option {lab!r} is not among its options")
            idx.append(u.options.index(lab))
    choice, obj = solve_ragged([u.loss for u in units], [u.cost for u in units], capacity, idx, max_changes)
    used = sum(u.cost[k] for u, k in zip(units, choice))
    return Allocation(choice=choice, chosen=[u.options[k] for u, k in zip(units, choice)], predicted_loss=obj,
                      cost=float(used), capacity=float(capacity))


def evaluate_choice(units: Sequence[UnitOptions], chosen: Sequence[Any], capacity: float | None = None) -> Allocation:
    """The predicted loss and cost of a given choice of labels (uniform, OWL, ... plans on the same loss model)."""
    choice = []
    for u, lab in zip(units, chosen):
        if lab not in u.options:
            raise LayerscopeError(f"unit {u.name}: option {lab!r} was not measured")
        choice.append(u.options.index(lab))
    return Allocation(choice=choice, chosen=list(chosen),
                      predicted_loss=float(sum(u.loss[k] for u, k in zip(units, choice))),
                      cost=float(sum(u.cost[k] for u, k in zip(units, choice))),
                      capacity=float(capacity if capacity is not None else float("nan")))
