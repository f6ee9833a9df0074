"""The report of an analysis result (probe, lens, steer): a ScoreTable built from its extras."""
from __future__ import annotations

from typing import Any


def summary_columns(extras: dict[str, Any]) -> list[dict]:
    """Descriptive per-block columns (value at each block's output) for a ScoreTable built from `extras`."""
    cols: list[dict] = []

    def add(name: str, values: list, definition: str, reference: str, **details: Any) -> None:
        cols.append({"name": name, "metric": name, "unit": "block", "direction": None, "definition": definition,
                     "reference": reference, "values": list(values), "details": details})

    pr = extras.get("probe") or {}
    for cname, c in (pr.get("concepts") or {}).items():
        pool = c.get("primary_pooling", "mean")
        r = c["poolings"].get(pool)
        if r:
            add(f"probe_{cname}", r["accuracy"][1:],
                f"held-out accuracy of a linear probe for '{cname}' on the block's output ({pool} pooling)",
                "Alain & Bengio 2016; Belinkov 2022 (probing classifiers)", embeddings=r["accuracy"][0],
                depth=r.get("depth"))
    ln = extras.get("lens") or {}
    if ln.get("logit_kl"):
        add("heldout_logit_lens_kl", ln["logit_kl"][1:], "KL(final || logit lens at the block's output), nats, "
            "held-out tokens", "nostalgebraist 2020", embeddings=ln["logit_kl"][0])
        add("tuned_lens_kl", ln["tuned_kl"][1:], "KL(final || tuned lens at the block's output), nats, held-out "
            "tokens", "Belrose et al. 2023", embeddings=ln["tuned_kl"][0])
    nr = extras.get("neurons") or {}
    L = int(extras.get("num_layers") or 0)
    for tok, found in (nr.get("promote") or {}).items():
        per = found.get("per_layer_max") or {}
        if per and L:
            add(f"promotes_{found.get('token_id')}", [per.get(str(i)) for i in range(L)],
                f"largest centred logit change per unit activation for token {tok!r} among the block's MLP neurons",
                "Geva et al. 2022")
    st = extras.get("steer") or {}
    if st.get("layers") and st.get("num_layers"):
        vals = [None] * int(st["num_layers"])
        for k, v in st["layers"].items():
            if int(k) >= 1:
                vals[int(k) - 1] = v["mean"]
        add("steer_margin_shift", vals, "shift of log P(positive words) - log P(negative words) when the sentiment "
            "direction is added at the block's output (alpha x residual norm)", "Turner et al. 2023 (activation "
            "addition)", embeddings=(st["layers"].get("0") or {}).get("mean"))
    return cols


def render_html(title: str, extras: dict[str, Any], provenance: dict[str, Any], source: str | None = None) -> str:
    """The report of an analysis result: a ScoreTable holding `extras`, with summary columns over depth."""
    from layerscope.report.render import render_report

    return render_report(extras_table(extras, provenance, source), title=title)


def extras_table(extras: dict[str, Any], provenance: dict[str, Any], source: str | None = None):
    """A ScoreTable that carries an analysis result's `extras` (for the report), with summary columns."""
    import torch

    from layerscope import __version__
    from layerscope.analysis.probes import _jsonable
    from layerscope.metrics.table import Provenance, ScoreColumn, ScoreTable
    extras = _jsonable({k: v for k, v in extras.items() if v})
    summary_extras = dict(extras, num_layers=provenance.get("num_layers", 0))
    opts = {k: v for k, v in dict(provenance.get("options") or {}).items() if not isinstance(v, (dict, list))}
    prov = Provenance(model_id=provenance.get("model_id", ""), model_family=provenance.get("model_family", ""),
                      weights_sha256=provenance.get("weights_sha256"), num_layers=provenance.get("num_layers", 0),
                      layerscope_version=__version__, seed=int(opts.get("seed", 0) or 0),
                      calibration_source=source, created=provenance.get("created", ""), options=opts,
                      torch_version=torch.__version__, notes=list(provenance.get("notes") or []))
    table = ScoreTable(provenance=prov, extras=extras)
    for c in summary_columns(summary_extras):
        table.add(ScoreColumn(**c))
    return table
