"""Report section: the model, the calibration data and the software versions."""
from __future__ import annotations

from collections import Counter

from layerscope.metrics.table import ScoreTable
from layerscope.report.figures import UNIT_LABEL, metric_group
from layerscope.report.jinja import render_template


def render(table: ScoreTable) -> str:
    p = table.provenance
    sha = p.weights_sha256
    notes: list[str] = list(p.notes)
    sample_notes: list[tuple[str, str]] = []
    seen: set[str] = set()
    for c in table.columns.values():
        note = c.details.get("note")
        if isinstance(note, str) and note not in seen:
            seen.add(note)
            sample_notes.append((metric_group(c.metric).split("_kl")[0] if c.metric.startswith("logit_lens") else c.metric, note))
        q = c.details.get("observed_queries_per_layer")
        if isinstance(q, int) and "heads" not in seen:
            seen.add("heads")
            sample_notes.append(("attention heads", f"per-head statistics from {q} query positions per layer"))
    units = Counter(c.unit for c in table.columns.values())
    metrics_run = p.options.get("metrics")
    return render_template(
        "summary.html.j2",
        p=p,
        sha_short=(sha[:12] if sha else None),
        notes=notes,
        sample_notes=sample_notes,
        skipped=sorted(p.skipped.items()),
        units=[(UNIT_LABEL[u], units[u]) for u in ("block", "attention", "mlp", "head") if units.get(u)],
        metrics_run=", ".join(metrics_run) if isinstance(metrics_run, list) else None,
        options={k: v for k, v in p.options.items() if k != "metrics"},
        n_columns=len(table.columns),
    )
