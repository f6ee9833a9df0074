"""The one exact allocator (plans/allocator.py) against brute-force enumeration."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from layerscope.errors import LayerscopeError
from layerscope.plans.allocator import UnitOptions, allocate_exact, evaluate_choice, solve, solve_ragged


def _brute(loss, cost, capacity):
    best = None
    for choice in itertools.product(*[range(len(r)) for r in loss]):
        c = sum(cost[u][k] for u, k in enumerate(choice))
        if c <= capacity + 1e-9:
            e = sum(loss[u][k] for u, k in enumerate(choice))
            if best is None or e < best - 1e-12:
                best = e
    return best


@pytest.mark.parametrize("seed", range(6))
def test_ragged_solver_matches_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    U = 5
    loss, cost = [], []
    for _ in range(U):
        k = int(rng.integers(1, 5))
        c = np.sort(rng.uniform(1, 10, k))
        loss.append(list(np.sort(rng.uniform(0, 5, k))[::-1]))  # cheaper options lose more
        cost.append(list(c))
    lo = sum(min(r) for r in cost)
    hi = sum(max(r) for r in cost)
    capacity = lo + (hi - lo) * rng.uniform(0.2, 0.8)
    choice, obj = solve_ragged(loss, cost, capacity)
    assert sum(cost[u][k] for u, k in enumerate(choice)) <= capacity
    assert obj == pytest.approx(_brute(loss, cost, capacity), abs=1e-9)


def test_rectangular_solve_is_the_same_problem():
    rng = np.random.default_rng(7)
    err, cost = rng.uniform(0, 1, (4, 3)), rng.uniform(1, 5, (4, 3))
    cap = cost.min(1).sum() + 2.0
    choice, obj = solve(err, cost, cap)
    assert obj == pytest.approx(_brute(err.tolist(), cost.tolist(), cap))


def test_allocation_of_sparsity_levels_keeps_within_budget_and_beats_uniform():
    # three units of equal size, loss convex in sparsity, one unit much more sensitive
    levels = [0.4, 0.5, 0.6, 0.7, 0.8]
    sens = [1.0, 5.0, 0.5]
    units = [UnitOptions(f"b{u}", levels, [100 * (1 - s) for s in levels], [sens[u] * s ** 3 for s in levels])
             for u in range(3)]
    cap = 300 * (1 - 0.6)
    a = allocate_exact(units, cap)
    assert a.cost <= cap + 1e-9
    uni = evaluate_choice(units, [0.6] * 3, cap)
    assert a.predicted_loss < uni.predicted_loss
    assert a.chosen[1] < 0.6 < a.chosen[2]


def test_infeasible_budget_is_one_clear_error():
    with pytest.raises(LayerscopeError, match="cheapest plan"):
        solve_ragged([[1.0, 2.0]], [[5.0, 6.0]], 4.0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [0, 1, 2])
def test_trust_region_matches_brute_force_over_plans_changing_at_most_k_units(seed, k):
    rng = np.random.default_rng(10 + seed)
    U = 6
    loss, cost = [], []
    for _ in range(U):
        n = int(rng.integers(2, 4))
        cost.append(list(np.sort(rng.uniform(1, 10, n))))
        loss.append(list(np.sort(rng.uniform(0, 5, n))[::-1]))
    anchor = [int(rng.integers(0, len(r))) for r in loss]
    capacity = sum(cost[u][a] for u, a in enumerate(anchor)) + 0.5  # the anchor itself fits
    best = None
    for choice in itertools.product(*[range(len(r)) for r in loss]):
        if sum(a != b for a, b in zip(choice, anchor)) > k:
            continue
        if sum(cost[u][c] for u, c in enumerate(choice)) <= capacity + 1e-9:
            e = sum(loss[u][c] for u, c in enumerate(choice))
            best = e if best is None else min(best, e)
    choice, obj = solve_ragged(loss, cost, capacity, anchor, k)
    assert sum(a != b for a, b in zip(choice, anchor)) <= k
    assert obj == pytest.approx(best, abs=1e-9)
    if k == 0:
        assert choice == anchor
    with pytest.raises(LayerscopeError, match="anchor"):
        solve_ragged(loss, cost, capacity, anchor[:-1], k)
