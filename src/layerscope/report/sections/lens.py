"""Report section: logit lens against the tuned lens, KL per layer."""
from __future__ import annotations


def render(data: dict) -> str | None:
    """HTML for `table.extras['lens']` (LensResult.lens_dict())."""
    if not data or not data.get("logit_kl"):
        return None
    import html

    from layerscope.report.svg import svg_line_chart

    n = len(data["logit_kl"])
    chart = svg_line_chart([{"name": "logit lens", "values": data["logit_kl"]},
                            {"name": "tuned lens", "values": data["tuned_kl"]}], list(range(n)),
                           y_label="KL(final || lens), nats")
    chart2 = svg_line_chart([{"name": "logit lens", "values": data["logit_top1"]},
                             {"name": "tuned lens", "values": data["tuned_top1"]}], list(range(n)),
                            y_range=(0.0, 1.0), y_label="top-1 agreement")
    rows = "".join(f"<tr><td>{i}</td><td>{data['logit_kl'][i]:.3f}</td><td>{data['tuned_kl'][i]:.3f}</td>"
                   f"<td>{data['logit_top1'][i]:.3f}</td><td>{data['tuned_top1'][i]:.3f}</td></tr>" for i in range(n))
    return (f"<p>Each layer decoded with the model's final norm and head (logit lens) and through a trained affine "
            f"translator (tuned lens, {data.get('steps')} steps on {data.get('train_tokens')} tokens of "
            f"{html.escape(str(data.get('train_source')))}); evaluated on {data.get('eval_tokens')} held-out tokens "
            f"of {html.escape(str(data.get('eval_source')))}. Layer 0 = embeddings.</p>{chart}{chart2}"
            "<details><summary>per-layer table</summary><table><tr><th>layer</th><th>logit KL</th><th>tuned KL</th>"
            f"<th>logit top-1</th><th>tuned top-1</th></tr>{rows}</table></details>")
