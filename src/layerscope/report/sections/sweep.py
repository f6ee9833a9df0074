"""Report section: perplexity against the number of removed units (layerscope sweep)."""
from __future__ import annotations

from typing import Any

from layerscope.evaluation.sweep import SWEEP_KEY


def sweep_figure(res: dict[str, Any]):
    """A plotly figure of the sweep (random band, greedy reference, metric and reverse curves)."""
    import plotly.graph_objects as go

    ks = res["ks"]
    fig = go.Figure()
    r = res.get("random")
    if r:
        fig.add_trace(go.Scatter(x=ks + ks[::-1], y=r["max"] + r["min"][::-1], fill="toself", mode="lines",
                                 line=dict(width=0), fillcolor="rgba(150,150,150,0.25)", hoverinfo="skip",
                                 name=f"random ×{r['n']} (min–max)"))
        fig.add_trace(go.Scatter(x=ks, y=r["median"], mode="lines", line=dict(color="gray", dash="dot"),
                                 name="random (median)"))
    g = res.get("greedy")
    if g:
        fig.add_trace(go.Scatter(x=ks, y=g["perplexity"], mode="lines+markers",
                                 line=dict(color="black", width=3), name="greedy ablation (reference)"))
    for c in res.get("curves", []):
        fig.add_trace(go.Scatter(x=ks, y=c["perplexity"], mode="lines+markers",
                                 line=dict(dash="dash" if c["kind"] == "reverse" else "solid"), name=c["label"]))
    unit = res.get("unit", "block")
    fig.update_layout(xaxis=dict(title=f"{unit}s removed", dtick=1), yaxis=dict(title="perplexity", type="log"),
                      height=460, legend=dict(font=dict(size=10)))
    return fig


def render(table: Any) -> str | None:
    """Report section: the removal curves stored in ``table.extras['sweep']``."""
    res = (table.extras or {}).get(SWEEP_KEY)
    if not res:
        return None
    from html import escape

    from layerscope.report import plotly_chart

    p = res["protocol"]
    caption = (f"Perplexity on {p['dataset']}:{p['split']} ({p['max_tokens']} tokens, context "
               f"{p['context_length']}, stride {p['stride']}) after removing the first K {res['unit']}s of each "
               f"ordering. Baseline {res['baseline']:.3f}. Greedy: {res['greedy']['source'] if res.get('greedy') else 'n/a'}.")
    rows = []
    last = len(res["ks"]) - 1
    entries = [(c["label"], c["perplexity"][last]) for c in res.get("curves", [])]
    if res.get("greedy"):
        entries.append(("greedy ablation", res["greedy"]["perplexity"][last]))
    if res.get("random"):
        r = res["random"]
        entries.append((f"random median (min–max of {r['n']})", r["median"][last]))
    for label, y in sorted(entries, key=lambda e: e[1]):
        rows.append(f"<tr><td>{escape(str(label))}</td><td>{y:.3f}</td></tr>")
    table_html = (f"<table class='ls-table'><tr><th>ordering</th><th>perplexity at K={res['ks'][last]}</th></tr>"
                  + "".join(rows) + "</table>")
    return plotly_chart(sweep_figure(res), "sweep", caption=caption) + table_html
