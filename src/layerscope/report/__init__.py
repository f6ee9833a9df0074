"""Self-contained HTML report of a ScoreTable.

`render_report(table)` returns one HTML document that works offline: the plotly.js bundle of the
installed `plotly` package is inlined once, all CSS is inline, and every chart is a plotly figure
built here in Python, stored as JSON next to its container and drawn by `Plotly.newPlot` on load.

Sections come from a registry. The built-in ones (summary, heatmap, depth, ranking, heads, massive
activations, definitions) are registered below; other features add their own with
`register_section(key, title, render, order)`. A section's `render(table)` returns an HTML
fragment (trusted, inserted as is) or None to leave the section out; sections usually read
`table.extras[key]`. Built-in sections use orders 10-60 and 900 (definitions last), so a section
registered with the default order 100 appears after the built-in charts and before the definitions.
Charts inside a section should be made with `plotly_chart(fig, name)` so the page draws them.
"""
from __future__ import annotations

import contextvars
import itertools
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from markupsafe import Markup, escape

from ..scoretable import ScoreColumn, ScoreTable

__all__ = [
    "Section",
    "register_section",
    "unregister_section",
    "sections",
    "render_report",
    "write_report",
    "plotly_chart",
    "HEAD_METRICS",
]

TEMPLATES_DIR = Path(__file__).with_name("templates")
FONT = 'system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif'
UNIT_ORDER = ("block", "attention", "mlp")
UNIT_LABEL = {"block": "block", "attention": "attention", "mlp": "MLP", "head": "head"}
HEAD_METRICS = ("attention_entropy", "sink_mass", "head_output_norm", "dormant_head")
RANK_K = 5
MASSIVE_FLAG = 100.0  # max/median ratio from which a layer is flagged in the massive-activation table


# --------------------------------------------------------------------------- section registry
@dataclass(frozen=True)
class Section:
    key: str
    title: str
    render: Callable[[ScoreTable], str | None]
    order: int = 100


_SECTIONS: dict[str, tuple[Section, int]] = {}
_SEQ = itertools.count()


def register_extras_section(key: str, title: str, render: Callable[[dict], str | None], order: int = 100) -> None:
    """A section drawn from `table.extras[key]` (what probe, lens, steer and others attach to a table)."""
    register_section(key, title, lambda table: render(table.extras.get(key) or {}), order=order)


def register_section(key: str, title: str, render: Callable[[ScoreTable], str | None], order: int = 100) -> None:
    """Add (or replace, by key) a report section.

    At render time every registered section whose `render(table)` returns non-None HTML is included,
    sorted by `order` (ties: registration order). The returned HTML is inserted without escaping.
    Built-in keys: summary (10), heatmap (20), depth (30), ranking (40), heads (50),
    massive_activations (60), definitions (900); registering one of these keys replaces it.
    """
    if not key or not isinstance(key, str):
        raise ValueError("section key must be a non-empty string")
    if not callable(render):
        raise TypeError("render must be callable: render(table) -> str | None")
    seq = _SECTIONS[key][1] if key in _SECTIONS else next(_SEQ)
    _SECTIONS[key] = (Section(key=key, title=title, render=render, order=int(order)), seq)


def unregister_section(key: str) -> None:
    """Remove a section (no error if it is not registered)."""
    _SECTIONS.pop(key, None)


def sections() -> list[Section]:
    """Registered sections in render order."""
    return [s for s, _ in sorted(_SECTIONS.values(), key=lambda item: (item[0].order, item[1]))]


# --------------------------------------------------------------------------- data helpers
def fmt(v: Any, digits: int = 4) -> str:
    """Short human form of a number; an em dash for missing values."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v or abs(v) == float("inf"):
            return "—"
        return f"{v:.{digits}g}"
    return str(v)


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


def _has_values(a: np.ndarray) -> bool:
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


def metric_group(metric: str) -> str:
    """Charts of the same family share one depth chart (angular_distance_n1/n2/... -> angular_distance)."""
    return re.sub(r"_n\d+$", "", metric)


def depth_groups(table: ScoreTable) -> dict[str, list[ScoreColumn]]:
    """Per-layer columns with at least one value, grouped by metric family, in table order."""
    groups: dict[str, list[ScoreColumn]] = {}
    for c in table.columns.values():
        if c.unit in UNIT_ORDER and _has_values(column_values(c)):
            groups.setdefault(metric_group(c.metric), []).append(c)
    for g, cols in groups.items():
        cols.sort(key=lambda c: (UNIT_ORDER.index(c.unit), _n_suffix(c.metric)))
    return groups


def _n_suffix(metric: str) -> int:
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
    return [c for c in layer_columns(table) if c.direction is not None and _has_values(column_values(c))]


def ranking_of(col: ScoreColumn) -> list[int]:
    """Layers from least to most important under the column's direction (undefined layers left out)."""
    v = column_values(col)
    key = v if col.direction == "higher" else -v
    order = sorted((i for i in range(len(v)) if np.isfinite(v[i])), key=lambda i: (key[i], i))
    return order


# --------------------------------------------------------------------------- charts
_RENDER_IDS: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("layerscope_report_ids", default=None)


def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")
    return s or "chart"


def base_layout(**kw: Any) -> dict[str, Any]:
    layout: dict[str, Any] = dict(
        template="plotly_white",
        font=dict(family=FONT, size=12, color="#1f2933"),
        hoverlabel=dict(font=dict(family=FONT)),
        margin=dict(l=60, r=20, t=20, b=45),
    )
    layout.update(kw)
    return layout


def plotly_chart(fig: Any, name: str, *, height: int | None = None, caption: str | None = None) -> str:
    """HTML for one chart (a plain str): a `div.ls-chart[data-chart=name]` holding the figure's JSON.

    The page's loader script replaces the JSON with the plotly graph. `fig` is a plotly Figure (or
    a dict with `data` and `layout`). Names should be unique within a report; a repeated name gets
    a numbered id (the data-chart attribute keeps the name).
    """
    import plotly.io as pio

    if height is not None:
        if hasattr(fig, "update_layout"):
            fig.update_layout(height=height)
        else:
            fig.setdefault("layout", {})["height"] = height
    spec = pio.to_json(fig, validate=False, pretty=False)
    # Safe inside <script>: '<', '>' and '&' only occur in JSON strings, where \u escapes are equivalent.
    spec = spec.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    base = f"ls-chart-{_slug(name)}"
    chart_id = base
    used = _RENDER_IDS.get()
    if used is not None:
        n = 2
        while chart_id in used:
            chart_id, n = f"{base}-{n}", n + 1
        used.add(chart_id)
    h = height or _fig_height(fig)
    style = f' style="min-height:{int(h)}px"' if h else ""
    cap = f'<div class="ls-caption">{escape(caption)}</div>' if caption else ""
    return (
        f'<div class="ls-chart" id="{escape(chart_id)}" data-chart="{escape(name)}"{style}>'
        f'<script type="application/json" class="ls-chart-spec">{spec}</script></div>{cap}'
    )


def _chart(fig: Any, name: str) -> Markup:
    return Markup(plotly_chart(fig, name))


def _fig_height(fig: Any) -> int | None:
    layout = fig.layout if hasattr(fig, "layout") else fig.get("layout", {})
    h = layout["height"] if hasattr(fig, "layout") else layout.get("height")
    return int(h) if h else None


def _go():
    import plotly.graph_objects as go

    return go


def _layer_axis(L: int) -> dict[str, Any]:
    axis: dict[str, Any] = dict(title="layer", zeroline=False)
    if L <= 40:
        axis.update(tickmode="linear", tick0=0, dtick=1 if L <= 24 else 2)
    return axis


def heatmap_figure(table: ScoreTable) -> tuple[Any, list[str]] | None:
    """Layer x metric heatmap of importance-normalised values. Returns (figure, empty columns)."""
    go = _go()
    L = table.num_layers
    rows, labels, hover, empty = [], [], [], []
    for c in layer_columns(table):
        v = column_values(c)
        if not _has_values(v):
            empty.append(c.name)
            continue
        rows.append([None if not np.isfinite(x) else round(float(x), 6) for x in importance_normalise(v, c.direction)])
        labels.append(c.name + (" (descriptive)" if c.direction is None else ""))
        hover.append([f"{fmt(float(x)) if np.isfinite(x) else '—'}<br>{direction_text(c.direction)}" for x in v])
    if not rows:
        return None
    fig = go.Figure(go.Heatmap(
        z=rows, x=list(range(L)), y=labels, customdata=hover, zmin=0, zmax=1, colorscale="Viridis",
        hoverongaps=False, xgap=1, ygap=1,
        colorbar=dict(title=dict(text="importance<br>(normalised)", side="right"), thickness=14, len=min(1.0, 300 / (22 * len(rows) + 90))),
        hovertemplate="<b>%{y}</b><br>layer %{x}<br>raw value: %{customdata}<br>normalised: %{z:.2f}<extra></extra>",
    ))
    fig.update_layout(**base_layout(
        height=max(260, 22 * len(rows) + 90),
        xaxis=dict(**_layer_axis(L), side="bottom"),
        yaxis=dict(autorange="reversed", automargin=True, tickfont=dict(size=11)),
        margin=dict(l=10, r=10, t=10, b=45),
    ))
    return fig, empty


def depth_figure(group: list[ScoreColumn], L: int) -> Any:
    go = _go()
    fig = go.Figure()
    for c in group:
        v = column_values(c)
        fig.add_trace(go.Scatter(
            x=list(range(L)), y=[None if not np.isfinite(x) else float(x) for x in v], mode="lines+markers",
            name=series_label(c, group), connectgaps=False, marker=dict(size=5),
            hovertemplate=f"<b>{escape(c.name)}</b><br>layer %{{x}}: %{{y:.4g}}<extra></extra>",
        ))
    fig.update_layout(**base_layout(
        height=280, showlegend=len(group) > 1, xaxis=_layer_axis(L), yaxis=dict(automargin=True, exponentformat="e"),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="left", x=0, font=dict(size=11)),
        margin=dict(l=55, r=15, t=30, b=45),
    ))
    return fig


def rank_figure(table: ScoreTable, cols: list[ScoreColumn]) -> Any:
    """Metric x layer heatmap of rank positions (1 = least important)."""
    go = _go()
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
        height=max(240, 22 * len(cols) + 90), xaxis=_layer_axis(L),
        yaxis=dict(autorange="reversed", automargin=True, tickfont=dict(size=11)),
        margin=dict(l=10, r=10, t=10, b=45),
    ))
    return fig


def head_figure(col: ScoreColumn) -> Any | None:
    go = _go()
    a = head_values(col)
    if a.size == 0 or not _has_values(a):
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


# --------------------------------------------------------------------------- templates
@lru_cache(maxsize=1)
def _env():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = fmt
    env.filters["direction_text"] = direction_text
    env.filters["direction_short"] = direction_short
    env.globals["UNIT_LABEL"] = UNIT_LABEL
    return env


def _render(template: str, **ctx: Any) -> str:
    return _env().get_template(template).render(**ctx)


@lru_cache(maxsize=1)
def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    js = get_plotlyjs()
    # Never let the bundle end the script element early.
    return re.sub(r"</(script)", r"<\\/\1", js, flags=re.I)


# --------------------------------------------------------------------------- built-in sections
def _summary_section(table: ScoreTable) -> str:
    p = table.provenance
    sha = p.weights_sha256
    notes: list[str] = list(p.notes)
    sample_notes: list[tuple[str, str]] = []
    seen: set[str] = set()
    for c in table.columns.values():
        note = c.details.get("note")
        if isinstance(note, str) and note not in seen:
            seen.add(note)
            sample_notes.append((metric_group(c.metric).split("_kl")[0] if c.metric.startswith("logit_lens") else c.metric, note))
        q = c.details.get("observed_queries_per_layer")
        if isinstance(q, int) and "heads" not in seen:
            seen.add("heads")
            sample_notes.append(("attention heads", f"per-head statistics from {q} query positions per layer"))
    units = Counter(c.unit for c in table.columns.values())
    metrics_run = p.options.get("metrics")
    return _render(
        "summary.html.j2",
        p=p,
        sha_short=(sha[:12] if sha else None),
        notes=notes,
        sample_notes=sample_notes,
        skipped=sorted(p.skipped.items()),
        units=[(UNIT_LABEL[u], units[u]) for u in ("block", "attention", "mlp", "head") if units.get(u)],
        metrics_run=", ".join(metrics_run) if isinstance(metrics_run, list) else None,
        options={k: v for k, v in p.options.items() if k != "metrics"},
        n_columns=len(table.columns),
    )


def _heatmap_section(table: ScoreTable) -> str | None:
    res = heatmap_figure(table)
    if res is None:
        return None
    fig, empty = res
    return _render("heatmap.html.j2", chart=_chart(fig, "heatmap"), empty=empty)


def _depth_section(table: ScoreTable) -> str | None:
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
            chart=_chart(depth_figure(cols, table.num_layers), f"depth-{name}"),
            columns=[c.name for c in cols],
        ))
    return _render("depth.html.j2", cards=cards)


def _ranking_section(table: ScoreTable) -> str | None:
    cols = ranked_columns(table)
    if not cols:
        return None
    k = min(RANK_K, table.num_layers)
    rows = []
    counts: Counter[int] = Counter()
    for c in cols:
        least = ranking_of(c)[:k]
        counts.update(least)
        rows.append(dict(name=c.name, unit=UNIT_LABEL[c.unit], direction=c.direction, layers=least + [None] * (k - len(least))))
    consensus = [(layer, n) for layer, n in sorted(counts.items(), key=lambda t: (-t[1], t[0]))][:k] if k < table.num_layers else []
    return _render(
        "ranking.html.j2", k=k, rows=rows, n_metrics=len(cols), consensus=consensus,
        chart=_chart(rank_figure(table, cols), "rank-heatmap"),
    )


def _heads_section(table: ScoreTable) -> str | None:
    cards = []
    for c in head_columns(table):
        fig = head_figure(c)
        if fig is None:
            continue
        cards.append(dict(name=c.metric, column=c.name, definition=c.definition, direction=c.direction,
                          chart=_chart(fig, f"heads-{c.metric}")))
    if not cards:
        return None
    attn_note = next((n for n in table.provenance.notes if "attention" in n), None)
    return _render("heads.html.j2", cards=cards, note=attn_note, num_heads=table.provenance.num_heads)


def _massive_section(table: ScoreTable) -> str | None:
    col = next((c for c in table.columns.values() if c.metric == "massive_activations" and c.unit == "block"), None)
    if col is None:
        return None
    per_layer = col.details.get("per_layer")
    if not isinstance(per_layer, list) or not per_layer:
        return None
    ratios = column_values(col)
    rows = []
    for i, d in enumerate(per_layer):
        d = d if isinstance(d, dict) else {}
        ratio = float(ratios[i]) if i < len(ratios) and np.isfinite(ratios[i]) else None
        dims = d.get("top_dims") or []
        vals = d.get("top_values") or []
        top = ", ".join(f"{dim} ({fmt(val, 3)})" for dim, val in itertools.zip_longest(dims, vals) if dim is not None)
        rows.append(dict(layer=i, ratio=ratio, value=d.get("value"), median=d.get("median"),
                         pos=d.get("token_position"), dim=d.get("dim"), top=top or "—",
                         flag=ratio is not None and ratio >= MASSIVE_FLAG))
    return _render("massive.html.j2", rows=rows, flag=MASSIVE_FLAG, definition=col.definition, reference=col.reference)


def _definitions_section(table: ScoreTable) -> str | None:
    if not table.columns:
        return None
    order = {u: i for i, u in enumerate(("block", "attention", "mlp", "head"))}
    cols = sorted(table.columns.values(), key=lambda c: (metric_group(c.metric), _n_suffix(c.metric), order[c.unit]))
    return _render("definitions.html.j2", cols=cols)


register_section("summary", "Model and calibration", _summary_section, order=10)
register_section("heatmap", "Importance heatmap: layer × metric", _heatmap_section, order=20)
register_section("depth", "Metrics over depth", _depth_section, order=30)
register_section("ranking", "Rankings: the least important layers per metric", _ranking_section, order=40)
register_section("heads", "Attention heads", _heads_section, order=50)
register_section("massive_activations", "Massive activations", _massive_section, order=60)
register_section("definitions", "Metric definitions and references", _definitions_section, order=900)


# --------------------------------------------------------------------------- the document
def _render_sections(table: ScoreTable, only: Iterable[str] | None = None) -> list[dict[str, Any]]:
    out = []
    wanted = set(only) if only is not None else None
    for s in sections():
        if wanted is not None and s.key not in wanted:
            continue
        try:
            body = s.render(table)
        except Exception as exc:  # one broken section must not lose the whole report
            warnings.warn(f"report section '{s.key}' failed: {exc!r}", RuntimeWarning, stacklevel=2)
            body = f'<p class="ls-error">This section could not be rendered: {escape(repr(exc))}</p>'
        if body is None:
            continue
        out.append(dict(key=s.key, anchor=f"sec-{_slug(s.key)}", title=s.title, body=Markup(body)))
    return out


def render_report(table: ScoreTable, title: str | None = None) -> str:
    """The full, self-contained HTML document for `table` (no external requests)."""
    from .. import __version__

    p = table.provenance
    token = _RENDER_IDS.set(set())
    try:
        body = _render_sections(table)
    finally:
        _RENDER_IDS.reset(token)
    subtitle = [f"{p.num_layers} layers"]
    if p.num_heads:
        subtitle.append(f"{p.num_heads} heads")
    subtitle.append(p.model_family)
    if p.created:
        subtitle.append(f"scanned {p.created}")
    return _render(
        "report.html.j2",
        title=title or f"layerscope report: {p.model_id}",
        subtitle=" · ".join(subtitle),
        sections=body,
        plotly_js=Markup(_plotly_js()),
        version=__version__,
        schema_version=table.schema_version,
        n_columns=len(table.columns),
    )


def write_report(table: ScoreTable, path: str | Path, title: str | None = None) -> Path:
    """Render the report and write it atomically to `path`."""
    from ..io import write_text_atomic

    return write_text_atomic(path, render_report(table, title=title))
