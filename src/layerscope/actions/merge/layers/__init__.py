"""Layer schemes: one merge coefficient per task, layer and sublayer.

Each scheme is one module with ``coefficients(ctx) -> (per-task coefficient dicts, details)``:
``uniform`` (one λ per task), ``lines`` (LiNeS, Wang et al. 2025), ``importance`` (measured layer
importance: ScoreTables of the fine-tuned models, or task-vector norm and alignment) and
``adamerging`` (Yang et al. 2024, coefficients learned by entropy minimisation).
"""
from __future__ import annotations

import importlib
from typing import Callable

SCHEMES: dict[str, str] = {
    "uniform": "layerscope.actions.merge.layers.uniform",
    "lines": "layerscope.actions.merge.layers.lines",
    "importance": "layerscope.actions.merge.layers.importance",
    "adamerging": "layerscope.actions.merge.layers.adamerging",
}


def scheme(name: str) -> Callable:
    from layerscope.errors import LayerscopeError

    if name not in SCHEMES:
        raise LayerscopeError(f"unknown layer scheme '{name}' (known: {', '.join(SCHEMES)})")
    return importlib.import_module(SCHEMES[name]).coefficients
