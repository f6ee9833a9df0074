"""Layer probes fanned out over Ray workers (`probe --ray`): the same numbers as the local run.

The features are collected once, on the driver (one forward pass); what costs time afterwards is
fitting a probe and its control, with cross-validated C, for every (concept, pooling, layer), and
those fits are independent. Each one is a Ray task: the fits cost about the same, and one task per
fit lets a free worker take the next one, so the workers stay balanced without dealing by hand.
The payload (pooled features, each concept's split and control labels, the fit settings) is put in
the object store once. A fit depends only on its layer's features, the split drawn on the driver and
the seed of its CV folds, so every count equals the one `fit_layer` gives locally.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from layerscope.analysis.probe_fit import ConceptSplit, LayerFit, fit_layer


def _task(payload: tuple, item: tuple[int, str, int]) -> LayerFit:
    pooled, splits, Cs, cv, seed = payload
    concept, pooling, layer = item
    return fit_layer(pooled[pooling][layer], splits[concept], Cs, cv, seed)


def fit_layers_ray(pooled: Mapping[str, np.ndarray], splits: Sequence[ConceptSplit], Cs: Sequence[float],
                   cv: int, seed: int, address: str | None = "local",
                   progress: Callable[[], None] | None = None) -> list[dict[str, list[LayerFit]]]:
    """Every layer of every pooling fitted for every concept by Ray workers.

    pooled: pooling -> features [L+1, N, d]; splits: one per concept. Returns, per concept (in the
    order of `splits`), pooling -> the layer fits in layer order, as `probe_concept(fits=...)` takes them."""
    from layerscope.engine.ray_pool import WorkerPool

    items = [(c, p, layer) for c in range(len(splits)) for p in pooled for layer in range(pooled[p].shape[0])]
    with WorkerPool((dict(pooled), list(splits), tuple(Cs), cv, seed), address) as pool:
        fits = pool.map(_task, items)
    out: list[dict[str, list[LayerFit]]] = [{p: [] for p in pooled} for _ in splits]
    for (c, p, _), fit in zip(items, fits):
        out[c][p].append(fit)
        if progress:
            progress()
    return out
