"""The statistics of `layerscope agree`: rank correlations, top-k overlap, bootstrap stability, verdicts."""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np

from layerscope.errors import LayerscopeError

DEFAULT_TRUTHS = ("ablation_kl", "ablation_dloss", "taylor", "fisher", "quant_sensitivity")


OPTIONAL_TRUTHS = ("quant_sensitivity",)  # used only when present in the table


# truth column metric -> the registered metric that produces it
TRUTH_SOURCES = {
    "ablation_kl": "ablation", "ablation_dloss": "ablation", "ablation_dppl": "ablation",
    "taylor": "taylor", "taylor_abs": "taylor", "fisher": "fisher", "grad_norm": "grad_norm",
    "relevance": "relevance", "relevance_signed": "relevance", "relevance_contribution": "relevance",
    "quant_sensitivity": "quant_sensitivity",
}


KS = (3, 5, 7)


UNITS = ("block", "attention", "mlp")


SECTION_KEY = "agreement"


def kind_of(metric: str) -> str:
    """'ablation', 'gradient', 'quantization' or 'cheap' (one forward pass or data-free)."""
    if metric.startswith("ablation_"):
        return "ablation"
    if metric in ("taylor", "taylor_abs", "fisher", "grad_norm") or metric.startswith("relevance"):
        return "gradient"
    if metric.startswith("quant_"):
        return "quantization"
    return "cheap"


def oriented(values: Sequence[Any], direction: str | None) -> np.ndarray:
    """Values as floats (NaN for None) with larger = more important."""
    v = np.array([np.nan if x is None else float(x) for x in values], dtype=float)
    if direction == "lower":
        return -v
    if direction == "higher":
        return v
    raise LayerscopeError("a descriptive metric (no direction) has no importance order")


def least_important(scores: np.ndarray, k: int, mask: np.ndarray | None = None) -> list[int]:
    """The k units with the smallest oriented score (ties: lower index first) among `mask`."""
    from layerscope.metrics.order import importance_order

    vals = [float(s) if (mask is None or mask[i]) else None for i, s in enumerate(scores)]
    return importance_order(vals, "higher")[:k]


def rank_positions(scores: np.ndarray) -> np.ndarray:
    """0 = least important; NaN where undefined."""
    order = least_important(scores, len(scores))
    pos = np.full(len(scores), np.nan)
    for r, i in enumerate(order):
        pos[i] = r
    return pos


def correlate(metric: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Spearman and Kendall tau-b of two oriented vectors on their common finite entries."""
    from scipy import stats

    mask = np.isfinite(metric) & np.isfinite(truth)
    n = int(mask.sum())
    out: dict[str, Any] = {"n": n, "spearman": None, "spearman_p": None, "kendall": None, "kendall_p": None}
    x, y = metric[mask], truth[mask]
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    rho, p = stats.spearmanr(x, y)
    tau, pt = stats.kendalltau(x, y)
    out.update(spearman=_f(rho), spearman_p=_f(p), kendall=_f(tau), kendall_p=_f(pt))
    return out


def topk_overlap(metric: np.ndarray, truth: np.ndarray, k: int) -> dict[str, Any]:
    """Share of the k least important units (by the truth) that the metric also puts in its k least."""
    mask = np.isfinite(metric) & np.isfinite(truth)
    k = min(k, int(mask.sum()))
    if k <= 0:
        return {"k": 0, "overlap": None, "metric": [], "truth": []}
    a, b = least_important(metric, k, mask), least_important(truth, k, mask)
    if not a or not b:  # a constant column names no least important units
        return {"k": k, "overlap": None, "metric": a, "truth": b}
    return {"k": k, "overlap": len(set(a) & set(b)) / k, "metric": a, "truth": b}


def _f(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _truth_column(table, truth: str, unit: str):
    key = truth if unit == "block" else f"{truth}@{unit}"
    return table.columns.get(key)


def resolve_truths(table, truths: Iterable[str] | str | None) -> list[str]:
    """Truth metric names: validated, defaults filled in, optional ones kept only when present."""
    if truths is None:
        names = [t for t in DEFAULT_TRUTHS if t not in OPTIONAL_TRUTHS or _present(table, t)]
    else:
        if isinstance(truths, str):
            truths = [truths]
        names = []
        for item in truths:
            for t in (x.strip() for x in str(item).split(",")):
                if t and t not in names:
                    names.append(t)
    if not names:
        raise LayerscopeError("no ground-truth metric requested")
    for t in names:
        if t not in TRUTH_SOURCES:
            raise LayerscopeError(f"unknown ground-truth metric '{t}' (known: {', '.join(sorted(TRUTH_SOURCES))})")
    return names


def _present(table, truth: str) -> bool:
    return table is not None and any(_truth_column(table, truth, u) is not None for u in UNITS)


def compare(table, truths: Sequence[str], ks: Sequence[int] = KS) -> list[dict[str, Any]]:
    """One row per metric column with a direction: its agreement with every truth of its unit."""
    rows = []
    for name, col in table.columns.items():
        if col.direction is None or col.unit not in UNITS:
            continue
        v = oriented(col.values, col.direction)
        if not np.isfinite(v).any():
            continue
        vs: dict[str, Any] = {}
        for t in truths:
            tc = _truth_column(table, t, col.unit)
            if tc is None or tc.name == name or tc.direction is None:
                continue
            tv = oriented(tc.values, tc.direction)
            res = correlate(v, tv)
            res["topk"] = {str(k): topk_overlap(v, tv, k)["overlap"] for k in ks}
            vs[t] = res
        if not vs:
            continue
        rows.append({"column": name, "metric": col.metric, "unit": col.unit, "direction": col.direction,
                     "kind": kind_of(col.metric), "vs": vs})
    return rows


def bootstrap_stability(per_window: dict[str, np.ndarray], directions: dict[str, str], truth: dict[str, np.ndarray],
                        B: int = 20, seed: int = 0, k: int = 5) -> dict[str, dict[str, Any]]:
    """Bootstrap over window groups: how stable each column's ranking is (see module docstring).

    per_window[col]: [G, L] values of the column on each group of windows alone; truth[col]: the
    oriented primary-truth vector of the column's unit (or absent).
    """
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, Any]] = {}
    for col, arr in per_window.items():
        arr = np.asarray(arr, dtype=float)
        G = arr.shape[0]
        if G < 2:
            continue
        direction = directions[col]
        ref = oriented(_nanmean(arr), direction)
        draws = rng.integers(0, G, size=(B, G))
        rhos, jacc, vs_truth = [], [], []
        kk = min(k, int(np.isfinite(ref).sum()))
        ref_low = set(least_important(ref, kk))
        for d in draws:
            rep = oriented(_nanmean(arr[d]), direction)
            r = correlate(rep, ref)["spearman"]
            if r is not None:
                rhos.append(r)
            low = set(least_important(rep, kk))
            if kk and (low | ref_low):  # a constant replicate names no units: no overlap to measure
                jacc.append(len(low & ref_low) / len(low | ref_low))
            t = truth.get(col)
            if t is not None:
                rt = correlate(rep, t)["spearman"]
                if rt is not None:
                    vs_truth.append(rt)
        out[col] = {
            "groups": G, "resamples": B,
            "spearman_mean": _f(np.mean(rhos)) if rhos else None,
            "spearman_min": _f(np.min(rhos)) if rhos else None,
            f"bottom{kk}_jaccard_mean": _f(np.mean(jacc)) if jacc else None,
            "truth_spearman_ci90": [_f(np.percentile(vs_truth, 5)), _f(np.percentile(vs_truth, 95))] if vs_truth else None,
        }
    return out


def _nanmean(a: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        cnt = np.isfinite(a).sum(0)
        s = np.nansum(a, axis=0)
        return np.where(cnt > 0, s / np.maximum(cnt, 1), np.nan)


def corpus_agreement(table_a, table_b) -> dict[str, float | None]:
    """Spearman between the values a column takes on two corpora (same model, same settings)."""
    out = {}
    for name, col in table_a.columns.items():
        other = table_b.columns.get(name)
        if other is None or col.direction is None or col.unit not in UNITS:
            continue
        a, b = oriented(col.values, col.direction), oriented(other.values, other.direction)
        out[name] = correlate(a, b)["spearman"]
    return out


def _primary_for(truths: Sequence[str], row: dict) -> str | None:
    return next((t for t in truths if t in row["vs"]), None)


def verdict(rho: float | None, stability: float | None, corpus: float | None) -> str:
    if rho is None:
        return "undetermined"
    if rho >= 0.7 and (stability is None or stability >= 0.8) and (corpus is None or corpus >= 0.6):
        return "trust"
    if rho >= 0.4:
        return "use with care"
    if rho <= -0.4:
        return "inverted"
    return "do not use"


def recommend(rows: list[dict], truths: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Per unit: candidate metrics (not ablation, not the truths) best first, with a verdict."""
    out: dict[str, list[dict[str, Any]]] = {}
    for unit in UNITS:
        cands = []
        for r in rows:
            if r["unit"] != unit or r["kind"] in ("ablation", "quantization"):
                continue
            t = _primary_for(truths, r)
            if t is None:
                continue
            rho = r["vs"][t]["spearman"]
            stab = (r.get("stability") or {}).get("spearman_mean")
            corp = r.get("cross_corpus_spearman")
            others = [v["spearman"] for v in r["vs"].values() if v["spearman"] is not None]
            cands.append({
                "column": r["column"], "metric": r["metric"], "kind": r["kind"], "truth": t,
                "spearman": rho, "kendall": r["vs"][t]["kendall"],
                "top5_overlap": r["vs"][t]["topk"].get("5"),
                "mean_spearman_all_truths": _f(np.mean(others)) if others else None,
                "stability": stab, "cross_corpus_spearman": corp,
                "verdict": verdict(rho, stab, corp),
            })
        cands.sort(key=lambda c: (-(c["spearman"] if c["spearman"] is not None else -2),
                                  -(c["stability"] if c["stability"] is not None else 0), c["column"]))
        for n, c in enumerate(cands, 1):
            c["rank"] = n
        if cands:
            out[unit] = cands
    return out


def disagreements(table, rows: list[dict], truth: str, unit: str = "block", top: int = 5) -> dict[str, Any]:
    """Units whose rank under `truth` differs most from their mean rank under the cheap metrics."""
    tc = _truth_column(table, truth, unit)
    if tc is None:
        return {}
    t_rank = rank_positions(oriented(tc.values, tc.direction))
    per_metric, ranks = [], []
    for r in rows:
        if r["unit"] != unit or r["kind"] != "cheap":
            continue
        col = table.columns[r["column"]]
        mr = rank_positions(oriented(col.values, col.direction))
        if np.isnan(mr).any():  # partial columns (angular_distance_n8) would skew the mean rank
            continue
        ranks.append(mr)
        gap = mr - t_rank
        worst = int(np.nanargmax(np.abs(gap)))
        per_metric.append({"column": r["column"], "unit_index": worst, "metric_rank": int(mr[worst]),
                           "truth_rank": int(t_rank[worst]), "gap": int(gap[worst])})
    if not ranks:
        return {}
    mean_rank = np.mean(ranks, axis=0)
    gap = mean_rank - t_rank
    order = sorted(range(len(gap)), key=lambda i: (-abs(gap[i]) if np.isfinite(gap[i]) else 0, i))[:top]
    units = [{
        "unit_index": i, "truth_rank": int(t_rank[i]), "mean_cheap_rank": float(mean_rank[i]), "gap": float(gap[i]),
        "reading": ("cheap metrics call it less important than it is (risky to remove)" if gap[i] < 0
                    else "cheap metrics call it more important than it is"),
    } for i in order if np.isfinite(gap[i])]
    return {"unit": unit, "truth": truth, "rank_note": "rank 0 = least important", "metrics_used": len(ranks),
            "units": units, "per_metric_worst": per_metric}
