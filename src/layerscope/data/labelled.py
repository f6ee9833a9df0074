"""Labelled text sets for probes and steering: user files (.csv/.jsonl) and the built-in VADER concepts."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from layerscope.errors import LayerscopeError

CONCEPTS = ("sentiment", "source")
MIN_PER_CLASS = 8


@dataclass
class LabelledTexts:
    texts: list[str]
    labels: list[str]
    name: str
    source: str
    notes: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))


def _label_str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    s = str(v).strip()
    return s or None


def load_labelled_file(path: str | Path, text_field: str = "text", label_field: str = "label") -> LabelledTexts:
    """Texts and labels from a .csv/.tsv (columns) or .jsonl/.json (objects) file."""
    from layerscope.data.sources import _read_text_file

    path = Path(path).expanduser()
    raw = _read_text_file(path)
    suffix = path.suffix.lower()
    rows: list[tuple[str, Any, str]] = []
    if suffix in (".csv", ".tsv"):
        csv.field_size_limit(1 << 30)
        reader = csv.DictReader(io.StringIO(raw, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        try:
            cols = reader.fieldnames or []
            for want, flag in ((text_field, "--text-field"), (label_field, "--label-field")):
                if want not in cols:
                    shown = ", ".join(c for c in cols[:8] if c) or "none"
                    raise LayerscopeError(f"{path} has no column '{want}' (columns: {shown}); choose one with {flag}")
            for n, row in enumerate(reader, 2):
                rows.append((row.get(text_field) or "", row.get(label_field), f"{path}:{n}"))
        except csv.Error as exc:
            raise LayerscopeError(f"{path}: malformed {suffix[1:].upper()} ({exc})") from None
    elif suffix in (".jsonl", ".json"):
        if suffix == ".jsonl":
            objs = []
            for n, line in enumerate(raw.splitlines(), 1):
                if line.strip():
                    try:
                        objs.append((json.loads(line), f"{path}:{n}"))
                    except ValueError as exc:
                        raise LayerscopeError(f"{path}:{n}: invalid JSON ({exc})") from None
        else:
            try:
                data = json.loads(raw)
            except ValueError as exc:
                raise LayerscopeError(f"{path}: invalid JSON ({exc})") from None
            if not isinstance(data, list):
                raise LayerscopeError(f"{path}: expected a JSON list of objects with '{text_field}' and '{label_field}'")
            objs = [(o, f"{path} item {i}") for i, o in enumerate(data)]
        for obj, where in objs:
            if not isinstance(obj, dict):
                raise LayerscopeError(f"{where}: expected an object, got {type(obj).__name__}")
            for want, flag in ((text_field, "--text-field"), (label_field, "--label-field")):
                if want not in obj:
                    keys = ", ".join(map(str, list(obj)[:8])) or "none"
                    raise LayerscopeError(f"{where}: no '{want}' field (fields: {keys}); choose one with {flag}")
            text = obj[text_field]
            if text is not None and not isinstance(text, str):
                raise LayerscopeError(f"{where}: field '{text_field}' is {type(text).__name__}, not text")
            rows.append((text or "", obj[label_field], where))
    else:
        raise LayerscopeError(f"{path}: labelled data must be .csv, .tsv, .jsonl or .json")
    texts, labels, dropped = [], [], 0
    for text, label, where in rows:
        lab = _label_str(label)
        if not text.strip():
            dropped += 1
            continue
        if lab is None:
            raise LayerscopeError(f"{where}: empty label in field '{label_field}'")
        texts.append(text)
        labels.append(lab)
    if not texts:
        raise LayerscopeError(f"{path} has no rows with non-empty text in '{text_field}'")
    notes = [f"{dropped} rows with empty text dropped"] if dropped else []
    return LabelledTexts(texts=texts, labels=labels, name=label_field, source=str(path), notes=notes)


def sentiment_label(score: float) -> str | None:
    """'positive' (mean rating >= 1), 'negative' (<= -1), None in between (dropped)."""
    if score >= 1:
        return "positive"
    if score <= -1:
        return "negative"
    return None


def sentiment_sample(n: int = 2000, seed: int = 0) -> list[dict]:
    """A deterministic sample of VADER sentences with |rating| >= 1, balanced over (sentiment, source) cells.

    Each of the 8 cells gets n // 8 sentences (or all it has, the shortfall spread over the rest).
    """
    from layerscope.data.corpora import sentiment_sentences

    if isinstance(n, bool) or not isinstance(n, int) or n < 16:
        raise LayerscopeError(f"sample size must be an integer >= 16, got {n!r}")
    cells: dict[tuple[str, str], list[dict]] = {}
    for s in sentiment_sentences():
        lab = sentiment_label(float(s["score"]))
        if lab is not None:
            cells.setdefault((lab, s["source"]), []).append(dict(s, sentiment=lab))
    rng = np.random.default_rng(seed)
    keys = sorted(cells)
    for k in keys:
        cells[k].sort(key=lambda s: s["id"])
        cells[k] = [cells[k][i] for i in rng.permutation(len(cells[k]))]
    quota = {k: 0 for k in keys}
    remaining = n
    open_keys = list(keys)
    while remaining > 0 and open_keys:
        share = max(1, remaining // len(open_keys))
        for k in list(open_keys):
            take = min(share, len(cells[k]) - quota[k], remaining)
            quota[k] += take
            remaining -= take
            if quota[k] >= len(cells[k]):
                open_keys.remove(k)
            if remaining <= 0:
                break
    out = [s for k in keys for s in cells[k][: quota[k]]]
    out.sort(key=lambda s: s["id"])
    return out


def concept_data(concept: str, sample: list[dict]) -> LabelledTexts:
    if concept == "sentiment":
        return LabelledTexts([s["text"] for s in sample], [s["sentiment"] for s in sample], "sentiment",
                             "VADER sentences, |rating| >= 1")
    if concept == "source":
        return LabelledTexts([s["text"] for s in sample], [s["source"] for s in sample], "source",
                             "VADER sentences, |rating| >= 1")
    raise LayerscopeError(f"unknown concept '{concept}' (built-in concepts: {', '.join(CONCEPTS)})")


def check_labels(labels: Sequence[str], name: str, min_per_class: int = MIN_PER_CLASS) -> list[str]:
    """The sorted classes; LayerscopeError if fewer than two classes or too few examples of one."""
    counts: dict[str, int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    if len(counts) < 2:
        only = next(iter(counts), "none")
        raise LayerscopeError(f"'{name}' has only one class ('{only}'); a probe needs at least two")
    small = sorted((c, k) for k, c in counts.items() if c < min_per_class)
    if small:
        c, k = small[0]
        raise LayerscopeError(f"class '{k}' of '{name}' has only {c} examples; each class needs at least {min_per_class}")
    return sorted(counts)


def balanced_subsample(labels: Sequence[str], n: int, seed: int) -> list[int]:
    """Deterministic indices: as equal per class as availability allows, at most n in total."""
    if len(labels) <= n:
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    by: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by.setdefault(lab, []).append(i)
    for k in by:
        by[k] = [by[k][j] for j in rng.permutation(len(by[k]))]
    quota = {k: 0 for k in by}
    remaining, open_keys = n, sorted(by)
    while remaining > 0 and open_keys:
        share = max(1, remaining // len(open_keys))
        for k in list(open_keys):
            take = min(share, len(by[k]) - quota[k], remaining)
            quota[k] += take
            remaining -= take
            if quota[k] >= len(by[k]):
                open_keys.remove(k)
            if remaining <= 0:
                break
    return sorted(i for k in by for i in by[k][: quota[k]])
