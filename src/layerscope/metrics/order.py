"""importance_order: the one rule that turns a metric's values into an order of units.

Least important first: ascending values for a "higher = more important" metric, descending for a
"lower" one; undefined values (None/NaN) are left out; ties go to the lower index. A metric whose
defined values are all equal carries no ranking information, so it implies no order at all (an
empty list) rather than "0, 1, 2, ...".
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from layerscope.errors import LayerscopeError


def importance_order(values: Sequence[Any], direction: str | None) -> list[int]:
    if direction not in ("higher", "lower"):
        raise LayerscopeError("a descriptive metric (no direction) has no importance order")
    vals: list[tuple[int, float]] = []
    for i, v in enumerate(values):
        try:
            f = float(v) if v is not None else math.nan
        except (TypeError, ValueError):
            f = math.nan
        if math.isfinite(f):
            vals.append((i, f if direction == "higher" else -f))
    if len({f for _, f in vals}) <= 1:
        return []
    return [i for i, _ in sorted(vals, key=lambda t: (t[1], t[0]))]


def is_constant(values: Sequence[Any]) -> bool:
    """True when the defined values do not vary (such a column ranks nothing)."""
    finite = {float(v) for v in values if v is not None and not isinstance(v, list) and math.isfinite(float(v))}
    return len(finite) <= 1
