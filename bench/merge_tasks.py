"""The two tasks of bench/merge.py: data, a short full fine-tune of SmolLM2, and the held-out metrics.

* ``shakespeare`` -- language-model adaptation: next-token loss on Shakespeare's works (calibration
  split for training, evaluation split -- disjoint works -- for the held-out loss / perplexity).
* ``vader`` -- sentiment instruction: ``"<sentence> Sentiment:"`` -> ``" positive"`` / ``" negative"``
  on VADER sentences with |rating| >= 1 (split by sentence id); loss on the answer token only;
  held-out accuracy = the answer whose log-probability is larger.
* retention: perplexity on held-out Wikipedia.

Fine-tuned models are cached under --cache (default /tmp/merge-bench) so reruns are cheap:

    OMP_NUM_THREADS=1 .venv/bin/python bench/merge_tasks.py --task shakespeare   # or vader
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CACHE = Path("/tmp/merge-bench")
PROMPT = "{text} Sentiment:"
ANSWERS = (" positive", " negative")
SEQ = 128


def vader_split(split: str, n: int = 2400) -> list[dict]:
    from layerscope.data.labelled import sentiment_sample
    from layerscope.data.splits import split_of

    return [s for s in sentiment_sample(n, seed=0) if split_of("sentiment", s["id"]) == split]


def answer_ids(tok) -> list[int]:
    ids = [tok(a, add_special_tokens=False)["input_ids"] for a in ANSWERS]
    assert all(len(i) == 1 for i in ids), ids
    return [i[0] for i in ids]


def vader_prompts(split: str, n: int) -> list[str]:
    return [PROMPT.format(text=s["text"]) for s in vader_split(split)[:n]]


def _batch_prompts(tok, prompts: list[str], max_len: int = 64):
    """Right-padded ids, attention mask and the index of each prompt's last token."""
    enc = [tok(p, add_special_tokens=False)["input_ids"][-max_len:] for p in prompts]
    width = max(len(e) for e in enc)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, :len(e)] = torch.tensor(e)
        mask[i, :len(e)] = 1
    last = torch.tensor([len(e) - 1 for e in enc])
    return ids, mask, last


def last_logits(model, tok, prompts: list[str], batch: int = 16) -> torch.Tensor:
    out = []
    for s in range(0, len(prompts), batch):
        ids, mask, last = _batch_prompts(tok, prompts[s:s + batch])
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        out.append(logits[torch.arange(len(last)), last].float())
    return torch.cat(out)


@torch.no_grad()
def vader_accuracy(model, tok, n: int) -> float:
    rows = vader_split("evaluation")[:n]
    pos, neg = answer_ids(tok)
    logits = last_logits(model, tok, [PROMPT.format(text=s["text"]) for s in rows])
    pred = ["positive" if a > b else "negative" for a, b in zip(logits[:, pos], logits[:, neg])]
    return sum(p == s["sentiment"] for p, s in zip(pred, rows)) / len(rows)


def ppl(model, tok, dataset: str, tokens: int) -> float:
    from layerscope.evaluation.perplexity import PerplexityProtocol, perplexity

    proto = PerplexityProtocol(dataset=dataset, split="evaluation", context_length=SEQ, stride=SEQ,
                               max_tokens=tokens, batch_size=8)
    return perplexity(model, tok, proto).perplexity


def evaluate(model, tok, tokens: int, n_vader: int) -> dict:
    """Held-out metrics of one model: Shakespeare loss/perplexity, VADER accuracy, Wikipedia perplexity."""
    model.eval()
    sp = ppl(model, tok, "shakespeare", tokens)
    return {"shakespeare_loss": math.log(sp), "shakespeare_ppl": sp, "vader_acc": vader_accuracy(model, tok, n_vader),
            "wiki_ppl": ppl(model, tok, "wikipedia", tokens)}


def unlabelled_inputs(tok, task: str, n: int) -> list[str]:
    """Unlabelled task inputs (calibration split) for AdaMerging / importance."""
    if task == "vader":
        return vader_prompts("calibration", n)
    from layerscope.data.sources import load_texts

    return load_texts("shakespeare", split="calibration")


def _train_batches(tok, task: str, steps: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    if task == "shakespeare":
        from layerscope.data.sources import load_texts
        from layerscope.data.windows import tokenize_windows

        wins = tokenize_windows(tok, load_texts("shakespeare", split="calibration"), steps * batch * SEQ // 2, SEQ // 2)
        order = torch.randperm(len(wins), generator=g)
        for s in range(steps):
            x = wins[order[(s * batch) % len(wins):][:batch]]
            yield dict(input_ids=x, labels=x)
    else:
        rows = vader_split("calibration")
        for s in range(steps):
            idx = torch.randint(0, len(rows), (batch,), generator=g).tolist()
            ids, mask, last = _batch_prompts(tok, [PROMPT.format(text=rows[i]["text"]) for i in idx])
            ans = torch.tensor([answer_ids(tok)[0 if rows[i]["sentiment"] == "positive" else 1] for i in idx])
            yield dict(input_ids=ids, attention_mask=mask, last=last, answer=ans)


def finetune(task: str, steps: int = 40, batch: int = 8, lr: float = 1e-4, seed: int = 0,
             cache: Path = CACHE) -> Path:
    """A short full fine-tune of SmolLM2 on `task` (AdamW, linear decay, clip 1), cached in cache/ft-<task>."""
    from layerscope.model.loading import load_model

    out = cache / f"ft-{task}-s{steps}-b{batch}-lr{lr:g}-seed{seed}"
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    lm = load_model("smollm2")
    model, tok = lm.model, lm.tokenizer
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    t0 = time.time()
    for s, b in enumerate(_train_batches(tok, task, steps, batch, seed)):
        if task == "shakespeare":
            loss = model(input_ids=b["input_ids"], labels=b["labels"], use_cache=False).loss
        else:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            loss = F.cross_entropy(logits[torch.arange(len(b["last"])), b["last"]].float(), b["answer"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        print(f"[{task}] step {s + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    (tmp / "finetune.json").write_text(json.dumps(dict(task=task, steps=steps, batch=batch, lr=lr, seed=seed,
                                                       seconds=time.time() - t0)))
    tmp.rename(out)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True, choices=["shakespeare", "vader"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(finetune(args.task, args.steps, args.batch, args.lr))
