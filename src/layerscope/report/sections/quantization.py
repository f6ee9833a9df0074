"""Report section: the quantization plan, its evaluations and the bit-width sweep."""
from __future__ import annotations

import html
from typing import Any

from layerscope.compress.quant import Scheme
from layerscope.evaluation.quant_sweep import SweepResult, sweep_table_text


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    h = "".join(f"<th>{html.escape(str(x))}</th>" for x in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="data"><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>'


def render(table) -> str | None:
    """HTML for table.extras['quantization'] (plan, evaluations, sweep); None when absent."""
    q = (getattr(table, "extras", None) or {}).get("quantization")
    if not q:
        return None
    parts: list[str] = []
    for note in q.get("notes", []):
        parts.append(f"<p><em>{html.escape(note)}</em></p>")
    plan = q.get("plan")
    if plan:
        parts.append(f"<h3>Plan: {html.escape(str(plan.get('by')))} ({html.escape(plan['strategy'])}), budget "
                     f"{plan.get('budget_bpw')} bpw, achieved {plan['achieved_bpw']:.4f} bpw in the "
                     f"{html.escape(plan['fmt'])} format (nominal {plan['nominal_bits']:.3f} bits)</h3>")
        blocks: dict[int, set] = {}
        for e in plan["entries"]:
            blocks.setdefault(e["block"], set()).add(f"{e['bits']}b/g{e['group_size']}" if e["bits"] != 16 else "fp16")
        parts.append(_table(["block", "scheme"], [[b, ", ".join(sorted(s))] for b, s in sorted(blocks.items())]))
    ev = q.get("evaluations")
    if ev:
        parts.append("<h3>Held-out perplexity</h3>")
        parts.append(_table(["plan", "bpw", "perplexity"],
                            [[e.get("name"), f"{e.get('bpw', float('nan')):.4f}", f"{e.get('perplexity'):.4f}"]
                             for e in ev]))
    ab = q.get("allocation_bench")
    if ab:
        parts.append("<h3>Allocation at equal budget</h3>")
        parts.append(_table(["budget", "plan", "bpw", "perplexity"],
                            [[r["budget"], r["name"], f"{r['bpw']:.4f}", f"{r['perplexity']:.4f}"] for r in ab]))
    sw = q.get("sweep")
    if sw:
        res = SweepResult.model_validate(sw)
        parts.append(f"<h3>Sweep: blocks moved from {Scheme(**res.high).label} to {Scheme(**res.low).label}</h3>")
        parts.append(f"<p>Reference (all {Scheme(**res.high).label}) perplexity {res.reference_perplexity:.4f}; "
                     f"unquantized {'—' if res.baseline_perplexity is None else f'{res.baseline_perplexity:.4f}'}. "
                     f"Tolerated share = largest share with perplexity within +{res.threshold:.0%}.</p>")
        parts.append(_table(["ordering", "tolerated share"],
                            [[k, f"{v:.0%}"] for k, v in res.tolerated_share.items()]))
        import plotly.graph_objects as go

        from layerscope.report import plotly_chart

        fig = go.Figure()
        for name in res.orderings:
            pts = [(r.share, r.perplexity) for r in res.rows if r.ordering == name]
            fig.add_trace(go.Scatter(x=[p for p, _ in pts], y=[v for _, v in pts], mode="lines+markers",
                                     name=name, line={"dash": "dot"} if name.startswith("random") else {}))
        fig.add_hline(y=res.reference_perplexity * (1 + res.threshold), line_dash="dash",
                      annotation_text=f"+{res.threshold:.0%}")
        fig.update_layout(xaxis_title="share of blocks at the low bit width", yaxis_title="perplexity",
                          xaxis_tickformat=".0%", height=420)
        parts.append(plotly_chart(fig, "quant-sweep"))
        parts.append(f"<pre>{html.escape(sweep_table_text(res))}</pre>")
    return "\n".join(parts)
