"""Report section: every metric over depth."""
from __future__ import annotations

from layerscope.metrics.table import ScoreTable
from layerscope.report.charts import chart_markup
from layerscope.report.figures import (
    UNIT_LABEL,
    depth_figure,
    depth_groups,
    direction_text,
)
from layerscope.report.jinja import render_template


def render(table: ScoreTable) -> str | None:
    groups = depth_groups(table)
    if not groups:
        return None
    cards = []
    for name, cols in groups.items():
        units = {c.unit for c in cols}
        cards.append(dict(
            name=name,
            unit=UNIT_LABEL[cols[0].unit] if len(units) == 1 and "block" not in units else None,
            directions=sorted({direction_text(c.direction) for c in cols}),
            definition=cols[0].definition,  # block column first; family members differ in a parameter only
            chart=chart_markup(depth_figure(cols, table.num_layers), f"depth-{name}"),
            columns=[c.name for c in cols],
        ))
    return render_template("depth.html.j2", cards=cards)
