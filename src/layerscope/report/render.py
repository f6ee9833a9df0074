"""render_report: one self-contained HTML document from a ScoreTable's registered sections."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterable

from markupsafe import Markup, escape

from layerscope.metrics.table import ScoreTable
from layerscope.report.charts import RENDER_IDS, slug
from layerscope.report.jinja import plotly_js, render_template
from layerscope.report.registry import sections


def _render_sections(table: ScoreTable, only: Iterable[str] | None = None) -> list[dict[str, Any]]:
    out = []
    wanted = set(only) if only is not None else None
    for s in sections():
        if wanted is not None and s.key not in wanted:
            continue
        if s.builtin:
            body = s.render(table)  # our own sections: a failure is a bug and must be seen
        else:
            try:
                body = s.render(table)
            except Exception as exc:  # a section added at run time (user code) must not lose the report
                warnings.warn(f"report section '{s.key}' failed: {exc!r}", RuntimeWarning, stacklevel=2)
                body = f'<p class="ls-error">This section could not be rendered: {escape(repr(exc))}</p>'
        if body is None:
            continue
        out.append(dict(key=s.key, anchor=f"sec-{slug(s.key)}", title=s.title, body=Markup(body)))
    return out


def render_report(table: ScoreTable, title: str | None = None) -> str:
    """The full, self-contained HTML document for `table` (no external requests)."""
    from layerscope import __version__

    p = table.provenance
    token = RENDER_IDS.set(set())
    try:
        body = _render_sections(table)
    finally:
        RENDER_IDS.reset(token)
    subtitle = [f"{p.num_layers} layers"]
    if p.num_heads:
        subtitle.append(f"{p.num_heads} heads")
    subtitle.append(p.model_family)
    if p.created:
        subtitle.append(f"scanned {p.created}")
    return render_template(
        "report.html.j2",
        title=title or f"layerscope report: {p.model_id}",
        subtitle=" · ".join(subtitle),
        sections=body,
        plotly_js=Markup(plotly_js()),
        version=__version__,
        schema_version=table.schema_version,
        n_columns=len(table.columns),
    )


def write_report(table: ScoreTable, path: str | Path, title: str | None = None) -> Path:
    """Render the report and write it atomically to `path`."""
    from layerscope.outputs import write_text_atomic

    return write_text_atomic(path, render_report(table, title=title))
