"""Small inline-SVG charts (line chart, heatmap) for sections that draw without plotly."""
from __future__ import annotations

import html
import math
from typing import Sequence

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def svg_line_chart(series: list[dict], x_labels: Sequence[str] | None = None, *, width: int = 640,
                   height: int = 240, y_range: tuple[float, float] | None = None, y_label: str = "",
                   markers: Sequence[tuple[int, str]] = ()) -> str:
    """A small inline SVG line chart. series: {"name", "values", optional "low"/"high" band, "dash"}."""
    n = max(len(s["values"]) for s in series)
    vals = [v for s in series for key in ("values", "low", "high") for v in (s.get(key) or []) if v is not None
            and math.isfinite(v)]
    lo, hi = y_range if y_range else ((min(vals), max(vals)) if vals else (0.0, 1.0))
    if hi <= lo:
        hi = lo + 1.0
    ml, mr, mt, mb = 48, 120, 10, 28
    w, h = width - ml - mr, height - mt - mb

    def x(i: float) -> float:
        return ml + (w * i / max(n - 1, 1))

    def y(v: float) -> float:
        return mt + h * (1 - (v - lo) / (hi - lo))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'style="font:11px sans-serif">']
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        out.append(f'<line x1="{ml}" x2="{ml + w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>'
                   f'<text x="{ml - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    step = max(1, n // 10)
    for i in range(0, n, step):
        lab = html.escape(str(x_labels[i] if x_labels else i))
        out.append(f'<text x="{x(i):.1f}" y="{mt + h + 14}" text-anchor="middle">{lab}</text>')
    if y_label:
        out.append(f'<text x="12" y="{mt + h / 2:.1f}" transform="rotate(-90 12 {mt + h / 2:.1f})" '
                   f'text-anchor="middle">{html.escape(y_label)}</text>')
    for i, label in markers:
        out.append(f'<line x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{mt}" y2="{mt + h}" stroke="#555" '
                   f'stroke-dasharray="2,2"/><text x="{x(i) + 3:.1f}" y="{mt + 10}">{html.escape(label)}</text>')
    for k, s in enumerate(series):
        color = s.get("color", _PALETTE[k % len(_PALETTE)])
        if s.get("low") and s.get("high"):
            pts = [(x(i), y(v)) for i, v in enumerate(s["high"]) if v is not None]
            pts += [(x(i), y(v)) for i, v in reversed(list(enumerate(s["low"]))) if v is not None]
            out.append(f'<polygon points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in pts)}" fill="{color}" '
                       f'fill-opacity="0.15" stroke="none"/>')
        pts = [(x(i), y(v)) for i, v in enumerate(s["values"]) if v is not None and math.isfinite(v)]
        dash = ' stroke-dasharray="5,3"' if s.get("dash") else ""
        out.append(f'<polyline points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in pts)}" fill="none" '
                   f'stroke="{color}" stroke-width="1.8"{dash}/>')
        out.append(f'<line x1="{ml + w + 8}" x2="{ml + w + 24}" y1="{mt + 12 + 14 * k}" y2="{mt + 12 + 14 * k}" '
                   f'stroke="{color}" stroke-width="2"{dash}/><text x="{ml + w + 28}" y="{mt + 16 + 14 * k}">'
                   f'{html.escape(s["name"])}</text>')
    out.append("</svg>")
    return "".join(out)


_VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def colour(v: float, lo: float = 0.0, hi: float = 1.0) -> str:
    if v is None or not math.isfinite(v):
        return "#eee"
    t = min(1.0, max(0.0, (v - lo) / (hi - lo) if hi > lo else 0.0)) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    f = t - i
    r, g, b = (round(a + (c - a) * f) for a, c in zip(_VIRIDIS[i], _VIRIDIS[i + 1]))
    return f"#{r:02x}{g:02x}{b:02x}"


def svg_heatmap(matrix: Sequence[Sequence[float | None]], labels: Sequence[str], *, cell: int = 14,
                lo: float = 0.0, hi: float = 1.0, title: str = "") -> str:
    m = len(matrix)
    cell = max(6, min(cell, 560 // max(m, 1)))
    ml, mt = 40, 20
    size = ml + m * cell + 70
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{mt + m * cell + 30}" '
           f'style="font:10px sans-serif">']
    if title:
        out.append(f'<text x="{ml}" y="12">{html.escape(title)}</text>')
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            val = float("nan") if v is None else float(v)
            tip = f"{labels[i]} vs {labels[j]}: {val:.3f}" if math.isfinite(val) else f"{labels[i]} vs {labels[j]}: n/a"
            out.append(f'<rect x="{ml + j * cell}" y="{mt + i * cell}" width="{cell}" height="{cell}" '
                       f'fill="{colour(val, lo, hi)}"><title>{html.escape(tip)}</title></rect>')
    step = max(1, m // 10)
    for i in range(0, m, step):
        out.append(f'<text x="{ml - 3}" y="{mt + i * cell + cell * 0.75:.1f}" text-anchor="end">{i}</text>')
        out.append(f'<text x="{ml + i * cell + cell / 2:.1f}" y="{mt + m * cell + 12}" text-anchor="middle">{i}</text>')
    x0 = ml + m * cell + 12
    for k in range(11):
        v = lo + (hi - lo) * (10 - k) / 10
        out.append(f'<rect x="{x0}" y="{mt + k * (m * cell / 11):.1f}" width="12" height="{m * cell / 11 + 0.5:.1f}" '
                   f'fill="{colour(v, lo, hi)}"/>')
        if k in (0, 5, 10):
            out.append(f'<text x="{x0 + 16}" y="{mt + k * (m * cell / 11) + 8:.1f}">{v:.2f}</text>')
    out.append("</svg>")
    return "".join(out)
