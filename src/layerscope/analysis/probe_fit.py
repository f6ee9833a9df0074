"""Fitting one linear probe: standardised logistic regression with cross-validated C, Wilson intervals, the concept-depth rule.

Also one layer's fit (`fit_layer`, the unit `probe --ray` fans out) and the per-pooling summary of the layer fits."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from layerscope.errors import LayerscopeError

DEFAULT_CS = (1e-3, 1e-2, 1e-1, 1.0)


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = correct / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


class _Probe:
    """Standardise + logistic regression (the pair is what `fit_probe` returns as one object)."""

    def __init__(self, scaler, clf, C: float, cv_accuracy: list[float]):
        self.scaler, self.clf, self.C, self.cv_accuracy = scaler, clf, C, cv_accuracy

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.clf.predict(self.scaler.transform(X))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.clf.predict_proba(self.scaler.transform(X))

    @property
    def classes_(self) -> np.ndarray:
        return self.clf.classes_


def _fit_lr(X: np.ndarray, y: np.ndarray, C: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X)
    clf = LogisticRegression(C=C, max_iter=max_iter, tol=1e-3).fit(scaler.transform(X), y)
    return scaler, clf


def fit_probe(X_train: np.ndarray, y_train: np.ndarray, Cs: Sequence[float] = DEFAULT_CS, cv: int = 3,
              seed: int = 0, max_iter: int = 300) -> _Probe:
    """Logistic regression on standardised features, C chosen by stratified k-fold CV accuracy.

    The scaler is refitted inside each fold. BLAS runs single-threaded here: these problems are
    small, and a multi-threaded BLAS on a busy machine is many times slower, not faster.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    if not Cs:
        raise LayerscopeError("at least one value of C is needed")
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)
        counts = np.unique(y_train, return_counts=True)[1]
        folds = int(min(cv, counts.min()))
        cv_acc: list[float] = []
        if len(Cs) > 1 and folds >= 2:
            splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(X_train, y_train))
            for C in Cs:
                acc = 0.0
                for a, b in splits:
                    sc, clf = _fit_lr(X_train[a], y_train[a], float(C), max_iter)
                    acc += float((clf.predict(sc.transform(X_train[b])) == y_train[b]).mean())
                cv_acc.append(acc / len(splits))
            best = float(Cs[int(np.argmax(cv_acc))])
        else:
            best = float(Cs[0])
        sc, clf = _fit_lr(X_train, y_train, best, max_iter)
    return _Probe(sc, clf, best, cv_acc)


@dataclass(frozen=True)
class ConceptSplit:
    """One concept's held-out split and the control's shuffled training labels.

    Drawn once per concept from the seed and shared by every layer and pooling, so a layer fitted
    anywhere (here or on a Ray worker) sees the same rows and the same control labels."""

    y: np.ndarray
    train: np.ndarray
    test: np.ndarray
    y_control: np.ndarray | None  # None: no control probe


def concept_split(y: np.ndarray, test_size: float, seed: int, control: bool) -> ConceptSplit:
    """The stratified train/test split of `y` and, with `control`, its shuffled training labels."""
    tr, te = _split(y, test_size, seed)
    y_ctrl = y[tr][np.random.default_rng(seed + 1).permutation(len(tr))] if control else None
    return ConceptSplit(y=y, train=tr, test=te, y_control=y_ctrl)


@dataclass(frozen=True)
class LayerFit:
    """What one layer's probe (and control) got right on the held-out rows: all a layer contributes."""

    correct: int
    C: float
    control_correct: int | None


def fit_layer(X: np.ndarray, split: ConceptSplit, Cs: Sequence[float], cv: int, seed: int) -> LayerFit:
    """Fit the probe (and the control, if the split has one) on one layer's features X [N, d].

    The result depends only on the arguments (the CV folds are seeded by `seed`), which is what
    lets the layers be fitted in any order, in any process, with the same numbers."""
    y, tr, te = split.y, split.train, split.test
    pr = fit_probe(X[tr], y[tr], Cs, cv, seed)
    correct = int((pr.predict(X[te]) == y[te]).sum())
    ctrl = None
    if split.y_control is not None:
        ctrl = int((fit_probe(X[tr], split.y_control, Cs, cv, seed).predict(X[te]) == y[te]).sum())
    return LayerFit(correct=correct, C=pr.C, control_correct=ctrl)


def chosen_C(probe: _Probe) -> float:
    return probe.C


def concept_depth(acc: Sequence[float], baseline: float, fraction: float) -> int:
    best = max(acc)
    target = baseline + fraction * (best - baseline)
    return next(i for i, a in enumerate(acc) if a >= target - 1e-12)


def _split(y: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    if not 0 < test_size < 1:
        raise LayerscopeError(f"test_size must be between 0 and 1, got {test_size}")
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=test_size, stratify=y, random_state=seed)
    return np.sort(tr), np.sort(te)


@dataclass
class PoolingResult:
    """One pooling's probe curve over the layers, with its control, baseline and concept depth."""

    accuracy: list[float]
    ci_low: list[float]
    ci_high: list[float]
    C: list[float]
    control: list[float] | None
    control_ci_low: list[float] | None
    control_ci_high: list[float] | None
    depth: int | None
    depth_reason: str
    best_layer: int
    best_accuracy: float
    baseline: float

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def summarise_layers(fits: Sequence[LayerFit], y_test: np.ndarray, control: bool,
                     depth_fraction: float) -> tuple[PoolingResult, float]:
    """Accuracies, Wilson intervals, baseline and concept depth from the per-layer held-out counts."""
    n_test = len(y_test)
    acc = [f.correct / n_test for f in fits]
    lo, hi = (list(v) for v in zip(*(wilson_interval(f.correct, n_test) for f in fits)))
    cacc = clo = chi = None
    if control:
        cacc = [f.control_correct / n_test for f in fits]
        clo, chi = (list(v) for v in zip(*(wilson_interval(f.control_correct, n_test) for f in fits)))
    _, counts = np.unique(y_test, return_counts=True)
    majority = float(counts.max() / n_test)
    baseline = max(majority, float(np.mean(cacc))) if control else majority
    best = int(np.argmax(acc))
    above = [lo[i] > (max(chi) if control else majority) for i in range(len(acc))]
    if any(above):
        depth, reason = concept_depth(acc, baseline, depth_fraction), (
            f"first layer reaching {depth_fraction:.0%} of the best accuracy above the baseline {baseline:.3f}")
    else:
        depth, reason = None, "no layer's 95% interval lies above the control: not decodable at any depth"
    res = PoolingResult(accuracy=acc, ci_low=lo, ci_high=hi, C=[f.C for f in fits], control=cacc,
                        control_ci_low=clo, control_ci_high=chi, depth=depth, depth_reason=reason,
                        best_layer=best, best_accuracy=float(acc[best]), baseline=baseline)
    return res, majority
