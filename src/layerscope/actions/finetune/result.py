"""FinetuneResult: what `layerscope finetune` wrote (kind ``layerscope.finetune``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from layerscope.results import Result


def _mb(b: Any) -> str:
    return f"{b / 2**20:.1f} MiB" if isinstance(b, (int, float)) else "n/a"


@dataclass
class FinetuneResult(Result):
    kind = "layerscope.finetune"

    model_id: str
    weights_sha256: str | None
    num_layers: int
    plan: dict
    costs: dict
    baseline: dict | None = None
    task: dict | None = None
    forgetting: dict | None = None
    notes: list[str] = field(default_factory=list)
    model: Any = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "model_id": self.model_id, "weights_sha256": self.weights_sha256,
                "num_layers": self.num_layers, "plan": self.plan, "task": self.task, "baseline": self.baseline,
                "forgetting": self.forgetting, "costs": self.costs, "notes": self.notes}

    @classmethod
    def summary_of(cls, d: dict) -> str:
        p, c = d["plan"], d["costs"]
        lines = [f"{d['model_id']}: {p['method']} on {p['data']}, {p['steps']} steps, lr {p['lr']}, seed {p['seed']}"]
        if d.get("task"):
            t, b = d["task"], d.get("baseline") or {}
            before = f" (before: {b['value']:.4f})" if b.get("value") is not None else ""
            lines.append(f"  held-out {t['metric']}: {t['value']:.4f}{before}")
        if d.get("forgetting"):
            lines.append(f"  Wikipedia perplexity (forgetting): {d['forgetting']['perplexity']:.3f}")
        st = c.get("step_time_s")
        lines.append(f"  optimizer state {_mb(c.get('optimizer_state_bytes'))} (peak), peak memory "
                     f"{_mb(c.get('peak_memory_bytes'))} ({c.get('peak_memory_kind')}), "
                     f"{st:.3f} s/step" if st is not None else "  no steps timed")
        sel = c.get("selection") or {}
        if sel.get("history"):
            lines.append("  active blocks: " + "; ".join(f"{h['step']}:{h['layers']}" for h in sel["history"][:6])
                         + (" ..." if len(sel["history"]) > 6 else ""))
        elif p.get("layers"):
            lines.append(f"  trained blocks: {p['layers']}")
        return "\n".join(lines)

    @classmethod
    def table_of(cls, d: dict):
        from layerscope.report.extras import extras_table

        return extras_table({"finetune": d}, d, source=f"task {d['plan']['data']}")
