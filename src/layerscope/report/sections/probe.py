"""Report section: layer-wise probe accuracy and concept depth (layerscope probe)."""
from __future__ import annotations

import html

from layerscope.report.svg import svg_line_chart


def render(data: dict) -> str | None:
    """HTML for `table.extras['probe']` (the dict of ProbeResult.to_dict())."""
    concepts = (data or {}).get("concepts") or {}
    if not concepts:
        return None
    names = data.get("layer_names") or []
    parts = [f"<p>Linear probes (standardised logistic regression, C by {data['options'].get('cv', 3)}-fold CV) on "
             "each layer's residual stream; held-out accuracy with 95% Wilson intervals; control = probe trained "
             "on shuffled labels. Layer 0 = embeddings.</p>"]
    for cname, c in concepts.items():
        parts.append(f"<h3>{html.escape(cname)} ({len(c['classes'])} classes, n={c['n']}, test {c['n_test']}, "
                     f"majority {c['majority']:.3f})</h3>")
        series, markers = [], []
        for p, r in c["poolings"].items():
            series.append({"name": f"{p} pooling", "values": r["accuracy"], "low": r["ci_low"], "high": r["ci_high"]})
            if r.get("control"):
                series.append({"name": f"control ({p})", "values": r["control"], "dash": True})
            if r.get("depth") is not None:
                markers.append((r["depth"], f"depth ({p})"))
        parts.append(svg_line_chart(series, list(range(len(names))), y_range=(0.0, 1.0), y_label="accuracy",
                                    markers=markers))
        rows = []
        pools = list(c["poolings"])
        for layer in range(len(names)):
            cells = []
            for p in pools:
                r = c["poolings"][p]
                cells.append(f"<td>{r['accuracy'][layer]:.3f} [{r['ci_low'][layer]:.3f}, {r['ci_high'][layer]:.3f}]</td>")
                cells.append(f"<td>{r['control'][layer]:.3f}</td>" if r.get("control") else "<td>-</td>")
            rows.append(f"<tr><td>{layer}</td><td>{html.escape(names[layer])}</td>{''.join(cells)}</tr>")
        head = "".join(f"<th>{p} acc [95% CI]</th><th>control</th>" for p in pools)
        depth = "; ".join(f"{p}: depth {r['depth'] if r['depth'] is not None else 'n/a'} "
                          f"(best {r['best_accuracy']:.3f} at layer {r['best_layer']})" for p, r in c["poolings"].items())
        parts.append(f"<p><b>Concept depth</b> (first layer reaching {c['depth_fraction']:.0%} of the best accuracy "
                     f"above the baseline): {html.escape(depth)}</p>")
        parts.append(f"<details><summary>per-layer table</summary><table><tr><th>layer</th><th>name</th>{head}</tr>"
                     f"{''.join(rows)}</table></details>")
    return "\n".join(parts)
