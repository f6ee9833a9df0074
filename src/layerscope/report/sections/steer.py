"""Report section: the steering effect at the chosen layer against other layers and random vectors."""
from __future__ import annotations


def render(data: dict) -> str | None:
    """HTML for `table.extras['steer']` (SteerResult.to_dict())."""
    if not data or "chosen" not in data:
        return None
    import html

    from layerscope.report.svg import svg_line_chart

    layers = sorted(int(k) for k in data["layers"])
    eff = [data["layers"][str(k)]["mean"] for k in layers]
    lo = [data["layers"][str(k)]["ci_low"] for k in layers]
    hi = [data["layers"][str(k)]["ci_high"] for k in layers]
    r = data["random"]
    n = len(layers)
    chart = svg_line_chart([
        {"name": "mean-diff vector", "values": eff, "low": lo, "high": hi},
        {"name": "random (mean)", "values": [r["mean"]] * n, "dash": True},
        {"name": "random +2 sd", "values": [r["mean"] + 2 * r["std"]] * n, "dash": True},
    ], [str(k) for k in layers], y_label="margin shift (nats)",
        markers=[(layers.index(data["layer"]), "chosen")] if data["layer"] in layers else [])
    c = data["chosen"]
    gen = ""
    if data.get("generation"):
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v['p_positive_mean']:.3f}</td>"
                       f"<td style='text-align:left'>{html.escape(v['texts'][0])}</td></tr>"
                       for k, v in data["generation"]["conditions"].items())
        gen = ("<h3>Generated continuations scored by the sentiment probe</h3><table><tr><th>condition</th>"
               f"<th>mean P(positive)</th><th>first prompt's continuation</th></tr>{rows}</table>")
    return (f"<p>Steering vector = mean(positive) - mean(negative) sentiment states; added at layer "
            f"<b>{data['layer']}</b> ({html.escape(data['layer_reason'])}) with norm {data['vector_norm']:.2f} "
            f"(alpha {data['alpha']} x residual norm {data['residual_norm']:.2f}). Effect = shift of "
            "log P(positive words) - log P(negative words) for the next token on neutral prompts.</p>"
            f"<p>Chosen layer: {c['mean']:+.3f} nats (sd {c['std']:.3f}, 95% CI [{c['ci_low']:+.3f}, "
            f"{c['ci_high']:+.3f}]); with -alpha: {data['chosen_negative']['mean']:+.3f}; random vectors of equal "
            f"norm: {r['mean']:+.3f} +- {r['std']:.3f} over {len(r['per_seed'])} seeds.</p>" + chart + gen)
