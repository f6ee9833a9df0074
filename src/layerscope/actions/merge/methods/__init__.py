"""Merge methods: how the task vectors of one tensor combine, given one coefficient per task.

Each method is one module with ``combine(base, deltas, weights, density, generator) -> merged``,
computed the way mergekit computes it (so a mergekit recipe reproduces it): task arithmetic
(Ilharco et al. 2023), TIES (Yadav et al. 2023), DARE-TIES (Yu et al. 2024).
"""
from __future__ import annotations

import importlib
from typing import Callable

METHODS: dict[str, str] = {
    "task_arithmetic": "layerscope.actions.merge.methods.task_arithmetic",
    "ties": "layerscope.actions.merge.methods.ties",
    "dare_ties": "layerscope.actions.merge.methods.dare_ties",
}


def method(name: str) -> Callable:
    from layerscope.errors import LayerscopeError

    if name not in METHODS:
        raise LayerscopeError(f"unknown merge method '{name}' (known: {', '.join(METHODS)})")
    return importlib.import_module(METHODS[name]).combine
