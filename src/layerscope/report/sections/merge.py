"""Report section: the merge coefficients of every task over depth, per sublayer, and the mergekit recipe."""
from __future__ import annotations

from markupsafe import escape

from layerscope.report.charts import base_layout, plotly_chart


def render(record: dict) -> str | None:
    plan = (record or {}).get("plan") or {}
    coefs = plan.get("coefficients")
    if not coefs:
        return None
    import plotly.graph_objects as go

    html = [f"<p>{escape(plan['method'])} of {len(plan['models'])} model(s) into <code>{escape(plan['base'])}</code> "
            f"with <strong>{escape(plan['layers'])}</strong> layer coefficients.</p>"]
    fig = go.Figure()
    dashes = {"attention": "solid", "mlp": "dash", "block": "dot"}
    for t, (src, c) in enumerate(zip(plan["models"], coefs)):
        for g, dash in dashes.items():
            if g != "attention" and c[g] == c["attention"]:
                continue
            fig.add_trace(go.Scatter(x=list(range(len(c[g]))), y=c[g], mode="lines+markers", line=dict(dash=dash),
                                     name=f"model {t} {g}", hovertext=str(src.get("model"))))
    fig.update_layout(**base_layout(xaxis=dict(title="block"), yaxis=dict(title="coefficient"), height=340))
    html.append(plotly_chart(fig, "merge-coefficients", caption="coefficient of each task vector per block "
                             "(solid: attention; dashed: MLP; dotted: norms; drawn once when they agree)"))
    rows = "".join(f"<tr><td>{t}</td><td><code>{escape(str(s.get('model')))}</code></td><td>{c['embed']:.4g}</td>"
                   f"<td>{c['head']:.4g}</td></tr>" for t, (s, c) in enumerate(zip(plan["models"], coefs)))
    html.append(f"<table><tr><th>model</th><th>path</th><th>embeddings</th><th>final norm / head</th></tr>{rows}</table>")
    mk = record.get("mergekit") or {}
    html.append(f"<p>mergekit recipe <code>{escape(str(mk.get('file')))}</code>: "
                + ("exact." if mk.get("exact") else "not exact: " + escape("; ".join(mk.get("reasons", [])))) + "</p>")
    return "\n".join(html)
