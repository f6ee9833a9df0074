"""The metric registry: every built-in metric, by name, in this one explicit table.

A metric is a small class (see `metrics.base.Metric`) in the module named here; the class is
imported only when the metric is used, so listing the names costs nothing and no module is ever
imported for a side effect. Add a metric by writing its class and adding one line below.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from layerscope.metrics.base import Metric

BUILTIN: dict[str, str] = {
    # one forward pass (the default scan)
    "block_influence": "layerscope.metrics.representation:BlockInfluence",
    "angular_distance": "layerscope.metrics.representation:AngularDistance",
    "relative_contribution": "layerscope.metrics.representation:RelativeContribution",
    "hidden_growth": "layerscope.metrics.representation:HiddenStateGrowth",
    "logit_lens": "layerscope.metrics.lens:LogitLens",
    "massive_activations": "layerscope.metrics.activations:MassiveActivations",
    "mlp_sparsity": "layerscope.metrics.activations:MLPSparsity",
    "attention_heads": "layerscope.metrics.heads:AttentionHeads",
    "weights": "layerscope.metrics.weights:WeightSpectrum",
    # ground truth and its usual proxies (not in the default scan: they cost more)
    "ablation": "layerscope.metrics.ground_truth.ablation:Ablation",
    "taylor": "layerscope.metrics.ground_truth.gradients:Taylor",
    "fisher": "layerscope.metrics.ground_truth.gradients:Fisher",
    "grad_norm": "layerscope.metrics.ground_truth.gradients:GradNorm",
    "weight_norm": "layerscope.metrics.ground_truth.gradients:WeightNorm",
    "relevance": "layerscope.metrics.ground_truth.relevance:Relevance",
    "quant_sensitivity": "layerscope.metrics.ground_truth.quant_sensitivity:QuantSensitivity",
}

# The one-pass default scan.
DEFAULT_METRICS = (
    "block_influence",
    "angular_distance",
    "relative_contribution",
    "hidden_growth",
    "logit_lens",
    "massive_activations",
    "mlp_sparsity",
    "attention_heads",
    "weights",
)


class MetricRegistry(Mapping):
    """name -> metric class, resolved on first access."""

    def __init__(self, table: dict[str, str]):
        self._table = table
        self._cache: dict[str, type] = {}

    def __getitem__(self, name: str) -> "type[Metric]":
        if name not in self._cache:
            module, _, attr = self._table[name].partition(":")
            cls = getattr(importlib.import_module(module), attr)
            if getattr(cls, "name", None) != name:
                raise RuntimeError(f"metric registry: {self._table[name]} is named {getattr(cls, 'name', None)!r}")
            self._cache[name] = cls
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


METRICS = MetricRegistry(BUILTIN)
