"""Report section: MLP neurons decoded through the output head."""
from __future__ import annotations

import html


def render(data: dict, show: int = 16) -> str | None:
    """HTML for `table.extras['neurons']`: the most token-specific neurons per layer, and promoter searches."""
    if not data or not (data.get("layers") or data.get("promote")):
        return None
    parts = [f"<p>{html.escape(data.get('definition', ''))}.</p>"]
    for layer, rows in (data.get("layers") or {}).items():
        ranked = sorted(rows, key=lambda r: -(r.get("top_z") or 0))[:show]
        body = "".join(
            f"<tr><td>{r['neuron']}</td><td>{r.get('top_z')}</td><td style='text-align:left'>"
            f"{html.escape(' | '.join(repr(t)[1:-1] for t in r['top_tokens']))}</td></tr>" for r in ranked)
        parts.append(f"<h3>Block {layer}: {show} most token-specific of {len(rows)} neurons</h3><table><tr>"
                     f"<th>neuron</th><th>top z</th><th>top tokens</th></tr>{body}</table>")
    for tok, found in (data.get("promote") or {}).items():
        body = "".join(f"<tr><td>{n['layer']}</td><td>{n['neuron']}</td><td>{n['score']:.3f}</td></tr>"
                       for n in found["neurons"])
        parts.append(f"<h3>Neurons promoting {html.escape(repr(found['token']))} (id {found['token_id']})</h3>"
                     f"<table><tr><th>block</th><th>neuron</th><th>centred logit / unit</th></tr>{body}</table>")
    return "\n".join(parts)
