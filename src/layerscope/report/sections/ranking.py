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


def agreement_weights(table: ScoreTable, cols: list) -> tuple[dict[str, float], str] | None:
    """Weight of each column in the consensus: its measured Spearman agreement with the primary ground
    truth, floored at 0 (a metric that anti-correlates with ablation gets no vote); the truth itself
    weighs 1. None when the table carries no agreement analysis."""
    from layerscope.analysis.agreement_stats import SECTION_KEY

    res = table.extras.get(SECTION_KEY)
    if not isinstance(res, dict) or not res.get("primary_truth"):
        return None
    primary = res["primary_truth"]
    rho = {r["column"]: (r.get("vs", {}).get(primary) or {}).get("spearman") for r in res.get("rows", [])}
    weights = {}
    for c in cols:
        r = rho.get(c.name)
        weights[c.name] = 1.0 if c.metric == primary else max(0.0, float(r)) if isinstance(r, (int, float)) else 0.0
    return weights, primary


def consensus(table: ScoreTable, cols: list, k: int) -> tuple[list[tuple[int, float]], dict]:
    """Layers most often among the k least important, over the block metrics (all units if none),
    weighted by measured agreement when the table has it; and a description of what was counted."""
    blocks = [c for c in cols if c.unit == "block"] or cols
    found = agreement_weights(table, blocks)
    weights = found[0] if found else {c.name: 1.0 for c in blocks}
    counts: Counter[int] = Counter()
    for c in blocks:
        for layer in ranking_of(c)[:k]:
            counts[layer] += weights[c.name]
    ranked = [(layer, round(n, 3)) for layer, n in sorted(counts.items(), key=lambda t: (-t[1], t[0])) if n > 0][:k]
    counted = [c.name for c in blocks if weights[c.name] > 0]
    basis = {"weighted_by": f"Spearman agreement with {found[1]} (negative = 0)" if found else None,
             "counted": counted, "left_out": [c.name for c in blocks if weights[c.name] <= 0],
             "weights": {n: round(w, 3) for n, w in weights.items()} if found else None}
    return (ranked if k < table.num_layers else []), basis


def render(table: ScoreTable) -> str | None:
    cols = ranked_columns(table)
    if not cols:
        return None
    k = min(RANK_K, table.num_layers)
    rows = []
    for c in cols:
        least = ranking_of(c)[:k]
        rows.append(dict(name=c.name, unit=UNIT_LABEL[c.unit], direction=c.direction, layers=least + [None] * (k - len(least))))
    top, basis = consensus(table, cols, k)
    return render_template(
        "ranking.html.j2", k=k, rows=rows, n_metrics=len(basis["counted"]), consensus=top, basis=basis,
        chart=chart_markup(rank_figure(table, cols), "rank-heatmap"),
    )
