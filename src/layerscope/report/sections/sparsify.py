"""Report section: the per-block sparsity (or rank) allocation over depth, predicted vs measured loss."""
from __future__ import annotations

from markupsafe import escape

from layerscope.report.charts import base_layout, fmt, plotly_chart


def render(record: dict) -> str | None:
    if not record or "plan" not in record:
        return None
    import plotly.graph_objects as go

    p = record["plan"]
    levels = p.get("levels") or []
    n = len(levels)
    html = [f"<p><strong>{escape(p['method'])}</strong> ({escape(p['pattern'])}), allocation "
            f"<code>{escape(p['allocation'])}</code>: target sparsity {fmt(p['sparsity'])}, achieved "
            f"{fmt(p.get('achieved_sparsity'))} over the blocks' linear weights.</p>"]
    fig = go.Figure(go.Bar(x=list(range(n)), y=levels, name="sparsity", marker_color="#2b6cb0"))
    fig.add_hline(y=p["sparsity"], line_dash="dot", line_color="#888")
    fig.update_layout(**base_layout(xaxis=dict(title="block", dtick=1 if n <= 40 else None),
                                    yaxis=dict(title="sparsity"), height=300))
    html.append(plotly_chart(fig, "sparsify-levels", caption="sparsity per block (dotted: target)"))
    if record.get("predicted_loss") is not None:
        html.append(f"<p>Block-output loss ({escape(str(p.get('loss_model')))}): predicted "
                    f"{fmt(record['predicted_loss'])}, measured {fmt(record.get('measured_loss'))}.</p>")
    for e in record.get("evaluations") or []:
        html.append(f"<p>{escape(e['name'])}: perplexity {fmt(e['perplexity'])}</p>")
    for note in record.get("notes") or []:
        html.append(f"<p class='ls-note'>{escape(note)}</p>")
    return "\n".join(html)
