"""Layer-wise linear probes: at which depth does a model's residual stream encode a concept?

For a labelled text set, the residual stream is read at every layer ``l = 0..L`` in one forward
pass (layer 0 is the input of block 0, i.e. the embeddings; layer ``l`` is the output of block
``l - 1``), pooled per text (mean over real tokens - for decoder models without the first token,
an attention sink whose outsized activations would leak the text length into the mean - and the
last real token; texts are right-padded so real tokens keep positions 0..n-1), and a standardised
logistic-regression probe with cross-validated ``C`` is fitted per layer on a stratified training
split.  Accuracy on the held-out split is reported with a 95% Wilson interval beside a control
probe trained on shuffled labels (same features, same model selection; Hewitt & Liang 2019 call
such baselines "controls") and the majority-class rate.

Concept depth (per pooling): with ``b = max(majority rate, mean control accuracy)`` and
``best = max_l acc_l``, the depth is the first layer with ``acc_l >= b + fraction * (best - b)``
(default fraction 0.9).  It is reported as ``None`` when no layer's Wilson interval lies above
the control's (the concept is not decodable above control at any depth).

Texts longer than the context are truncated to ``max_length`` tokens with a warning (the count is
recorded in the result), or refused with ``on_long="error"``.

The built-in concepts use the VADER ground-truth sentences (``data.sentiment_sentences``):
``sentiment`` (positive: mean rating >= 1, negative: <= -1, the rest dropped) and ``source``
(movie / tweet / amazon / nyt).  Both are probed on one deterministic sample, balanced over the
eight (sentiment, source) cells, so one forward pass serves both concepts and neither label is a
proxy for the other.
"""
from __future__ import annotations

import datetime as _dt
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from layerscope.analysis.features import POOLINGS, LayerFeatures, collect_features
from layerscope.analysis.probe_fit import (
    DEFAULT_CS,
    LayerFit,
    PoolingResult,
    concept_split,
    fit_layer,
    summarise_layers,
)
from layerscope.data.labelled import (
    CONCEPTS,
    LabelledTexts,
    _label_str,
    balanced_subsample,
    check_labels,
    concept_data,
    load_labelled_file,
    sentiment_sample,
)
from layerscope.errors import LayerscopeError
from layerscope.model.subject import Subject, layer_names, load_subject
from layerscope.results import Result

# =========================================================================== models


# =========================================================================== hooks


# =========================================================================== tokenization


# =========================================================================== features


# =========================================================================== data


# =========================================================================== fitting


@dataclass
class ConceptResult:
    concept: str
    source: str
    classes: list[str]
    class_counts: dict[str, int]
    n: int
    n_train: int
    n_test: int
    majority: float
    depth_fraction: float
    poolings: dict[str, PoolingResult]
    primary_pooling: str = "mean"
    notes: list[str] = field(default_factory=list)

    @property
    def depth(self) -> int | None:
        return self.poolings[self.primary_pooling].depth

    @property
    def best_layer(self) -> int:
        return self.poolings[self.primary_pooling].best_layer

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "poolings"}
        d["poolings"] = {p: r.to_dict() for p, r in self.poolings.items()}
        d["depth"] = self.depth
        d["best_layer"] = self.best_layer
        return d


def fit_layer_probes(features: np.ndarray, labels: Sequence[str], name: str, *, source: str = "",
                     test_size: float = 0.25, Cs: Sequence[float] = DEFAULT_CS, cv: int = 3,
                     control: bool = True, depth_fraction: float = 0.9, seed: int = 0,
                     pooling: str = "mean") -> PoolingResult:
    """Probe every layer of ``features`` [L+1, N, d]; see the module docstring for the depth rule."""
    res, _ = _fit_all(features, np.asarray(labels), test_size, Cs, cv, control, depth_fraction, seed)
    return res


def _fit_all(features: np.ndarray, y: np.ndarray, test_size: float, Cs, cv: int, control: bool,
             depth_fraction: float, seed: int, progress: Callable[[], None] | None = None,
             fits: Sequence[LayerFit] | None = None):
    """Probe every layer of `features` (or take `fits`, the layers already fitted elsewhere) and summarise."""
    split = concept_split(y, test_size, seed, control)
    if fits is None:
        fits = []
        for layer in range(features.shape[0]):
            fits.append(fit_layer(features[layer], split, Cs, cv, seed))
            if progress:
                progress()
    res, majority = summarise_layers(fits, y[split.test], control, depth_fraction)
    return res, (split.train, split.test, majority)


def _check_depth_fraction(depth_fraction: float) -> None:
    if not 0 < depth_fraction <= 1:
        raise LayerscopeError(f"depth fraction must be in (0, 1], got {depth_fraction}")


def probe_concept(feats: LayerFeatures, data: LabelledTexts, *, test_size: float = 0.25,
                  Cs: Sequence[float] = DEFAULT_CS, cv: int = 3, control: bool = True,
                  depth_fraction: float = 0.9, seed: int = 0,
                  progress: Callable[[], None] | None = None,
                  fits: Mapping[str, Sequence[LayerFit]] | None = None) -> ConceptResult:
    """Probe every layer of every pooling in `feats` for the labels of `data`.

    fits: per pooling, the layers already fitted elsewhere (`probe(..., ray=...)` fits them on Ray
    workers); they are summarised exactly as layers fitted here would be."""
    classes = check_labels(data.labels, data.name)
    _check_depth_fraction(depth_fraction)
    y = np.asarray(data.labels)
    pools: dict[str, PoolingResult] = {}
    n_train = n_test = 0
    majority = 0.0
    for p, X in feats.pooled.items():
        if X.shape[1] != len(y):
            raise LayerscopeError(f"{X.shape[1]} feature rows but {len(y)} labels")
        pools[p], (tr, te, majority) = _fit_all(X, y, test_size, Cs, cv, control, depth_fraction, seed, progress,
                                                fits[p] if fits is not None else None)
        n_train, n_test = len(tr), len(te)
    return ConceptResult(concept=data.name, source=data.source, classes=classes,
                         class_counts={c: int((y == c).sum()) for c in classes}, n=len(y), n_train=n_train,
                         n_test=n_test, majority=majority, depth_fraction=depth_fraction, poolings=pools,
                         primary_pooling="mean" if "mean" in pools else next(iter(pools)),
                         notes=list(data.notes))


# =========================================================================== result


@dataclass
class ProbeResult(Result):
    kind = "layerscope.probe"

    model_id: str
    model_family: str
    weights_sha256: str | None
    num_layers: int
    layer_names: list[str]
    concepts: dict[str, ConceptResult]
    similarity: Any = None  # similarity.SimilarityResult
    options: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    created: str = ""

    def depth(self, concept: str) -> int | None:
        return self.concepts[concept].depth

    def _raw_dict(self) -> dict:
        from layerscope import __version__

        return {
            "kind": "layerscope.probe",
            "model_id": self.model_id,
            "model_family": self.model_family,
            "weights_sha256": self.weights_sha256,
            "num_layers": self.num_layers,
            "layer_names": self.layer_names,
            "layer_convention": "layer 0 = embeddings (input of block 0); layer l = output of block l-1",
            "concepts": {k: c.to_dict() for k, c in self.concepts.items()},
            "similarity": self.similarity.to_dict() if self.similarity is not None else None,
            "options": self.options,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "notes": self.notes,
            "created": self.created,
            "layerscope_version": __version__,
        }

    @classmethod
    def summary_of(cls, d: dict) -> str:
        lines = [f"{d['model_id']} ({d['model_family']}, {d['num_layers']} blocks)"]
        for name, c in (d.get("concepts") or {}).items():
            for p, r in c["poolings"].items():
                ctrl = f", control mean {np.mean(r['control']):.3f}" if r.get("control") else ""
                depth = r["depth"] if r["depth"] is not None else "n/a"
                lines.append(f"  {name} [{p}]: best {r['best_accuracy']:.3f} at layer {r['best_layer']}, depth "
                             f"{depth} (majority {c['majority']:.3f}{ctrl})")
        return "\n".join(lines)

    @classmethod
    def table_of(cls, d: dict):
        from layerscope.report.extras import extras_table

        extras = {"probe": {k: v for k, v in d.items() if k != "similarity"} if d.get("concepts") else None,
                  "layer_similarity": d.get("similarity")}
        sources = sorted({c["source"] for c in (d.get("concepts") or {}).values()})
        if d.get("similarity"):
            sources.append(f"CKA: {d['similarity']['source']}")
        return extras_table(extras, d, source="; ".join(sources) or None)

    def to_dict(self) -> dict:
        return _jsonable(self._raw_dict())


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return None if not math.isfinite(f) else f
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


# =========================================================================== API


def _as_labelled(data: Any, text_field: str, label_field: str) -> LabelledTexts:
    if isinstance(data, LabelledTexts):
        return data
    if isinstance(data, (str, Path)) or hasattr(data, "__fspath__"):
        return load_labelled_file(data, text_field, label_field)
    if isinstance(data, dict) and "texts" in data and "labels" in data:
        texts, labels = list(data["texts"]), list(data["labels"])
    elif isinstance(data, (list, tuple)) and data and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in data):
        texts, labels = [str(r[0]) for r in data], [r[1] for r in data]
    elif isinstance(data, (list, tuple)) and data and all(isinstance(r, dict) for r in data):
        for i, r in enumerate(data):
            if label_field not in r:
                raise LayerscopeError(f"item {i}: no '{label_field}' field")
            if text_field not in r:
                raise LayerscopeError(f"item {i}: no '{text_field}' field")
        texts, labels = [str(r[text_field]) for r in data], [r[label_field] for r in data]
    else:
        raise LayerscopeError("data must be a .csv/.jsonl path, a list of (text, label) pairs or of dicts, "
                              "or {'texts': [...], 'labels': [...]}")
    if len(texts) != len(labels):
        raise LayerscopeError(f"{len(texts)} texts but {len(labels)} labels")
    labs = [_label_str(x) for x in labels]
    if any(x is None for x in labs):
        raise LayerscopeError(f"item {labs.index(None)}: empty label")
    return LabelledTexts(texts=texts, labels=labs, name=label_field, source="in-memory data")  # type: ignore[arg-type]


def _progress_printer(enabled: bool, label: str):
    if not enabled:
        return None

    def show(done: int, total: int) -> None:
        print(f"\r{label}: {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    return show


def _fit_on_ray(feats: LayerFeatures, datasets: Sequence[LabelledTexts], test_size: float, Cs: Sequence[float],
                cv: int, control: bool, seed: int, address: str,
                progress: Callable[[], None]) -> list[dict[str, list[LayerFit]]]:
    """Every concept's layer fits, computed by Ray workers from the features collected here."""
    from layerscope.analysis.probe_parallel import fit_layers_ray

    splits = [concept_split(np.asarray(ds.labels), test_size, seed, control) for ds in datasets]
    return fit_layers_ray(feats.pooled, splits, Cs, cv, seed, address, progress)


def probe(
    model: Any = None,
    data: Any = None,
    *,
    concepts: Sequence[str] | str | None = None,
    text_field: str = "text",
    label_field: str = "label",
    tokenizer: Any = None,
    n: int = 2000,
    test_size: float = 0.25,
    poolings: Sequence[str] = POOLINGS,
    depth_fraction: float = 0.9,
    Cs: Sequence[float] = DEFAULT_CS,
    cv: int = 3,
    control: bool = True,
    batch_size: int = 32,
    max_length: int | None = None,
    on_long: str = "truncate",
    precision: str = "auto",
    cka: bool = False,
    cka_data: Any = "wikipedia",
    cka_tokens: int = 2048,
    cka_outlier_ratio: float | None = 5.0,
    seed: int = 0,
    progress: bool = False,
    trust_remote_code: bool = False,
    ray: str | None = None,
) -> ProbeResult:
    """Fit a linear probe at every layer of `model` for each concept; optionally add the layer CKA map.

    data: None (built-in concepts, see `concepts`: 'sentiment', 'source'), a .csv/.tsv/.jsonl/.json
    path with `text_field`/`label_field`, a list of (text, label) pairs, or {'texts', 'labels'}.
    At most `n` examples are used (a deterministic class-balanced subsample).
    ray: fit the layers as Ray tasks ("local" starts a local cluster, else a ``ray.init`` address);
    the features are still collected here, once. The numbers are the local run's.
    """
    t0 = time.perf_counter()
    if ray:  # before the model loads and the features are collected: a missing Ray is one line
        from layerscope.engine.ray_pool import require_ray

        require_ray()
    _check_depth_fraction(depth_fraction)
    subject = model if isinstance(model, Subject) else load_subject(model, tokenizer, trust_remote_code)
    if isinstance(n, bool) or not isinstance(n, int) or n < 16:
        raise LayerscopeError(f"n must be an integer >= 16, got {n!r}")
    datasets: list[LabelledTexts] = []
    if data is None:
        if concepts is None:
            concepts = list(CONCEPTS)
        elif isinstance(concepts, str):
            concepts = [c.strip() for c in concepts.split(",") if c.strip()]
        for c in concepts:
            if c not in CONCEPTS:
                raise LayerscopeError(f"unknown concept '{c}' (built-in concepts: {', '.join(CONCEPTS)})")
        sample = sentiment_sample(n, seed) if concepts else []
        datasets = [concept_data(c, sample) for c in concepts]
    else:
        if concepts:
            raise LayerscopeError("give either a dataset (data=/--data) or built-in concepts, not both")
        full = _as_labelled(data, text_field, label_field)
        check_labels(full.labels, full.name)
        keep = balanced_subsample(full.labels, n, seed)
        if len(keep) < len(full.labels):
            full.notes.append(f"class-balanced subsample of {len(keep)} of {len(full.labels)} rows (seed {seed})")
        datasets = [LabelledTexts([full.texts[i] for i in keep], [full.labels[i] for i in keep], full.name,
                                  full.source, full.notes)]
    for ds in datasets:
        check_labels(ds.labels, ds.name)
    timings: dict[str, float] = {}
    notes: list[str] = []
    results: dict[str, ConceptResult] = {}
    feats = None
    if datasets:
        texts = datasets[0].texts
        feats = collect_features(subject, texts, poolings=poolings, batch_size=batch_size, max_length=max_length,
                                 on_long=on_long, precision=precision,
                                 progress=_progress_printer(progress, "features"))
        timings["features"] = feats.wall_time_s
        if feats.n_truncated:
            notes.append(f"{feats.n_truncated} texts longer than {feats.max_length} tokens were truncated")
        t1 = time.perf_counter()
        total = len(datasets) * len(feats.pooled) * (subject.num_layers + 1)
        done = [0]
        show = _progress_printer(progress, "probes")

        def tick() -> None:
            done[0] += 1
            if show:
                show(done[0], total)

        fitted = _fit_on_ray(feats, datasets, test_size, Cs, cv, control, seed, ray, tick) if ray else None
        for i, ds in enumerate(datasets):
            results[ds.name] = probe_concept(feats, ds, test_size=test_size, Cs=Cs, cv=cv, control=control,
                                             depth_fraction=depth_fraction, seed=seed, progress=tick,
                                             fits=fitted[i] if fitted is not None else None)
        timings["probes"] = time.perf_counter() - t1
    sim = None
    if cka:
        from layerscope.analysis.similarity import layer_similarity

        t2 = time.perf_counter()
        sim = layer_similarity(subject, data=cka_data, tokens=cka_tokens, seed=seed,
                               outlier_ratio=cka_outlier_ratio or None)
        timings["cka"] = time.perf_counter() - t2
    timings["total"] = time.perf_counter() - t0
    return ProbeResult(
        model_id=subject.model_id, model_family=subject.parts.family, weights_sha256=subject.weights_sha256,
        num_layers=subject.num_layers, layer_names=layer_names(subject.num_layers), concepts=results,
        similarity=sim,
        options={"n": n, "test_size": test_size, "poolings": list(poolings), "depth_fraction": depth_fraction,
                 "Cs": list(Cs), "cv": cv, "control": "shuffled training labels" if control else None,
                 "batch_size": batch_size, "max_length": feats.max_length if feats else max_length,
                 "on_long": on_long, "seed": seed, "n_tokens": feats.n_tokens if feats else 0,
                 "precision": feats.precision if feats else None, "torch_threads": torch.get_num_threads(),
                 "mean_pooling_skips_first_token": feats.mean_skip_first if feats else None,
                 "cka_tokens": cka_tokens if cka else None},
        timings=timings, notes=notes + list(subject.parts.notes),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


# =========================================================================== HTML


