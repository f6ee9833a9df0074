"""How much a steering edit moves the next-token sentiment: the logit margin and its statistics."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def word_ids(tokenizer, words: Sequence[str]) -> tuple[list[int], list[str]]:
    """Ids of the words that are single tokens; the others are reported as skipped."""
    ids, skipped = [], []
    for w in words:
        t = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(t) == 1:
            ids.append(int(t[0]))
        else:
            skipped.append(w)
    return ids, skipped


@torch.no_grad()
def sentiment_margin(subject, prompts: Sequence[str], pos_ids: Sequence[int], neg_ids: Sequence[int],
                     layer: int | None = None, vector: torch.Tensor | None = None) -> np.ndarray:
    """Per prompt: log sum P(positive words) - log sum P(negative words) for the next token."""
    from layerscope.analysis.features import pad_batch, pad_id_of
    from layerscope.engine.runner import BlockRunner

    tok = subject.tokenizer
    enc = [list(tok(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    ids, mask = pad_batch(enc, pad_id_of(tok))
    lens = mask.sum(1)
    runner = BlockRunner(subject.parts, [])
    edits = None if vector is None else {int(layer or 0): lambda h: h + vector.to(h.dtype).to(h.device)}
    final = runner.stream(edits=edits, inputs=[{"input_ids": ids, "attention_mask": mask}], keep_final=True)[0]
    logits = runner.head_logits(final[torch.arange(len(prompts)), lens - 1])
    logp = torch.log_softmax(logits, -1)
    pos = torch.logsumexp(logp[:, list(pos_ids)], -1)
    neg = torch.logsumexp(logp[:, list(neg_ids)], -1)
    return (pos - neg).cpu().numpy().astype(np.float64)


def bootstrap_ci(x: np.ndarray, seed: int = 0, n_boot: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    if len(x) < 2:
        return (float("nan"), float("nan"))
    means = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def effect_stats(delta: np.ndarray, seed: int = 0) -> dict:
    lo, hi = bootstrap_ci(delta, seed)
    sd = float(delta.std(ddof=1)) if len(delta) > 1 else float("nan")
    return {"mean": float(delta.mean()), "std": sd, "ci_low": lo, "ci_high": hi,
            "cohens_dz": float(delta.mean() / sd) if sd and sd > 0 else None,
            "per_prompt": [round(float(v), 5) for v in delta]}
