"""Report section: what `layerscope prune` removed, by which scores, and how to load the result."""
from __future__ import annotations

from markupsafe import escape

from layerscope.report.charts import base_layout, fmt, plotly_chart


def render(record: dict) -> str | None:
    if not record or "removed" not in record:
        return None
    import plotly.graph_objects as go

    src = record.get("source") or {}
    sel = record.get("selection") or {}
    unit = record["unit"]
    noun = "blocks" if unit == "block" else f"{unit} sublayers"
    removed = set(record["removed"])
    html = [f"<p>Removed {noun} <strong>{escape(', '.join(map(str, sorted(removed))))}</strong> of "
            f"{src.get('num_layers')} from <code>{escape(str(src.get('model_id')))}</code>"
            + (f" by <code>{escape(sel['by'])}</code> ({escape(str(sel.get('method')))})" if sel.get("by") else
               " (listed explicitly)") + ".</p>"]
    values = (sel.get("scores") or {}).get("values")
    if isinstance(values, list) and values and not isinstance(values[0], list):
        n = len(values)
        fig = go.Figure(go.Bar(
            x=list(range(n)), y=[v for v in values],
            marker_color=["#d62728" if i in removed else "#2b6cb0" for i in range(n)],
            hovertext=[("removed" if i in removed else "kept") + f": {fmt(values[i])}" for i in range(n)]))
        fig.update_layout(**base_layout(xaxis=dict(title=unit, dtick=1 if n <= 40 else None),
                                        yaxis=dict(title=sel.get("by") or "score"), height=300))
        html.append(plotly_chart(fig, "prune-scores", caption=f"{sel.get('by')} per {unit}; red = removed"))
    for r in sel.get("rounds") or []:
        html.append(f"<p class='ls-note'>round {r['round']}: removed {r['removed']} (score {fmt(r.get('score'))})</p>")
    html.append(f"<p>Load: {escape(str(record.get('load', '')))}</p>")
    return "\n".join(html)
