"""FinetunePlan: which layers train, how, on which data, for how long.

Methods: ``full``; ``lisa`` (uniform LISA, Pan et al. 2024); ``lisa-importance`` (LISA with blocks drawn by a
measured metric); ``ist`` (importance learned during training, Yao et al. 2024); ``freeze`` (static: train the
chosen blocks + embeddings + head; blocks chosen top/bottom/random-k by a metric, by Spectrum's weight SNR, or
listed); ``lora-selected`` (LoRA on the chosen blocks, ranks optionally shaped by the scores); ``lora-all``.
`plan_finetune` resolves every choice (the block list, the sampling weights) into the plan, so ``--plan FILE``
replays exactly what ``--dry-run`` printed.
"""
from __future__ import annotations

from typing import Any

from pydantic import Field

from layerscope.errors import LayerscopeError
from layerscope.plans.base import Plan

METHODS = ("full", "lisa", "lisa-importance", "ist", "freeze", "lora-selected", "lora-all")
SELECTIVE = ("freeze", "lora-selected")


class FinetunePlan(Plan):
    kind = "finetune"

    method: str = Field(description="one of " + ", ".join(METHODS))
    data: str = Field("shakespeare", description="task: shakespeare | sentiment | a .txt/.jsonl/.json/.csv file")
    steps: int = 40
    lr: float = 1e-4
    seed: int = 0
    batch_size: int = 4
    seq_len: int = 128
    train_examples: int = 512
    eval_examples: int = 256
    weight_decay: float = 0.0
    warmup_steps: int = 0
    n_layers: int = Field(4, description="active blocks (LISA/IST) or chosen blocks (freeze, lora-selected)")
    interval: int = Field(5, description="LISA/IST: steps between re-draws")
    by: str | None = Field(None, description="metric that ranks or weights the blocks, or spectrum_snr")
    select: str = Field("top", description="freeze / lora-selected: top | bottom | random | list")
    layers: list[int] | None = Field(None, description="resolved block list (freeze, lora-selected)")
    weights: list[float] | None = Field(None, description="resolved per-block importance weights (lisa-importance, ranks)")
    mix: float = Field(0.3, description="lisa-importance: share of the uniform distribution in the draw")
    lora_rank: int = 8
    lora_alpha: float = 16.0
    rank_by_score: bool = Field(False, description="lora-selected: ranks proportional to the weights")
    trim_state: bool = Field(True, description="drop the optimizer state of inactive blocks (False: LMFlow-style)")
    save_every: int = Field(10, description="checkpoint every N steps (resume after Ctrl-C)")
    forgetting_tokens: int = Field(8192, description="held-out Wikipedia tokens for the forgetting perplexity (0: skip)")
    notes: list[str] = Field(default_factory=list)

    def check(self) -> "FinetunePlan":
        if self.method not in METHODS:
            raise LayerscopeError(f"unknown fine-tuning method '{self.method}' (use one of: {', '.join(METHODS)})")
        for name in ("steps", "batch_size", "seq_len", "train_examples", "eval_examples", "n_layers", "interval",
                     "lora_rank", "save_every"):
            if getattr(self, name) < 1:
                raise LayerscopeError(f"{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0:
            raise LayerscopeError("the learning rate must be positive")
        if self.method in SELECTIVE and not self.layers:
            raise LayerscopeError(f"a {self.method} plan needs its block list (use plan_finetune or give --layers)")
        if self.method == "lisa-importance" and not self.weights:
            raise LayerscopeError("a lisa-importance plan needs per-block weights (use plan_finetune or --by METRIC)")
        return self


def spectrum_snr(model) -> list[float]:
    """Spectrum's signal-to-noise ratio per block (mean over its linear layers): singular values above the
    Marchenko-Pastur edge sigma*(1+sqrt(beta)) (sigma from the IQR of the singular values / 1.349) over those below,
    divided by the largest singular value (Hartford et al. 2024, Spectrum). Computed from the weights; a layer
    with no singular value below the edge has no SNR (left out, loudly: ValueError would hide a bug)."""
    import numpy as np
    import torch

    from layerscope.model.adapter import find_parts, linear_weight

    parts = find_parts(model)
    out = []
    for i in range(parts.num_layers):
        vals = []
        for lin in parts.block_linears(i).values():
            w = linear_weight(lin).detach().float()
            s = torch.linalg.svdvals(w).numpy()
            q75, q25 = np.percentile(s, [75, 25])
            sigma = (q75 - q25) / 1.349
            beta = min(w.shape) / max(w.shape)
            edge = sigma * (1 + np.sqrt(beta))
            signal, noise = s[s > edge].sum(), s[s <= edge].sum()
            if noise > 0 and s.max() > 0:
                vals.append(float(signal / noise / s.max()))
        out.append(float(np.mean(vals)) if vals else float("nan"))
    return out


def block_scores(model, tokenizer, by: str, data: str, scores: Any = None, tokens: int = 4096,
                 seq_len: int = 128) -> tuple[list[float], str, str]:
    """(per-block values, direction, where they came from) for metric `by`."""
    if by == "spectrum_snr":
        return spectrum_snr(model), "higher", "Spectrum SNR from the weight spectra"
    table = scores
    if table is None:
        from layerscope.data.tasks import TASKS, SPLITS
        from layerscope.data.tasks import _file_texts
        from layerscope.metrics.scan import scan

        if data == "sentiment":
            from layerscope.data.tasks import sentiment_rows

            texts = [r["text"] for r in sentiment_rows("train", 2000)]
        elif data in TASKS:
            from layerscope.data.sources import load_texts

            texts = load_texts(data, split=SPLITS["train"])
        else:
            texts = _file_texts(data, "train")
        table = scan(model, texts, tokenizer=tokenizer, metrics=[by], tokens=tokens, seq_len=seq_len, progress=False)
        where = f"scan of {by} on {tokens} tokens of the task's training text"
    else:
        if isinstance(table, str) or hasattr(table, "__fspath__"):
            from layerscope.metrics.table import ScoreTable

            table = ScoreTable.from_json(table)
        where = f"{by} from the given score table"
    col = table.column(by, unit="block")
    if col.direction not in ("higher", "lower"):
        raise LayerscopeError(f"metric {by} is descriptive (no direction) and ranks no blocks")
    return [float(v) for v in table.values(by, unit="block")], col.direction, where


def plan_finetune(model, tokenizer=None, *, method: str, by: str | None = None, scores: Any = None,
                  layers: list[int] | None = None, select: str = "top", scan_tokens: int = 4096,
                  **fields) -> FinetunePlan:
    """Resolve a fine-tuning request into a plan: block lists and sampling weights are computed here."""
    import numpy as np

    from layerscope.actions.finetune.lisa import importance_weights
    from layerscope.actions.finetune.layers import block_list

    plan = FinetunePlan(method=method, by=by, select="list" if layers else select, layers=layers, **fields)
    if plan.method not in METHODS:
        plan.check()
    L = len(block_list(model))
    if plan.method in ("lisa", "lisa-importance", "ist") + SELECTIVE and not layers and plan.n_layers > L:
        raise LayerscopeError(f"{plan.method} asks for {plan.n_layers} active blocks but the model has {L}")
    needs = plan.method == "lisa-importance" or (plan.method in SELECTIVE and not layers and select != "random") \
        or (plan.rank_by_score and plan.method == "lora-selected")
    if needs and not by:
        raise LayerscopeError(f"{plan.method} with select={select} needs --by METRIC (or spectrum_snr)")
    values = direction = None
    if needs:
        values, direction, where = block_scores(model, tokenizer, by, plan.data, scores, tokens=scan_tokens,
                                                 seq_len=plan.seq_len)
        plan.notes.append(f"block scores: {where}")
        plan.weights = [round(float(w), 6) for w in importance_weights(values=values, direction=direction,
                                                                       num_layers=L)]
    if plan.method in SELECTIVE and not layers:
        k = min(plan.n_layers, L)
        if select == "random":
            rng = np.random.default_rng(plan.seed)
            plan.layers = sorted(int(i) for i in rng.choice(L, k, replace=False))
        elif select in ("top", "bottom"):
            order = np.argsort(-np.asarray(plan.weights), kind="stable")  # most important first
            chosen = order[:k] if select == "top" else order[::-1][:k]
            plan.layers = sorted(int(i) for i in chosen)
        else:
            raise LayerscopeError(f"unknown selection '{select}' (top, bottom, random, or give the layers)")
    if layers:
        bad = [i for i in layers if not 0 <= i < L]
        if bad:
            raise LayerscopeError(f"layer {bad[0]} is out of range (the model has blocks 0..{L - 1})")
    return plan.check()
