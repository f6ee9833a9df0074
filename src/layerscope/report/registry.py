"""The report's sections: the built-in ones, listed here, and sections added at run time.

Each built-in section is one module under `report/sections/` with a `render` function; it is
imported only when a report is drawn. `register_section` adds (or replaces, by key) a section at
run time -- e.g. a user's own analysis. Sections render in `order`; ties keep the list order.
"""
from __future__ import annotations

import importlib
import itertools
from dataclasses import dataclass
from typing import Callable

from layerscope.metrics.table import ScoreTable

# key, title, "module:function", order, reads table.extras[key] (True) or the whole table (False)
BUILTIN: tuple[tuple[str, str, str, int, bool], ...] = (
    ("summary", "Model and calibration", "layerscope.report.sections.summary:render", 10, False),
    ("heatmap", "Importance heatmap: layer × metric", "layerscope.report.sections.heatmap:render", 20, False),
    ("depth", "Metrics over depth", "layerscope.report.sections.depth:render", 30, False),
    ("ranking", "Rankings: the least important layers per metric", "layerscope.report.sections.ranking:render", 40, False),
    ("agreement", "Agreement with ground truth", "layerscope.report.sections.agreement:render", 45, False),
    ("heads", "Attention heads", "layerscope.report.sections.heads:render", 50, False),
    ("massive_activations", "Massive activations", "layerscope.report.sections.massive:render", 60, False),
    ("prune", "Pruning: what was removed", "layerscope.report.sections.prune:render", 65, True),
    ("sweep", "Removal curves", "layerscope.report.sections.sweep:render", 70, False),
    ("probe", "Layer-wise probes: concept depth", "layerscope.report.sections.probe:render", 70, True),
    ("layer_similarity", "Layer similarity (linear CKA)", "layerscope.report.sections.similarity:render", 71, True),
    ("lens", "Logit lens vs tuned lens", "layerscope.report.sections.lens:render", 72, True),
    ("neurons", "Neuron decoding", "layerscope.report.sections.neurons:render", 73, True),
    ("steer", "Steering at the depth that knows", "layerscope.report.sections.steer:render", 74, True),
    ("finetune", "Fine-tuning the layers that matter", "layerscope.report.sections.finetune:render", 76, True),
    ("merge", "Merging by layer: coefficients over depth", "layerscope.report.sections.merge:render", 76, True),
    ("quantization", "Mixed-precision quantization", "layerscope.report.sections.quantization:render", 80, False),
    ("sparsify", "Sparsity per block", "layerscope.report.sections.sparsify:render", 81, True),
    ("definitions", "Metric definitions and references", "layerscope.report.sections.definitions:render", 900, False),
)


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    render: Callable[[ScoreTable], str | None]
    order: int = 100
    builtin: bool = False  # ours: a failure is a bug and propagates; a run-time section's failure is shown


class _Lazy:
    """A built-in section's render function, imported on first call."""

    def __init__(self, target: str, extras_key: str | None):
        self.target, self.extras_key = target, extras_key

    def __call__(self, table: ScoreTable) -> str | None:
        module, _, attr = self.target.partition(":")
        fn = getattr(importlib.import_module(module), attr)
        if self.extras_key is not None:
            return fn(table.extras.get(self.extras_key) or {})
        return fn(table)


_BUILTIN = {key: (Section(key, title, _Lazy(target, key if extras else None), order, builtin=True), n)
            for n, (key, title, target, order, extras) in enumerate(BUILTIN)}
_RUNTIME: dict[str, tuple[Section, int]] = {}
_HIDDEN: set[str] = set()
_SEQ = itertools.count(len(BUILTIN))


def register_section(key: str, title: str, render: Callable[[ScoreTable], str | None], order: int = 100) -> None:
    """Add (or replace, by key) a report section for the rest of the process.

    At render time every section whose `render(table)` returns non-None HTML is included, sorted by
    `order`. The returned HTML is inserted without escaping. Built-in orders: summary 10, heatmap
    20, depth 30, ranking 40, heads 50, massive_activations 60, definitions 900.
    """
    if not key or not isinstance(key, str):
        raise ValueError("section key must be a non-empty string")
    if not callable(render):
        raise TypeError("render must be callable: render(table) -> str | None")
    seq = _RUNTIME[key][1] if key in _RUNTIME else next(_SEQ)
    _RUNTIME[key] = (Section(key=key, title=title, render=render, order=int(order)), seq)
    _HIDDEN.discard(key)


def unregister_section(key: str) -> None:
    """Remove a section (no error if there is none by that key)."""
    if _RUNTIME.pop(key, None) is None and key in _BUILTIN:
        _HIDDEN.add(key)


def sections() -> list[Section]:
    """Every section in render order."""
    merged: dict[str, tuple[Section, int]] = {k: v for k, v in _BUILTIN.items() if k not in _HIDDEN}
    merged.update(_RUNTIME)
    return [s for s, _ in sorted(merged.values(), key=lambda item: (item[0].order, item[1]))]
