"""Static PNG figures of a ScoreTable (matplotlib, Agg backend) for papers and slides.

`save_static_plots(table, out_dir)` writes:

- `heatmap.png`: layer x metric, each row normalised to [0, 1] with 1 = most important (the same
  normalisation as the HTML report; descriptive rows rescaled raw and marked);
- `depth.png`: every metric over depth as small multiples in one figure;
- `depth_<metric>.png`: one figure per metric (block / attention / MLP lines where present);
- `heads_<metric>.png`: layer x head grid for each per-head metric.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from layerscope.metrics.table import ScoreTable
from layerscope.report.figures import (
    UNIT_LABEL,
    column_values,
    depth_groups,
    direction_text,
    head_columns,
    head_values,
    importance_normalise,
    layer_columns,
    series_label,
)

__all__ = ["save_static_plots"]


def _figure(figsize: tuple[float, float]):
    # Figure + Agg canvas directly: no pyplot global state, no GUI backend, thread-safe.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "metric"


def _layer_ticks(ax, L: int) -> None:
    step = max(1, math.ceil(L / 16))
    ax.set_xticks(range(0, L, step))
    ax.set_xlim(-0.5, L - 0.5)


def _save(fig, path: Path, dpi: int) -> Path:
    fig.savefig(path, dpi=dpi, facecolor="white")
    return path


def _plot_depth(ax, cols, L: int, title: str) -> None:
    x = np.arange(L)
    for c in cols:
        v = column_values(c)
        v = np.pad(v, (0, max(0, L - len(v))), constant_values=np.nan)[:L]
        ax.plot(x, v, marker="o", markersize=3, linewidth=1.5, label=series_label(c, cols))
    ax.set_title(title, fontsize=10, family="monospace")
    ax.set_xlabel("layer", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3, linewidth=0.5)
    ax.ticklabel_format(axis="y", useOffset=False)
    _layer_ticks(ax, L)
    if len(cols) > 1:
        ax.legend(fontsize=7, frameon=False)


def save_static_plots(table: ScoreTable, out_dir: str | Path, dpi: int = 150) -> list[Path]:
    """Write the PNG figures described in the module docstring to `out_dir`; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    L = table.num_layers
    written: list[Path] = []

    # Heatmap: layer x metric, importance-normalised.
    rows, labels = [], []
    for c in layer_columns(table):
        v = column_values(c)
        if not np.isfinite(v).any():
            continue
        rows.append(np.pad(importance_normalise(v, c.direction), (0, max(0, L - len(v))), constant_values=np.nan)[:L])
        labels.append(c.name + (" *" if c.direction is None else ""))
    if rows:
        z = np.ma.masked_invalid(np.array(rows))
        fig = _figure((min(16.0, max(6.0, 0.28 * L + 3.5)), max(2.5, 0.24 * len(rows) + 1.2)))
        ax = fig.add_subplot()
        im = ax.imshow(z, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(labels)), labels, fontsize=7, family="monospace")
        _layer_ticks(ax, L)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_xlabel("layer", fontsize=9)
        ax.set_title("importance per layer (row-normalised, 1 = most important; * descriptive)", fontsize=9)
        cb = fig.colorbar(im, ax=ax, shrink=0.8)
        cb.ax.tick_params(labelsize=7)
        written.append(_save(fig, out / "heatmap.png", dpi))

    # Depth: small multiples and one file per metric.
    groups = depth_groups(table)
    if groups:
        ncols = min(3, len(groups))
        nrows = math.ceil(len(groups) / ncols)
        fig = _figure((4.2 * ncols, 2.7 * nrows))
        for k, (name, cols) in enumerate(groups.items()):
            ax = fig.add_subplot(nrows, ncols, k + 1)
            _plot_depth(ax, cols, L, name)
        written.append(_save(fig, out / "depth.png", dpi))
        for name, cols in groups.items():
            fig = _figure((5.5, 3.2))
            ax = fig.add_subplot()
            _plot_depth(ax, cols, L, name)
            units = {c.unit for c in cols}
            ylabel = name + (f" ({UNIT_LABEL[cols[0].unit]})" if len(units) == 1 and "block" not in units else "")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(f"{name}  ·  {direction_text(cols[0].direction)}", fontsize=9)
            written.append(_save(fig, out / f"depth_{_safe(name)}.png", dpi))

    # Heads: layer x head grids.
    for c in head_columns(table):
        a = head_values(c)
        if a.size == 0 or not np.isfinite(a).any():
            continue
        nl, nh = a.shape
        fig = _figure((min(12.0, max(4.0, 0.3 * nh + 2.0)), min(12.0, max(3.0, 0.22 * nl + 1.2))))
        ax = fig.add_subplot()
        im = ax.imshow(np.ma.masked_invalid(a), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("head", fontsize=9)
        ax.set_ylabel("layer", fontsize=9)
        ax.set_title(c.metric, fontsize=10, family="monospace")
        ax.tick_params(labelsize=7)
        cb = fig.colorbar(im, ax=ax, shrink=0.8)
        cb.ax.tick_params(labelsize=7)
        written.append(_save(fig, out / f"heads_{_safe(c.metric)}.png", dpi))
    return written
