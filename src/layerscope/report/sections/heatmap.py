"""Report section: layer x metric heatmap of importance."""
from __future__ import annotations

from layerscope.metrics.table import ScoreTable
from layerscope.report.charts import chart_markup
from layerscope.report.figures import heatmap_figure
from layerscope.report.jinja import render_template


def render(table: ScoreTable) -> str | None:
    res = heatmap_figure(table)
    if res is None:
        return None
    fig, empty = res
    return render_template("heatmap.html.j2", chart=chart_markup(fig, "heatmap"), empty=empty)
