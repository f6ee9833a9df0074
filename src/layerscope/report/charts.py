"""Chart helpers shared by every report section: number formatting, plotly layout and embedding."""
from __future__ import annotations

import contextvars
import re
from typing import Any

from markupsafe import Markup, escape

FONT = 'system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif'


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


RENDER_IDS: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("layerscope_report_ids", default=None)


def slug(name: str) -> str:
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
    base = f"ls-chart-{slug(name)}"
    chart_id = base
    used = RENDER_IDS.get()
    if used is not None:
        n = 2
        while chart_id in used:
            chart_id, n = f"{base}-{n}", n + 1
        used.add(chart_id)
    h = height or fig_height(fig)
    style = f' style="min-height:{int(h)}px"' if h else ""
    cap = f'<div class="ls-caption">{escape(caption)}</div>' if caption else ""
    return (
        f'<div class="ls-chart" id="{escape(chart_id)}" data-chart="{escape(name)}"{style}>'
        f'<script type="application/json" class="ls-chart-spec">{spec}</script></div>{cap}'
    )


def chart_markup(fig: Any, name: str) -> Markup:
    return Markup(plotly_chart(fig, name))


def fig_height(fig: Any) -> int | None:
    layout = fig.layout if hasattr(fig, "layout") else fig.get("layout", {})
    h = layout["height"] if hasattr(fig, "layout") else layout.get("height")
    return int(h) if h else None


def plotly_go():
    import plotly.graph_objects as go

    return go


def layer_axis(L: int) -> dict[str, Any]:
    axis: dict[str, Any] = dict(title="layer", zeroline=False)
    if L <= 40:
        axis.update(tickmode="linear", tick0=0, dtick=1 if L <= 24 else 2)
    return axis
