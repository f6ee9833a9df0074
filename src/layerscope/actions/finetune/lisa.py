"""LISA: train the embeddings, the head and a few sampled blocks, re-drawn every `interval` steps.

Pan et al. 2024, "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language Model Fine-Tuning"
(arXiv 2403.17919). Differences from LMFlow's ``DynamicLayerActivationCallback`` (and its axolotl / ms-swift
copies), which toggle ``requires_grad`` only:

* ``sampling="importance"`` draws the blocks with probabilities from a measured metric (a ScoreTable column,
  ranked with the project's `importance_order`), mixed with the uniform distribution so every block stays
  reachable; ``"uniform"`` is LISA as published.
* a block that leaves the active set loses its gradient and optimizer state (`layers.LayerGate`), so the
  optimizer holds state for the active blocks + embeddings + head only. ``trim_state=False`` reproduces
  LMFlow's behaviour (state kept for every block ever active) for comparison.
* the draw for steps [k*interval, (k+1)*interval) depends only on (seed, k), so a resumed run draws the same blocks.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from layerscope.actions.finetune.layers import LayerGate, SwitchingCallback
from layerscope.errors import LayerscopeError


def importance_weights(table: Any = None, metric: str | None = None, values: Sequence[float] | None = None,
                       direction: str = "higher", num_layers: int | None = None) -> np.ndarray:
    """Per-block weights in (0, 1], largest for the most important block: rank / L under `importance_order`.

    From a ScoreTable column (`table`, `metric`, block unit) or from raw `values` with their `direction`.
    Blocks with no value get the median weight.
    """
    from layerscope.metrics.order import importance_order

    if table is not None:
        if metric is None:
            raise LayerscopeError("importance sampling needs a metric name (e.g. relative_contribution)")
        col = table.column(metric, unit="block")
        values, direction = list(table.values(metric, unit="block")), col.direction
    if values is None:
        raise LayerscopeError("importance sampling needs a ScoreTable and a metric, or per-block values")
    order = importance_order(list(values), direction)  # least important first
    L = num_layers or len(values)
    if not order:
        raise LayerscopeError(f"metric {metric or 'values'} ranks nothing (constant or undefined); use uniform sampling")
    w = np.full(L, np.nan)
    for r, i in enumerate(order):
        w[i] = (r + 1) / len(order)
    w[np.isnan(w)] = float(np.nanmedian(w))
    return w


def sampling_probs(weights: np.ndarray | None, num_layers: int, mix: float) -> np.ndarray:
    uniform = np.full(num_layers, 1.0 / num_layers)
    if weights is None:
        return uniform
    w = np.asarray(weights, dtype=float)
    if w.shape != (num_layers,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise LayerscopeError(f"importance weights must be {num_layers} finite non-negative numbers")
    return (1 - mix) * w / w.sum() + mix * uniform


class LisaCallback(SwitchingCallback):
    """A `transformers.TrainerCallback` (also for TRL's SFTTrainer): LISA with uniform or importance sampling."""

    def __init__(self, n_layers: int, interval: int = 5, sampling: str = "uniform", table: Any = None,
                 metric: str | None = None, weights: Sequence[float] | None = None, mix: float = 0.3, seed: int = 0,
                 trim_state: bool = True):
        if sampling not in ("uniform", "importance"):
            raise LayerscopeError(f"unknown LISA sampling '{sampling}' (uniform or importance)")
        if n_layers < 1 or interval < 1:
            raise LayerscopeError("LISA needs n_layers >= 1 and interval >= 1")
        if not 0 <= mix <= 1:
            raise LayerscopeError("mix must be between 0 and 1")
        self.n_layers, self.interval, self.sampling, self.seed = int(n_layers), int(interval), sampling, int(seed)
        self.table, self.metric, self.weights, self.mix, self.trim_state = table, metric, weights, mix, trim_state
        self.gate: LayerGate | None = None
        self.probs: np.ndarray | None = None
        self.history: list[dict] = []
        self.peak_state_bytes = 0

    def setup(self, model) -> None:
        self.gate = LayerGate(model, trim_state=self.trim_state)
        L = self.gate.num_layers
        if self.n_layers > L:
            raise LayerscopeError(f"LISA asks for {self.n_layers} active blocks but the model has {L}")
        w = None
        if self.sampling == "importance":
            w = importance_weights(self.table, self.metric, self.weights, num_layers=L)
        self.probs = sampling_probs(w, L, self.mix if w is not None else 1.0)

    def draw(self, step: int) -> list[int]:
        rng = np.random.default_rng([self.seed, step // self.interval])
        return sorted(int(i) for i in rng.choice(len(self.probs), self.n_layers, replace=False, p=self.probs))

    def switch(self, step: int, optimizer: Any) -> None:
        layers = self.draw(step)
        self.gate.set_active(layers, optimizer)
        self.history.append({"step": int(step), "layers": layers})

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.gate is None:
            self.setup(model)
        self.switch(state.global_step, optimizer)

    def describe(self) -> dict:
        return {"method": "lisa", "sampling": self.sampling, "n_layers": self.n_layers, "interval": self.interval,
                "metric": self.metric, "mix": self.mix, "trim_state": self.trim_state,
                "probs": [round(float(p), 5) for p in self.probs] if self.probs is not None else None,
                "history": self.history}
