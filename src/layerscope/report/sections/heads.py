"""Report section: per-head attention statistics."""
from __future__ import annotations

from layerscope.metrics.table import ScoreTable
from layerscope.report.charts import chart_markup
from layerscope.report.figures import head_columns, head_figure
from layerscope.report.jinja import render_template


def render(table: ScoreTable) -> str | None:
    cards = []
    for c in head_columns(table):
        fig = head_figure(c)
        if fig is None:
            continue
        cards.append(dict(name=c.metric, column=c.name, definition=c.definition, direction=c.direction,
                          chart=chart_markup(fig, f"heads-{c.metric}")))
    if not cards:
        return None
    attn_note = next((n for n in table.provenance.notes if "attention" in n), None)
    return render_template("heads.html.j2", cards=cards, note=attn_note, num_heads=table.provenance.num_heads)
