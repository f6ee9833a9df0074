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

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from layerscope.analysis.agreement_stats import (
    KS,
    OPTIONAL_TRUTHS,
    SECTION_KEY,
    TRUTH_SOURCES,
    UNITS,
    _f,
    _present,
    _truth_column,
    bootstrap_stability,
    compare,
    corpus_agreement,
    disagreements,
    kind_of,
    oriented,
    recommend,
    resolve_truths,
)
from layerscope.errors import LayerscopeError
from layerscope.results import Result

AGREEMENT_VERSION = 1
EXTRA_SCORERS = ("grad_norm", "relevance", "weight_norm")  # run by `agree` next to the truths


# --------------------------------------------------------------------------- statistics


# --------------------------------------------------------------------------- the comparison


# --------------------------------------------------------------------------- stability


# --------------------------------------------------------------------------- verdicts


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
                  batch_size: int = 4, seed: int = 0, options: dict | None = None,
                  checkpoint: Any = None) -> tuple[dict[str, np.ndarray], dict]:
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
        got = checkpoint.get(f"group{g}") if checkpoint is not None else None
        if got is None:
            t = scan(model, part, list(metrics), tokenizer=tokenizer, tokens=int(part.numel()),
                     seq_len=int(ids.shape[1]), batch_size=batch_size, attn_seqs=min(2, int(part.shape[0])), seed=seed,
                     options=options)
            got = {name: col.values for name, col in t.columns.items()
                   if col.direction is not None and col.unit in UNITS}
            if checkpoint is not None:
                checkpoint.put(f"group{g}", got)
        for name, vals in got.items():
            per.setdefault(name, []).append([np.nan if v is None else float(v) for v in vals])
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
          log=None, force: bool = False, device: str | None = None, dtype: Any = None,
          checkpoint: Any = None) -> "Any":
    """Score table with the agreement analysis in ``table.extras['agreement']``.

    model: as for `scan` (None = the embedded SmolLM2). scores: a ScoreTable or a scores.json path
    to start from (it must come from the same model); whatever the analysis needs and the table lacks
    (the default cheap metrics, the ground truths, grad_norm / relevance / weight_norm when
    `extra_scorers`) is computed. `options` are passed to the scans' metrics (e.g. ablation_greedy,
    quant_tokens). With `out`, writes agreement.json, scores.json and report.html there. With a
    `checkpoint` (layerscope.checkpoint) every finished scan (and the ablation's sums per batch) is
    saved, and a resumed run reuses them: the same numbers as an uninterrupted run.
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

    model_id, weights_sha, loaded = None, None, None
    if model is None or isinstance(model, str) or hasattr(model, "__fspath__"):
        from layerscope.model.loading import load_model

        loaded = load_model(model, trust_remote_code=trust_remote_code, device=device, dtype=dtype)
        model, model_id, weights_sha = loaded.model, loaded.model_id, loaded.weights_sha256
        tokenizer = tokenizer or loaded.tokenizer
    model.eval()
    parts = find_parts(model)
    if table is not None:
        table.check_same_model(weights_sha, parts.num_layers, where=scores)
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
    if checkpoint is not None:
        checkpoint.require_same("inputs", {"weights": weights_sha, "wanted": wanted, "tokens": tokens,
                                           "seq_len": seq_len, "ids": None if ids is None else _digest(ids)})
    if wanted and checkpoint is not None and "scan" in checkpoint:
        new = ScoreTable.model_validate(checkpoint.get("scan"))
    elif wanted:
        say(f"scanning {', '.join(wanted)}")
        if checkpoint is not None:
            options["checkpoint"] = checkpoint.scoped("main")
        new = scan(model, ids if ids is not None else data, resolve_metrics(wanted), tokenizer=tokenizer, tokens=tokens,
                   seq_len=seq_len, batch_size=batch_size, seed=seed, progress=progress, options=options)
        options.pop("checkpoint", None)
        if checkpoint is not None:
            checkpoint.put("scan", new.to_dict())
    if wanted:
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
                                         seed=seed, checkpoint=checkpoint.scoped("windows") if checkpoint else None)
        info["data_free_columns"] = data_free
    other, corpora = None, None
    if second_corpus and tokenizer is not None and scanned:
        say(f"scanning the cheap metrics on {second_corpus}")
        ids2, src2 = prepare_tokens(tokenizer, second_corpus, tokens, seq_len)
        if checkpoint is not None and "second_corpus" in checkpoint:
            other = ScoreTable.model_validate(checkpoint.get("second_corpus"))
        else:
            other = scan(model, ids2, scanned + [m for m in ("weights",) if m in METRICS], tokenizer=tokenizer,
                         tokens=tokens, seq_len=seq_len, batch_size=batch_size, seed=seed)
            if checkpoint is not None:
                checkpoint.put("second_corpus", other.to_dict())
        corpora = (table.provenance.calibration_source or data, src2)
    result = analyse(table, truth if truth is not None else None, per_window=per_window, window_info=info,
                     second_corpus=other, corpus_names=corpora, bootstrap=bootstrap, seed=seed)
    table.extras[SECTION_KEY] = result
    if out is not None:
        write_outputs(table, out, force=force, sources=(loaded.path if loaded else None,))
    del torch
    return table


def _digest(ids) -> str:
    import hashlib

    return hashlib.sha256(str(tuple(ids.shape)).encode() + ids.cpu().numpy().tobytes()).hexdigest()


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


class AgreementResult(Result):
    """The agreement analysis (agreement.json, kind layerscope.agreement); the full table is scores.json."""

    kind = "layerscope.agreement"

    def __init__(self, analysis: dict[str, Any], table):
        self.analysis, self.table = analysis, table

    def to_dict(self) -> dict[str, Any]:
        p = self.table.provenance
        return {"provenance": p.model_dump(mode="json"), **_jsonable(self.analysis)}

    @classmethod
    def summary_of(cls, d: dict[str, Any]) -> str:
        return str(d.get("answer", ""))

    @classmethod
    def table_of(cls, d: dict[str, Any]):
        from layerscope.metrics.table import Provenance, ScoreTable

        analysis = {k: v for k, v in d.items() if k not in ("provenance", "kind", "schema_version", "layerscope_version")}
        return ScoreTable(provenance=Provenance.model_validate(d["provenance"]), extras={SECTION_KEY: analysis})


def write_outputs(table, out: str | Path, force: bool = False, sources: tuple = ()) -> dict[str, Path]:
    """agreement.json, scores.json and report.html in `out` (the output policy of `outputs`)."""
    from layerscope.outputs import output_dir, write_text_atomic
    from layerscope.report import render_report

    out = Path(out)
    with output_dir(out, verb="agree", force=force, sources=sources) as tmp:
        AgreementResult(table.extras[SECTION_KEY], table).to_json(tmp / "agreement.json")
        table.to_json(tmp / "scores.json")
        write_text_atomic(tmp / "report.html", render_report(table))
    return {"agreement": out / "agreement.json", "scores": out / "scores.json", "report": out / "report.html"}


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


