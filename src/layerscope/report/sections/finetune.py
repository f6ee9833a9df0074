"""Report section: what a fine-tuning run trained, what it cost and what it changed."""
from __future__ import annotations


def render(data: dict) -> str | None:
    """HTML for `table.extras['finetune']` (FinetuneResult.to_dict())."""
    if not data or "plan" not in data:
        return None
    import html

    from layerscope.report.svg import svg_line_chart

    p, c = data["plan"], data["costs"]
    rows = [("method", p["method"]), ("task", p["data"]), ("steps x batch", f"{p['steps']} x {p['batch_size']}"),
            ("learning rate", p["lr"]), ("seed", p["seed"])]
    if data.get("task"):
        t, b = data["task"], data.get("baseline") or {}
        rows.append((f"held-out {t['metric']}", f"{t['value']:.4f} (before {b.get('value', float('nan')):.4f})"))
    if data.get("forgetting"):
        rows.append(("Wikipedia perplexity", f"{data['forgetting']['perplexity']:.3f}"))
    for key, label in (("optimizer_state_bytes", "optimizer state (peak)"), ("peak_memory_bytes", "peak memory")):
        v = c.get(key)
        rows.append((label, f"{v / 2**20:.1f} MiB" if v is not None else "not measured"))
    if c.get("step_time_s") is not None:
        rows.append(("time per step", f"{c['step_time_s']:.3f} s"))
    sel = c.get("selection") or {}
    if p.get("layers"):
        rows.append(("trained blocks", p["layers"]))
    table = "".join(f"<tr><th style='text-align:left'>{html.escape(str(k))}</th><td style='text-align:left'>"
                    f"{html.escape(str(v))}</td></tr>" for k, v in rows)
    curve = c.get("loss_curve") or []
    chart = svg_line_chart([{"name": "training loss", "values": [x["loss"] for x in curve]}],
                           [str(x["step"]) for x in curve], y_label="loss") if len(curve) > 1 else ""
    hist = ""
    if sel.get("history"):
        hist = ("<p>Active blocks per switch (step: blocks): " + html.escape("; ".join(
            f"{h['step']}: {h['layers']}" for h in sel["history"])) + "</p>")
    return f"<table>{table}</table>{chart}{hist}"
