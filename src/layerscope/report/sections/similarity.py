"""Report section: linear CKA between all layer pairs."""
from __future__ import annotations

import html

from layerscope.report.svg import svg_heatmap


def render(data: dict) -> str | None:
    """HTML for `table.extras['layer_similarity']` (SimilarityResult.to_dict())."""
    if not data or not data.get("matrix"):
        return None
    labels = data.get("layer_names") or [str(i) for i in range(len(data["matrix"]))]
    adj = data.get("adjacent") or []
    most = sorted(range(len(adj)), key=lambda i: -adj[i])[:3] if adj else []
    note = ", ".join(f"{i}-{i + 1} ({adj[i]:.3f})" for i in most)
    return (f"<p>Linear CKA between every pair of layers (0 = embeddings) on {data.get('n_tokens')} tokens of "
            f"{html.escape(str(data.get('source')))}"
            f"{' (first position of each window excluded)' if data.get('first_position_excluded') else ''}. "
            f"Most similar adjacent layers: {html.escape(note)}.</p>"
            + "".join(f"<p>{html.escape(x)}.</p>" for x in data.get("notes") or [])
            + svg_heatmap(data["matrix"], labels, title="linear CKA (massive-activation tokens excluded)"
                          if data.get("outlier_tokens_excluded") else "linear CKA")
            + (svg_heatmap(data["matrix_all_tokens"], labels, title="linear CKA, all tokens")
               if data.get("outlier_tokens_excluded") and data.get("matrix_all_tokens") else ""))
