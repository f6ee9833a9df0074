"""Report section: each metric's definition and reference."""
from __future__ import annotations

from layerscope.metrics.table import ScoreTable
from layerscope.report.figures import metric_group, n_suffix
from layerscope.report.jinja import render_template


def render(table: ScoreTable) -> str | None:
    if not table.columns:
        return None
    order = {u: i for i, u in enumerate(("block", "attention", "mlp", "head"))}
    cols = sorted(table.columns.values(), key=lambda c: (metric_group(c.metric), n_suffix(c.metric), order[c.unit]))
    return render_template("definitions.html.j2", cols=cols)
