"""Report section: the least important layers by each metric."""
from __future__ import annotations

from collections import Counter

from layerscope.metrics.table import ScoreTable
from layerscope.report.charts import chart_markup
from layerscope.report.figures import (
    UNIT_LABEL,
    rank_figure,
    ranked_columns,
    ranking_of,
)
from layerscope.report.jinja import render_template

RANK_K = 5


def render(table: ScoreTable) -> str | None:
    cols = ranked_columns(table)
    if not cols:
        return None
    k = min(RANK_K, table.num_layers)
    rows = []
    counts: Counter[int] = Counter()
    for c in cols:
        least = ranking_of(c)[:k]
        counts.update(least)
        rows.append(dict(name=c.name, unit=UNIT_LABEL[c.unit], direction=c.direction, layers=least + [None] * (k - len(least))))
    consensus = [(layer, n) for layer, n in sorted(counts.items(), key=lambda t: (-t[1], t[0]))][:k] if k < table.num_layers else []
    return render_template(
        "ranking.html.j2", k=k, rows=rows, n_metrics=len(cols), consensus=consensus,
        chart=chart_markup(rank_figure(table, cols), "rank-heatmap"),
    )
