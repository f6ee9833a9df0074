"""Report section: how every cheap metric agrees with the ground truth (layerscope agree)."""
from __future__ import annotations

from layerscope.analysis.agreement_stats import SECTION_KEY, _truth_column


def render(table) -> str | None:
    """HTML of the agreement section (None when the table carries no agreement analysis)."""
    res = table.extras.get(SECTION_KEY)
    if not res:
        return None
    from markupsafe import escape

    from layerscope.report import base_layout, fmt, plotly_chart

    truths = res["truths"]
    primary = res["primary_truth"]
    html = [f'<p class="ls-verdict"><strong>{escape(res.get("answer", ""))}</strong></p>']
    html.append(f"<p>Ground truths: {escape(', '.join(truths))} (primary: {escape(primary)}). Correlations are "
                "oriented so that a positive value means the metric agrees with the truth; top-k = share of the k "
                "least important units that both name.</p>")
    det = res.get("truth_details", {}).get(primary, {})
    if det.get("data"):
        html.append(f"<p>{escape(primary)} measured on {escape(det['data'])}.</p>")
    for unit, cands in res.get("recommendation", {}).items():
        html.append(f"<h3>Which {escape(unit)} metric to trust (best first)</h3>")
        head = "".join(f"<th>{escape(h)}</th>" for h in (
            "#", "metric", "kind", f"Spearman vs {primary}", "Kendall", "top-5", "all truths (mean ρ)",
            "bootstrap ρ", "Wikipedia vs Shakespeare ρ", "verdict"))
        body = []
        for c in cands:
            body.append("<tr>" + "".join(f"<td>{escape(x)}</td>" for x in (
                c["rank"], c["column"], c["kind"], fmt(c["spearman"], 3), fmt(c["kendall"], 3),
                fmt(c["top5_overlap"], 2), fmt(c["mean_spearman_all_truths"], 3), fmt(c["stability"], 3),
                fmt(c["cross_corpus_spearman"], 3), c["verdict"])) + "</tr>")
        html.append(f'<table class="ls-table"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')
    rows = [r for r in res["rows"] if r["unit"] == "block" and primary in r["vs"]]
    if rows:
        import plotly.graph_objects as go

        rows.sort(key=lambda r: -(r["vs"][primary]["spearman"] if r["vs"][primary]["spearman"] is not None else -2))
        colors = {"cheap": "#2b6cb0", "gradient": "#c05621", "ablation": "#718096", "quantization": "#2f855a"}
        fig = go.Figure(go.Bar(
            x=[r["column"] for r in rows], y=[r["vs"][primary]["spearman"] for r in rows],
            marker_color=[colors.get(r["kind"], "#4a5568") for r in rows],
            hovertext=[f"{r['kind']}; Kendall {fmt(r['vs'][primary]['kendall'], 3)}; n={r['vs'][primary]['n']}"
                       for r in rows]))
        fig.update_layout(**base_layout(yaxis=dict(title=f"Spearman vs {primary}", range=[-1, 1]), height=360,
                                        margin=dict(l=60, r=20, t=20, b=140)))
        html.append(plotly_chart(fig, "agreement-spearman",
                                 caption=f"Block metrics: Spearman with {primary} (blue cheap, orange gradient, grey ablation)"))
        best = next((c for c in res.get("recommendation", {}).get("block", []) if c["kind"] == "cheap"), None)
        if best is not None and best["column"] in table.columns:
            tc = _truth_column(table, primary, "block")
            bc = table.columns[best["column"]]
            L = len(tc.values)
            fig2 = go.Figure(go.Scatter(
                x=list(bc.values), y=list(tc.values), mode="markers+text", text=[str(i) for i in range(L)],
                textposition="top center", hovertext=[f"block {i}" for i in range(L)]))
            fig2.update_layout(**base_layout(xaxis=dict(title=best["column"]), yaxis=dict(title=primary), height=380))
            html.append(plotly_chart(fig2, "agreement-scatter",
                                     caption=f"Best cheap metric vs {primary}, one point per block (labels = block index)"))
    if rows and len(truths) > 1:
        html.append("<h3>Block metrics against every ground truth (Spearman ρ)</h3>")
        head = "".join(f"<th>{escape(t)}</th>" for t in truths)
        body = "".join(
            f"<tr><td>{escape(r['column'])}</td><td>{escape(r['kind'])}</td>"
            + "".join(f"<td>{escape(fmt((r['vs'].get(t) or {}).get('spearman'), 3))}</td>" for t in truths) + "</tr>"
            for r in rows)
        html.append(f'<table class="ls-table"><thead><tr><th>metric</th><th>kind</th>{head}</tr></thead>'
                    f"<tbody>{body}</tbody></table>")
    dis = res.get("disagreements") or {}
    if dis.get("units"):
        html.append(f"<h3>Blocks where the cheap metrics and {escape(dis['truth'])} disagree most</h3>")
        body = "".join("<tr>" + "".join(f"<td>{escape(x)}</td>" for x in (
            u["unit_index"], u["truth_rank"], fmt(u["mean_cheap_rank"], 3), fmt(u["gap"], 3), u["reading"])) + "</tr>"
            for u in dis["units"])
        html.append('<table class="ls-table"><thead><tr><th>block</th><th>truth rank</th><th>mean cheap rank</th>'
                    f'<th>gap</th><th>reading</th></tr></thead><tbody>{body}</tbody></table>'
                    f'<p>Rank 0 = least important; {dis["metrics_used"]} cheap block metrics averaged.</p>')
    for n in res.get("notes", []):
        html.append(f'<p class="ls-note">{escape(n)}</p>')
    return "\n".join(html)
