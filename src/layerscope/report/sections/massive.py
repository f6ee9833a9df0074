"""Report section: where massive activations appear."""
from __future__ import annotations

import itertools

import numpy as np

from layerscope.metrics.table import ScoreTable
from layerscope.report.charts import fmt
from layerscope.report.figures import column_values
from layerscope.report.jinja import render_template

MASSIVE_FLAG = 100.0  # max/median ratio from which a layer is flagged in the massive-activation table


def render(table: ScoreTable) -> str | None:
    col = next((c for c in table.columns.values() if c.metric == "massive_activations" and c.unit == "block"), None)
    if col is None:
        return None
    per_layer = col.details.get("per_layer")
    if not isinstance(per_layer, list) or not per_layer:
        return None
    ratios = column_values(col)
    rows = []
    for i, d in enumerate(per_layer):
        d = d if isinstance(d, dict) else {}
        ratio = float(ratios[i]) if i < len(ratios) and np.isfinite(ratios[i]) else None
        dims = d.get("top_dims") or []
        vals = d.get("top_values") or []
        top = ", ".join(f"{dim} ({fmt(val, 3)})" for dim, val in itertools.zip_longest(dims, vals) if dim is not None)
        rows.append(dict(layer=i, ratio=ratio, value=d.get("value"), median=d.get("median"),
                         pos=d.get("token_position"), dim=d.get("dim"), top=top or "—",
                         flag=ratio is not None and ratio >= MASSIVE_FLAG))
    return render_template("massive.html.j2", rows=rows, flag=MASSIVE_FLAG, definition=col.definition, reference=col.reference)
