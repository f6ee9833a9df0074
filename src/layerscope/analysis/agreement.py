"""How well does every cheap layer-importance metric agree with the ground truth?

For every metric column that has an importance direction (block, attention and MLP units) and
every ground truth present for the same unit (``ablation_kl``, ``ablation_dloss``, ``taylor``,
``fisher`` and, where another scan produced it, ``quant_sensitivity``):

* Spearman's rho and Kendall's tau-b (scipy.stats) between the two importance orders. Both columns
  are first oriented so that larger = more important (a "lower" metric is negated), so a positive
  correlation always means "agrees". Units where either value is undefined are left out (n says
  how many were compared).
* top-k overlap: |k least important by the metric  ∩  k least important by the truth| / k for
  k = 3, 5, 7 (ties broken by layer index, as ScoreTable.ranking does).
* ranking stability (needs per-window values, see `window_values`): the calibration windows are
  split into G groups, every cheap data-dependent metric is scanned on each group alone, and B = 20
  bootstrap resamples of the groups (with replacement) give B replicate columns (mean over the
  drawn groups). Reported: mean and minimum Spearman between a replicate and the all-groups mean,
  the mean Jaccard overlap of their 5 least important units, and the 5-95 % bootstrap interval of
  the Spearman with the primary truth (the truth itself held fixed). Data-free metrics (weight
  statistics) are stable by construction (reported as 1.0 with kind "data-free").
* corpus dependence: Spearman between the metric's values from Wikipedia and from Shakespeare
  calibration text (same number of tokens and window length).

Recommendation: per unit, the non-ground-truth metrics sorted by their Spearman with the primary
truth (the first truth in the list that is present for the unit, `ablation_kl` by default), with
a verdict: "trust" (rho >= 0.7, and where measured bootstrap stability >= 0.8 and cross-corpus
rho >= 0.6), "use with care" (rho >= 0.4), "inverted" (rho <= -0.4: it ranks the other way round),
"do not use" (otherwise). Disagreements: for the block unit, the blocks whose rank under the primary
truth differs most from their mean rank under the cheap metrics.

`agree(...)` runs whatever is missing (scan of the default metrics, ablation, gradients, the
per-window and second-corpus scans), stores the analysis in ``table.extras['agreement']`` and
optionally writes agreement.json, scores.json and report.html. The report section is registered
with the report package on import.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from layerscope.errors import LayerscopeError

AGREEMENT_VERSION = 1
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
EXTRA_SCORERS = ("grad_norm", "relevance", "weight_norm")  # run by `agree` next to the truths
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


# --------------------------------------------------------------------------- statistics
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
    idx = [i for i in range(len(scores)) if (mask is None or mask[i]) and np.isfinite(scores[i])]
    idx.sort(key=lambda i: (scores[i], i))
    return idx[:k]


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
    return {"k": k, "overlap": len(set(a) & set(b)) / k, "metric": a, "truth": b}


def _f(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# --------------------------------------------------------------------------- the comparison
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


# --------------------------------------------------------------------------- stability
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
            if kk:
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


# --------------------------------------------------------------------------- verdicts
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


def analyse(table, truths: Iterable[str] | str | None = None, *, per_window: dict[str, np.ndarray] | None = None,
            window_info: dict[str, Any] | None = None, second_corpus=None, corpus_names: tuple[str, str] | None = None,
            bootstrap: int = 20, seed: int = 0, ks: Sequence[int] = KS) -> dict[str, Any]:
    """The whole agreement analysis of a score table (pure: nothing is run here)."""
    names = resolve_truths(table, truths)
    present = [t for t in names if _present(table, t)]
    missing = [t for t in names if t not in present]
    if not present:
        raise LayerscopeError(f"none of the ground truths ({', '.join(names)}) is in the score table; "
                              "run `layerscope agree` (it computes them) or scan with --metrics ablation,taylor,fisher")
    rows = compare(table, present, ks)
    primary = present[0]
    notes = []
    if per_window:
        directions = {c: table.columns[c].direction for c in per_window if c in table.columns}
        truth_vec = {}
        for c in directions:
            tc = _truth_column(table, primary, table.columns[c].unit)
            if tc is not None:
                truth_vec[c] = oriented(tc.values, tc.direction)
        stab = bootstrap_stability({c: per_window[c] for c in directions}, directions, truth_vec, B=bootstrap, seed=seed)
        for r in rows:
            if r["column"] in stab:
                r["stability"] = stab[r["column"]]
            elif r["kind"] == "cheap" and r["column"] in (window_info or {}).get("data_free_columns", []):
                r["stability"] = {"spearman_mean": 1.0, "spearman_min": 1.0, "note": "data-free: no sampling noise"}
    else:
        notes.append("ranking stability not measured (no per-window values)")
    if second_corpus is not None:
        cc = corpus_agreement(table, second_corpus)
        for r in rows:
            if r["column"] in cc:
                r["cross_corpus_spearman"] = cc[r["column"]]
    else:
        notes.append("corpus dependence not measured (no second corpus)")
    if missing:
        notes.append(f"ground truths not available: {', '.join(missing)}")
    rec = recommend(rows, present)
    p = table.provenance
    result = {
        "version": AGREEMENT_VERSION,
        "model_id": p.model_id, "num_layers": p.num_layers, "calibration_source": p.calibration_source,
        "truths": present, "primary_truth": primary, "ks": list(ks),
        "truth_details": {t: _truth_info(table, t) for t in present},
        "rows": rows,
        "recommendation": rec,
        "answer": _answer(rec),
        "disagreements": disagreements(table, rows, primary),
        "stability": dict(window_info or {}, resamples=bootstrap if per_window else 0),
        "corpora": list(corpus_names) if corpus_names else None,
        "notes": notes,
    }
    return result


def _truth_info(table, truth: str) -> dict[str, Any]:
    col = _truth_column(table, truth, "block") or next(
        (c for u in UNITS if (c := _truth_column(table, truth, u)) is not None), None)
    if col is None:
        return {}
    keep = ("data", "positions_scored", "tokens", "base_nll", "base_perplexity", "loss", "wall_time_s")
    return {"definition": col.definition, **{k: col.details[k] for k in keep if k in col.details}}


def _answer(rec: dict[str, list[dict]]) -> str:
    block = rec.get("block") or []
    if not block:
        return "no block-level candidate metric could be compared with a ground truth"
    cheap = [c for c in block if c["kind"] == "cheap"]
    best = cheap[0] if cheap else block[0]
    rho = best["spearman"]
    msg = (f"On this model, the cheap metric that agrees best with {best['truth']} is {best['column']} "
           f"(Spearman {rho:+.2f}, verdict: {best['verdict']})" if rho is not None else
           f"no cheap metric correlates with {best['truth']}")
    grad = [c for c in block if c["kind"] == "gradient"]
    if grad and grad[0]["spearman"] is not None:
        msg += f"; the best gradient scorer is {grad[0]['column']} (Spearman {grad[0]['spearman']:+.2f})"
    bad = [c["column"] for c in cheap if c["verdict"] in ("inverted",)]
    if bad:
        msg += f"; inverted (rank the other way round): {', '.join(bad)}"
    return msg + "."


# --------------------------------------------------------------------------- per-window values
def window_values(model, ids, metrics: Sequence[str], groups: int, *, tokenizer=None, seq_len: int | None = None,
                  batch_size: int = 4, seed: int = 0, options: dict | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Scan `metrics` on each of `groups` disjoint groups of the windows `ids` [N, T] alone.

    Returns ({column: [G, L] values}, info). Metric values are streaming means over the tokens of a
    group, so the mean over groups equals the full-data value for token-mean metrics.
    """
    import torch

    from layerscope.metrics.scan import scan

    n = int(ids.shape[0])
    G = max(2, min(int(groups), n))
    if n < 2:
        raise LayerscopeError("ranking stability needs at least two calibration windows")
    bounds = np.linspace(0, n, G + 1).round().astype(int)
    per: dict[str, list] = {}
    for g in range(G):
        part = ids[bounds[g]:bounds[g + 1]]
        t = scan(model, part, list(metrics), tokenizer=tokenizer, tokens=int(part.numel()), seq_len=int(ids.shape[1]),
                 batch_size=batch_size, attn_seqs=min(2, int(part.shape[0])), seed=seed, options=options)
        for name, col in t.columns.items():
            if col.direction is None or col.unit not in UNITS:
                continue
            per.setdefault(name, []).append([np.nan if v is None else float(v) for v in col.values])
    arrays = {k: np.array(v, dtype=float) for k, v in per.items() if len(v) == G}
    info = {"groups": G, "windows": n, "windows_per_group": [int(bounds[g + 1] - bounds[g]) for g in range(G)],
            "metrics": list(metrics), "method": "each group of windows scanned alone; bootstrap over groups"}
    del torch
    return arrays, info


# --------------------------------------------------------------------------- the API
def agree(model: Any = None, scores: Any = None, truth: Iterable[str] | str | None = None, out: str | Path | None = None,
          *, tokenizer=None, data: str = "wikipedia", second_corpus: str | None = "shakespeare", tokens: int = 4096,
          seq_len: int = 512, batch_size: int = 4, bootstrap: int = 20, groups: int = 8, ablation_data: str = "evaluation",
          ablation_tokens: int = 2048, gradient_tokens: int | None = None, extra_scorers: bool = True, seed: int = 0,
          trust_remote_code: bool = False, progress: bool = False, options: dict[str, Any] | None = None,
          log=None) -> "Any":
    """Score table with the agreement analysis in ``table.extras['agreement']``.

    model: as for `scan` (None = the embedded SmolLM2). scores: a ScoreTable or a scores.json path
    to start from (it must come from the same model); whatever the analysis needs and the table lacks
    (the default cheap metrics, the ground truths, grad_norm / relevance / weight_norm when
    `extra_scorers`) is computed. `options` are passed to the scans' metrics (e.g. ablation_greedy,
    quant_tokens). With `out`, writes agreement.json, scores.json and report.html there.
    """
    import torch

    from layerscope.data.windows import prepare_tokens
    from layerscope.metrics import DEFAULT_METRICS, METRICS
    from layerscope.metrics.scan import resolve_metrics, scan
    from layerscope.metrics.table import ScoreTable
    from layerscope.model.adapter import find_parts

    say = log or (lambda msg: None)
    extra_options = options
    table = None
    if scores is not None:
        table = scores if isinstance(scores, ScoreTable) else ScoreTable.from_json(scores)
    names = resolve_truths(table, truth)

    model_id, weights_sha = None, None
    if model is None or isinstance(model, str) or hasattr(model, "__fspath__"):
        from layerscope.model.loading import load_model

        loaded = load_model(model, trust_remote_code=trust_remote_code)
        model, model_id, weights_sha = loaded.model, loaded.model_id, loaded.weights_sha256
        tokenizer = tokenizer or loaded.tokenizer
    model.eval()
    parts = find_parts(model)
    if table is not None:
        _check_same_model(table, parts.num_layers, weights_sha, scores)
        seq_len = int(table.provenance.seq_len or seq_len)
        tokens = int(table.provenance.calibration_tokens or tokens)
    options: dict[str, Any] = {"ablation_data": ablation_data, "ablation_tokens": ablation_tokens,
                               "ablation_seq_len": seq_len}
    if tokenizer is not None:
        options["tokenizer"] = tokenizer
    if gradient_tokens:
        options["gradient_tokens"] = gradient_tokens
        options["relevance_tokens"] = gradient_tokens
    options.update(extra_options or {})

    wanted: list[str] = []
    if table is None:
        wanted += list(DEFAULT_METRICS)
    for t in names:
        if t in OPTIONAL_TRUTHS and truth is None:
            continue
        if not _present(table, t):
            src = TRUTH_SOURCES[t]
            if src not in METRICS:
                raise LayerscopeError(f"ground truth '{t}' needs the metric '{src}', which is not available here")
            wanted.append(src)
    if extra_scorers:
        for m in EXTRA_SCORERS:
            if not (table is not None and any(c.metric.startswith(m) for c in table.columns.values())):
                wanted.append(m)
    wanted = list(dict.fromkeys(wanted))
    ids, source = prepare_tokens(tokenizer, data, tokens, seq_len) if tokenizer is not None or not isinstance(data, str) \
        else (None, None)
    if wanted:
        say(f"scanning {', '.join(wanted)}")
        new = scan(model, ids if ids is not None else data, resolve_metrics(wanted), tokenizer=tokenizer, tokens=tokens,
                   seq_len=seq_len, batch_size=batch_size, seed=seed, progress=progress, options=options)
        if model_id is not None:
            new.provenance.model_id, new.provenance.weights_sha256 = str(model_id), weights_sha
        if source:
            new.provenance.calibration_source = source
        if table is None:
            table = new
        else:
            for col in new.columns.values():
                table.add(col)
            table.provenance.options["metrics"] = list(dict.fromkeys(
                list(table.provenance.options.get("metrics", [])) + wanted))
            table.provenance.skipped.update(new.provenance.skipped)
    # per-window values of the cheap, data-dependent metrics
    scanned = [m for m in table.provenance.options.get("metrics", DEFAULT_METRICS)
               if m in METRICS and METRICS[m].needs_data and kind_of(m) == "cheap" and m not in TRUTH_SOURCES.values()]
    data_free = [n for n, c in table.columns.items() if kind_of(c.metric) == "cheap" and c.direction is not None
                 and any(n.startswith(x) for x in _data_free_prefixes(table, METRICS))]
    per_window, info = None, {}
    if bootstrap and ids is not None and scanned and ids.shape[0] >= 2:
        say(f"per-window scans for ranking stability ({min(groups, ids.shape[0])} groups)")
        per_window, info = window_values(model, ids, scanned, groups, tokenizer=tokenizer, batch_size=batch_size,
                                         seed=seed)
        info["data_free_columns"] = data_free
    other, corpora = None, None
    if second_corpus and tokenizer is not None and scanned:
        say(f"scanning the cheap metrics on {second_corpus}")
        ids2, src2 = prepare_tokens(tokenizer, second_corpus, tokens, seq_len)
        other = scan(model, ids2, scanned + [m for m in ("weights",) if m in METRICS], tokenizer=tokenizer,
                     tokens=tokens, seq_len=seq_len, batch_size=batch_size, seed=seed)
        corpora = (table.provenance.calibration_source or data, src2)
    result = analyse(table, truth if truth is not None else None, per_window=per_window, window_info=info,
                     second_corpus=other, corpus_names=corpora, bootstrap=bootstrap, seed=seed)
    table.extras[SECTION_KEY] = result
    if out is not None:
        write_outputs(table, out)
    del torch
    return table


def _data_free_prefixes(table, METRICS) -> list[str]:
    names = table.provenance.options.get("metrics", [])
    free = [m for m in names if m in METRICS and not METRICS[m].needs_data]
    prefixes = []
    for m in free:
        if m == "weights":
            prefixes += ["zd_outlier_share", "stable_rank", "effective_rank", "power_law_alpha"]
        else:
            prefixes.append(m)
    return prefixes


def _check_same_model(table, num_layers: int, weights_sha: str | None, where: Any) -> None:
    p = table.provenance
    label = where if isinstance(where, (str, Path)) else "the score table"
    if p.num_layers != num_layers:
        raise LayerscopeError(f"{label} was computed on a model with {p.num_layers} layers, "
                              f"but this model has {num_layers}: it comes from another model")
    for col in table.columns.values():
        if col.unit != "head" and len(col.values) != num_layers:
            raise LayerscopeError(f"column '{col.name}' of {label} has {len(col.values)} values for {num_layers} layers")
    if weights_sha and p.weights_sha256 and weights_sha != p.weights_sha256:
        raise LayerscopeError(f"{label} was computed on other weights (sha256 {p.weights_sha256[:12]}… "
                              f"vs {weights_sha[:12]}…)")


def write_outputs(table, out: str | Path) -> dict[str, Path]:
    """agreement.json, scores.json and report.html in `out` (created if needed; files atomic)."""
    from layerscope.outputs import write_json_atomic, write_text_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"agreement": write_json_atomic(out / "agreement.json", _jsonable(table.extras[SECTION_KEY])),
             "scores": table.to_json(out / "scores.json")}
    from layerscope.report import render_report

    paths["report"] = write_text_atomic(out / "report.html", render_report(table))
    return paths


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _f(obj)
    return obj


# --------------------------------------------------------------------------- report section


