"""Self-contained HTML report of a ScoreTable (and of every result that carries one).

`render_report(table)` returns one HTML document that works offline: the plotly.js bundle of the
installed `plotly` package is inlined once, all CSS is inline, and every chart is a plotly figure
built in Python, stored as JSON next to its container and drawn by `Plotly.newPlot` on load.

Sections are listed in `report.registry` (one file per section under `report/sections/`); a
section's `render(table)` returns an HTML fragment (trusted, inserted as is) or None to leave the
section out. Other code can add a section at run time with `register_section(key, title, render,
order)`. Charts inside a section are made with `plotly_chart(fig, name)` so the page draws them.
"""
from layerscope.report.charts import base_layout, fmt, plotly_chart
from layerscope.report.figures import (
    HEAD_METRICS,
    heatmap_figure,
    importance_normalise,
    ranking_of,
)
from layerscope.report.registry import (
    Section,
    register_section,
    sections,
    unregister_section,
)
from layerscope.report.render import render_report, write_report

__all__ = [
    "Section",
    "register_section",
    "unregister_section",
    "sections",
    "render_report",
    "write_report",
    "plotly_chart",
    "base_layout",
    "fmt",
    "HEAD_METRICS",
    "heatmap_figure",
    "importance_normalise",
    "ranking_of",
]
