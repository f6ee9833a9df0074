"""Score columns as arrays and the plotly figures of the built-in sections (heatmap, depth, ranks, heads)."""
from __future__ import annotations

import re
from typing import Any

import numpy as np
from markupsafe import escape

from layerscope.metrics.table import ScoreColumn, ScoreTable
from layerscope.report.charts import base_layout, fmt, layer_axis, plotly_go

UNIT_ORDER = ("block", "attention", "mlp")


UNIT_LABEL = {"block": "block", "attention": "attention", "mlp": "MLP", "head": "head"}


HEAD_METRICS = ("attention_entropy", "sink_mass", "head_output_norm", "dormant_head")


def column_values(col: ScoreColumn) -> np.ndarray:
    """[L] float array of a per-layer column (NaN where undefined)."""
    out = []
    for v in col.values:
        try:
            out.append(np.nan if v is None or isinstance(v, list) else float(v))
        except (TypeError, ValueError):
            out.append(np.nan)
    return np.array(out, dtype=float)


def head_values(col: ScoreColumn) -> np.ndarray:
    """[L, H] float array of a per-head column (NaN where undefined; ragged rows padded)."""
    rows = [r if isinstance(r, list) else [] for r in col.values]
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        for j, v in enumerate(r):
            try:
                out[i, j] = np.nan if v is None else float(v)
            except (TypeError, ValueError):
                pass
    return out


def has_values(a: np.ndarray) -> bool:
    return bool(np.isfinite(a).any())


def layer_columns(table: ScoreTable) -> list[ScoreColumn]:
    """Per-layer columns (block, then attention, then MLP units), in table order within a unit."""
    cols = [c for c in table.columns.values() if c.unit in UNIT_ORDER]
    return sorted(cols, key=lambda c: UNIT_ORDER.index(c.unit))


def head_columns(table: ScoreTable) -> list[ScoreColumn]:
    """Per-head columns, the known head metrics first."""
    cols = [c for c in table.columns.values() if c.unit == "head"]
    rank = {m: i for i, m in enumerate(HEAD_METRICS)}
    return sorted(cols, key=lambda c: rank.get(c.metric, len(rank)))


def importance_normalise(values: np.ndarray, direction: str | None) -> np.ndarray:
    """Min-max rescale to [0, 1] across layers; flipped for 'lower' so that 1 = most important.

    Descriptive metrics (direction None) are rescaled as they are (1 = largest). A constant metric
    maps to 0.5; NaN stays NaN.
    """
    v = np.asarray(values, dtype=float)
    out = np.full(v.shape, np.nan)
    ok = np.isfinite(v)
    if not ok.any():
        return out
    lo, hi = float(v[ok].min()), float(v[ok].max())
    if hi - lo <= 1e-12 * max(abs(hi), abs(lo), 1e-300):
        out[ok] = 0.5
    else:
        out[ok] = (v[ok] - lo) / (hi - lo)
    if direction == "lower":
        out[ok] = 1.0 - out[ok]
    return out


def rank_normalise(values: np.ndarray, direction: str | None) -> np.ndarray:
    """Rank scale: the layer's rank position rescaled to [0, 1] (1 = most important; descriptive
    metrics: 1 = largest). One extreme layer cannot wash out the rest of the row as in min-max.
    A constant metric maps to 0.5; NaN stays NaN."""
    from layerscope.metrics.order import importance_order

    v = np.asarray(values, dtype=float)
    out = np.full(v.shape, np.nan)
    ok = np.isfinite(v)
    order = importance_order([x if np.isfinite(x) else None for x in v], direction or "higher")
    if not order:
        out[ok] = 0.5
        return out
    for pos, layer in enumerate(order):
        out[layer] = pos / max(1, len(order) - 1)
    return out


def metric_group(metric: str) -> str:
    """Charts of the same family share one depth chart (angular_distance_n1/n2/... -> angular_distance)."""
    return re.sub(r"_n\d+$", "", metric)


def depth_groups(table: ScoreTable) -> dict[str, list[ScoreColumn]]:
    """Per-layer columns with at least one value, grouped by metric family, in table order."""
    groups: dict[str, list[ScoreColumn]] = {}
    for c in table.columns.values():
        if c.unit in UNIT_ORDER and has_values(column_values(c)):
            groups.setdefault(metric_group(c.metric), []).append(c)
    for g, cols in groups.items():
        cols.sort(key=lambda c: (UNIT_ORDER.index(c.unit), n_suffix(c.metric)))
    return groups


def n_suffix(metric: str) -> int:
    m = re.search(r"_n(\d+)$", metric)
    return int(m.group(1)) if m else 0


def series_label(col: ScoreColumn, group: list[ScoreColumn]) -> str:
    """Legend name of a column inside its depth chart: only what differs within the group."""
    same_metric = len({c.metric for c in group}) == 1
    same_unit = len({c.unit for c in group}) == 1
    unit = UNIT_LABEL[col.unit]
    if same_metric:
        return unit
    suffix = col.metric[len(metric_group(col.metric)):].lstrip("_")
    label = suffix.replace("n", "n=", 1) if re.fullmatch(r"n\d+", suffix) else col.metric
    return label if same_unit else f"{label} ({unit})"


def direction_text(direction: str | None) -> str:
    if direction == "higher":
        return "higher = more important"
    if direction == "lower":
        return "lower = more important"
    return "descriptive (no importance direction)"


def direction_short(direction: str | None) -> str:
    return direction or "descriptive"


def ranked_columns(table: ScoreTable) -> list[ScoreColumn]:
    """Per-layer columns with an importance direction and at least one value."""
    return [c for c in layer_columns(table) if c.direction is not None and has_values(column_values(c))]


def ranking_of(col: ScoreColumn) -> list[int]:
    """Layers from least to most important under the column's direction (undefined layers left out)."""
    from layerscope.metrics.order import importance_order

    return importance_order(col.values, col.direction)


def heatmap_figure(table: ScoreTable) -> tuple[Any, list[str]] | None:
    """Layer x metric heatmap of importance-normalised values. Returns (figure, empty columns)."""
    go = plotly_go()
    L = table.num_layers
    rows, ranks, labels, hover, empty = [], [], [], [], []
    for c in layer_columns(table):
        v = column_values(c)
        if not has_values(v):
            empty.append(c.name)
            continue
        rows.append([None if not np.isfinite(x) else round(float(x), 6) for x in importance_normalise(v, c.direction)])
        ranks.append([None if not np.isfinite(x) else round(float(x), 6) for x in rank_normalise(v, c.direction)])
        labels.append(c.name + (" (descriptive)" if c.direction is None else ""))
        hover.append([f"{fmt(float(x)) if np.isfinite(x) else '—'}<br>{direction_text(c.direction)}" for x in v])
    if not rows:
        return None
    fig = go.Figure()
    for name, z, visible in (("min-max", rows, True), ("rank", ranks, False)):
        fig.add_trace(go.Heatmap(
            z=z, x=list(range(L)), y=labels, customdata=hover, zmin=0, zmax=1, colorscale="Viridis",
            hoverongaps=False, xgap=1, ygap=1, name=name, visible=visible,
            colorbar=dict(title=dict(text=f"importance<br>({name})", side="right"), thickness=14,
                          len=min(1.0, 300 / (22 * len(rows) + 90))),
            hovertemplate="<b>%{y}</b><br>layer %{x}<br>raw value: %{customdata}<br>" + name
            + ": %{z:.2f}<extra></extra>",
        ))
    fig.update_layout(updatemenus=[dict(
        type="buttons", direction="right", x=0, xanchor="left", y=1.0, yanchor="bottom", showactive=True,
        buttons=[dict(label="scale: min-max per row", method="update", args=[{"visible": [True, False]}]),
                 dict(label="scale: rank", method="update", args=[{"visible": [False, True]}])])])
    fig.update_layout(**base_layout(
        height=max(260, 22 * len(rows) + 90),
        xaxis=dict(**layer_axis(L), side="bottom"),
        yaxis=dict(autorange="reversed", automargin=True, tickfont=dict(size=11)),
        margin=dict(l=10, r=10, t=40, b=45),
    ))
    return fig, empty


def depth_figure(group: list[ScoreColumn], L: int) -> Any:
    go = plotly_go()
    fig = go.Figure()
    for c in group:
        v = column_values(c)
        fig.add_trace(go.Scatter(
            x=list(range(L)), y=[None if not np.isfinite(x) else float(x) for x in v], mode="lines+markers",
            name=series_label(c, group), connectgaps=False, marker=dict(size=5),
            hovertemplate=f"<b>{escape(c.name)}</b><br>layer %{{x}}: %{{y:.4g}}<extra></extra>",
        ))
    fig.update_layout(**base_layout(
        height=280, showlegend=len(group) > 1, xaxis=layer_axis(L), yaxis=dict(automargin=True, exponentformat="e"),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="left", x=0, font=dict(size=11)),
        margin=dict(l=55, r=15, t=30, b=45),
    ))
    return fig


def rank_figure(table: ScoreTable, cols: list[ScoreColumn]) -> Any:
    """Metric x layer heatmap of rank positions (1 = least important)."""
    go = plotly_go()
    L = table.num_layers
    z, text, hover = [], [], []
    for c in cols:
        rank = [None] * L
        for pos, layer in enumerate(ranking_of(c)):
            if layer < L:
                rank[layer] = pos + 1
        v = column_values(c)
        z.append(rank)
        hover.append([fmt(float(v[i])) if i < len(v) and np.isfinite(v[i]) else "—" for i in range(L)])
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(L)), y=[c.name for c in cols], customdata=hover, colorscale="Viridis",
        zmin=1, zmax=max(L, 2), hoverongaps=False, xgap=1, ygap=1,
        texttemplate="%{z}" if L <= 32 else None, textfont=dict(size=10),
        colorbar=dict(title=dict(text="rank<br>(1 = least<br>important)", side="right"), thickness=14,
                      len=min(1.0, 300 / (22 * len(cols) + 90)), tickmode="linear", tick0=1,
                      dtick=max(1, -(-(L - 1) // 6))),
        hovertemplate="<b>%{y}</b><br>layer %{x}: rank %{z} of " + str(L) + "<br>raw value: %{customdata}<extra></extra>",
    ))
    fig.update_layout(**base_layout(
        height=max(240, 22 * len(cols) + 90), xaxis=layer_axis(L),
        yaxis=dict(autorange="reversed", automargin=True, tickfont=dict(size=11)),
        margin=dict(l=10, r=10, t=10, b=45),
    ))
    return fig


def head_figure(col: ScoreColumn) -> Any | None:
    go = plotly_go()
    a = head_values(col)
    if a.size == 0 or not has_values(a):
        return None
    L, H = a.shape
    binary = col.metric == "dormant_head" or set(np.unique(a[np.isfinite(a)]).tolist()) <= {0.0, 1.0}
    z = [[None if not np.isfinite(x) else float(x) for x in row] for row in a]
    kw: dict[str, Any] = dict(colorscale="Viridis")
    if binary:
        kw = dict(colorscale=[[0.0, "#e4e9f0"], [0.5, "#e4e9f0"], [0.5, "#d62728"], [1.0, "#d62728"]], zmin=0, zmax=1,
                  colorbar=dict(tickvals=[0.25, 0.75], ticktext=["no", "yes"], thickness=12, len=0.6))
    else:
        kw["colorbar"] = dict(thickness=12)
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(H)), y=list(range(L)), hoverongaps=False, xgap=1, ygap=1,
        hovertemplate=f"<b>{escape(col.metric)}</b><br>layer %{{y}}, head %{{x}}: %{{z:.4g}}<extra></extra>", **kw,
    ))
    fig.update_layout(**base_layout(
        height=int(min(900, max(240, 16 * L + 80))),
        xaxis=dict(title="head", tickmode="linear" if H <= 32 else "auto", tick0=0, dtick=1 if H <= 16 else 4, zeroline=False),
        yaxis=dict(title="layer", autorange="reversed", tickmode="linear" if L <= 40 else "auto", tick0=0,
                   dtick=1 if L <= 24 else 2, zeroline=False),
        margin=dict(l=55, r=10, t=10, b=45),
    ))
    return fig
