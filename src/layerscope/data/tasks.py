"""Offline fine-tuning tasks built from the packaged assets, and their held-out metrics.

Two built-in tasks, shared by `layerscope finetune` and the model merge helper:

* ``shakespeare`` -- language-model adaptation: token windows of the calibration-split works (train) and the
  evaluation-split works (held out; the split is by work, `data.splits`). Metric: held-out next-token loss
  (mean NLL, lower is better) measured with the project's perplexity protocol (`evaluation.perplexity`).
* ``sentiment`` -- the VADER sentences with a mean human rating of at least 1 in magnitude as an instruction task:
  ``"<sentence> Sentiment:"`` -> ``" positive"`` / ``" negative"``, loss on the answer token only. The split is by
  sentence id (hash rule), balanced over the two classes. Metric: held-out accuracy, the answer whose token has the
  higher log-probability after the prompt (higher is better).

A user's own file (``.txt`` / ``.jsonl`` / ``.json`` / ``.csv``, read by `data.sources.load_texts`) is a language-model
task: every fifth document (by position) is held out. Forgetting is measured as held-out Wikipedia perplexity
(`forgetting`), again with `evaluation.perplexity`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from layerscope.errors import LayerscopeError

TASKS = ("shakespeare", "sentiment")
SPLITS = {"train": "calibration", "eval": "evaluation"}
ANSWERS = {"positive": " positive", "negative": " negative"}
PROMPT = "{text} Sentiment:"


@dataclass
class TaskDataset(torch.utils.data.Dataset):
    """Examples as dicts of 1-D tensors (input_ids, labels, attention_mask); labels are -100 where not scored."""

    name: str
    kind: str  # "lm" | "classification"
    split: str
    examples: list[dict[str, torch.Tensor]]
    answer_ids: dict[str, int] = field(default_factory=dict)  # classification: label -> answer token id
    labels: list[str] = field(default_factory=list)  # classification: the gold label of each example
    source: str = ""

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.examples[i]

    @property
    def tokens(self) -> int:
        """Non-padding tokens over all examples."""
        return int(sum(int(e["attention_mask"].sum()) for e in self.examples))


def collate(batch: list[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples to the longest one (labels with -100, mask with 0)."""
    n = max(int(e["input_ids"].numel()) for e in batch)
    out = {"input_ids": torch.full((len(batch), n), pad_id, dtype=torch.long),
           "labels": torch.full((len(batch), n), -100, dtype=torch.long),
           "attention_mask": torch.zeros((len(batch), n), dtype=torch.long)}
    for i, e in enumerate(batch):
        k = int(e["input_ids"].numel())
        for key in out:
            out[key][i, :k] = e[key]
    return out


def _split_name(split: str) -> str:
    if split not in SPLITS:
        raise LayerscopeError(f"unknown task split '{split}' (use 'train' or 'eval')")
    return SPLITS[split]


def _lm_examples(windows: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": w.clone(), "labels": w.clone(), "attention_mask": torch.ones_like(w)} for w in windows]


def _file_texts(path: str, split: str) -> list[str]:
    from layerscope.data.sources import load_texts

    texts = load_texts(path)
    if len(texts) < 2:
        raise LayerscopeError(f"{path}: a task file needs at least two documents (every fifth is held out)")
    held = [t for i, t in enumerate(texts) if i % 5 == 4] or texts[-1:]
    train = [t for i, t in enumerate(texts) if i % 5 != 4] if len(texts) >= 5 else texts[:-1]
    return train if split == "train" else held


def lm_windows(tokenizer: Any, name: str, split: str, n: int, seq_len: int) -> torch.Tensor:
    """[n, seq_len] consecutive token windows of the task text (`name` = 'shakespeare' or a file path)."""
    from layerscope.data.windows import tokenize_windows

    if name == "shakespeare":
        from layerscope.data.corpora import shakespeare_texts

        texts = shakespeare_texts(_split_name(split))
    else:
        _split_name(split)
        texts = _file_texts(name, split)
    from layerscope.data.windows import count_tokens

    eos = 1 if getattr(tokenizer, "eos_token_id", None) is not None else 0
    total = 0
    for t in texts:  # documents are joined with EOS; stop counting once there is enough
        total += count_tokens(tokenizer, [t]) + eos
        if total >= n * seq_len:
            break
    have = total // seq_len
    if have < 1:
        raise LayerscopeError(f"task text too short: {name} ({split}) holds less than one window of {seq_len} tokens")
    return tokenize_windows(tokenizer, texts, n_tokens=min(n, have) * seq_len, seq_len=seq_len)


def answer_ids(tokenizer: Any, answers: dict[str, str] | None = None) -> dict[str, int]:
    """The single token each answer string starts with; distinct answers must give distinct tokens."""
    answers = answers or ANSWERS
    ids = {}
    for label, text in answers.items():
        toks = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not toks:
            raise LayerscopeError(f"answer {text!r} encodes to no token")
        ids[label] = int(toks[0])
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids.values():
        raise LayerscopeError(f"an answer of {list(answers.values())} is an unknown token for this tokenizer")
    if len(set(ids.values())) != len(ids):
        raise LayerscopeError(f"the answers {list(answers.values())} start with the same token in this tokenizer")
    return ids


def sentiment_rows(split: str, n: int, seed: int = 0) -> list[dict]:
    """Up to n VADER sentences of the split with |rating| >= 1, balanced positive/negative (deterministic)."""
    from layerscope.data.corpora import sentiment_sentences
    from layerscope.data.labelled import balanced_subsample, sentiment_label
    from layerscope.data.splits import _in_split

    which = _split_name(split)
    rows = []
    for s in sentiment_sentences():
        lab = sentiment_label(float(s["score"]))
        if lab is not None and _in_split("sentiment", s["id"], which):
            rows.append(dict(s, sentiment=lab))
    keep = balanced_subsample([r["sentiment"] for r in rows], n, seed)
    return [rows[i] for i in keep]


def classification_examples(tokenizer: Any, texts: list[str], labels: list[str], answers: dict[str, int],
                            max_len: int = 128) -> list[dict[str, torch.Tensor]]:
    """Prompt + answer token; the loss is on the answer token only. Over-long prompts keep their end."""
    bos = getattr(tokenizer, "bos_token_id", None)
    from layerscope.data.windows import _adds_bos

    lead = [bos] if bos is not None and _adds_bos(tokenizer) else []
    out = []
    for text, lab in zip(texts, labels):
        prompt = list(tokenizer(PROMPT.format(text=text.strip()), add_special_tokens=False)["input_ids"])
        prompt = lead + prompt[-(max_len - 1 - len(lead)):]
        ids = torch.tensor(prompt + [answers[lab]], dtype=torch.long)
        lab_t = torch.full_like(ids, -100)
        lab_t[-1] = ids[-1]
        out.append({"input_ids": ids, "labels": lab_t, "attention_mask": torch.ones_like(ids)})
    return out


def task_dataset(name: str, tokenizer: Any, split: str = "train", n: int | None = None, seq_len: int = 128,
                 seed: int = 0, answers: dict[str, str] | None = None) -> TaskDataset:
    """The examples of task `name` ('shakespeare', 'sentiment' or a .txt/.jsonl/.json/.csv path) for `split`.

    `n` examples (windows of `seq_len` tokens for LM tasks; balanced sentences for 'sentiment'); defaults
    512 for 'train' and 256 for 'eval'. Deterministic for a given (name, split, n, seq_len, seed).
    """
    if tokenizer is None:
        raise LayerscopeError("a task dataset needs the model's tokenizer")
    n = n if n is not None else (512 if split == "train" else 256)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise LayerscopeError(f"number of task examples must be a positive integer, got {n!r}")
    if name == "sentiment":
        ids = answer_ids(tokenizer, answers)
        rows = sentiment_rows(split, n, seed)
        labels = [r["sentiment"] for r in rows]
        ex = classification_examples(tokenizer, [r["text"] for r in rows], labels, ids, seq_len)
        return TaskDataset(name, "classification", split, ex, answer_ids=ids, labels=labels,
                           source="VADER sentences, |rating| >= 1")
    if name not in TASKS and not Path(name).expanduser().exists():
        raise LayerscopeError(f"unknown task '{name}' (built-in: {', '.join(TASKS)}; or a .txt/.jsonl/.csv file)")
    wins = lm_windows(tokenizer, name, split, n, seq_len)
    src = f"shakespeare:{SPLITS[split]}" if name == "shakespeare" else f"{name} ({split}: every 5th document held out)"
    return TaskDataset(name, "lm", split, _lm_examples(wins), source=src)


@dataclass
class TaskScore:
    task: str
    metric: str  # "heldout_loss" | "accuracy"
    value: float
    higher_is_better: bool
    n: int
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"task": self.task, "metric": self.metric, "value": self.value,
                "higher_is_better": self.higher_is_better, "n": self.n, "detail": self.detail}


@torch.no_grad()
def answer_accuracy(model: torch.nn.Module, data: TaskDataset, batch_size: int = 16) -> tuple[float, float]:
    """(accuracy, mean log-prob margin of the gold answer over the other) on a classification TaskDataset."""
    device = next(model.parameters()).device
    labels = sorted(data.answer_ids)
    tok = torch.tensor([data.answer_ids[k] for k in labels], device=device)
    correct, margin = 0, 0.0
    was = model.training
    model.eval()
    try:
        for s in range(0, len(data), batch_size):
            chunk = data.examples[s:s + batch_size]
            b = collate([{k: v[:-1] for k, v in e.items()} for e in chunk])  # the prompt only
            b = {k: v.to(device) for k, v in b.items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            last = b["attention_mask"].sum(1) - 1
            lp = torch.log_softmax(logits[torch.arange(len(chunk), device=device), last].float(), -1)[:, tok]
            gold = torch.tensor([labels.index(lab) for lab in data.labels[s:s + batch_size]], device=device)
            correct += int((lp.argmax(-1) == gold).sum())
            g = lp.gather(1, gold[:, None]).squeeze(1)
            other = lp.masked_fill(torch.nn.functional.one_hot(gold, len(labels)).bool(), -math.inf).max(-1).values
            margin += float((g - other).sum())
    finally:
        model.train(was)
    return correct / len(data), margin / len(data)


def task_metric(model: torch.nn.Module, name: str, tokenizer: Any, n: int | None = None, seq_len: int = 128,
                seed: int = 0, data: TaskDataset | None = None, batch_size: int = 8) -> TaskScore:
    """The held-out metric of task `name`: accuracy for 'sentiment', mean next-token loss otherwise."""
    data = data if data is not None else task_dataset(name, tokenizer, "eval", n=n, seq_len=seq_len, seed=seed)
    if data.kind == "classification":
        acc, margin = answer_accuracy(model, data, batch_size=max(batch_size, 16))
        return TaskScore(name, "accuracy", acc, True, len(data), {"mean_logprob_margin": margin,
                                                                   "source": data.source})
    from layerscope.evaluation.perplexity import PerplexityProtocol, perplexity

    ids = torch.stack([e["input_ids"] for e in data.examples])
    proto = PerplexityProtocol(dataset=str(name), split=SPLITS[data.split], context_length=ids.shape[1],
                               stride=ids.shape[1], max_tokens=int(ids.numel()), batch_size=batch_size)
    res = perplexity(model, protocol=proto, ids=ids.reshape(-1))
    return TaskScore(name, "heldout_loss", res.mean_nll, False, res.tokens_scored,
                     {"perplexity": res.perplexity, "protocol": proto.describe(), "source": data.source})


def forgetting(model: torch.nn.Module, tokenizer: Any, tokens: int = 8192, context_length: int = 256,
               ids: torch.Tensor | None = None) -> dict:
    """Held-out Wikipedia perplexity (the project's protocol), as a measure of what fine-tuning forgot."""
    from layerscope.evaluation.perplexity import PerplexityProtocol, perplexity

    proto = PerplexityProtocol(dataset="wikipedia", split="evaluation", context_length=context_length,
                               stride=context_length, max_tokens=tokens, batch_size=4)
    res = perplexity(model, tokenizer, protocol=proto, ids=ids)
    return {"perplexity": res.perplexity, "mean_nll": res.mean_nll, "tokens": res.tokens_scored,
            "protocol": proto.describe()}
