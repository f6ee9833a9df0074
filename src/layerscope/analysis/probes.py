"""Layer-wise linear probes: at which depth does a model's residual stream encode a concept?

For a labelled text set, the residual stream is read at every layer ``l = 0..L`` in one forward
pass (layer 0 is the input of block 0, i.e. the embeddings; layer ``l`` is the output of block
``l - 1``), pooled per text (mean over real tokens - for decoder models without the first token,
an attention sink whose outsized activations would leak the text length into the mean - and the
last real token; texts are right-padded so real tokens keep positions 0..n-1), and a standardised
logistic-regression probe with cross-validated ``C`` is fitted per layer on a stratified training
split.  Accuracy on the held-out split is reported with a 95% Wilson interval beside a control
probe trained on shuffled labels (same features, same model selection; Hewitt & Liang 2019 call
such baselines "controls") and the majority-class rate.

Concept depth (per pooling): with ``b = max(majority rate, mean control accuracy)`` and
``best = max_l acc_l``, the depth is the first layer with ``acc_l >= b + fraction * (best - b)``
(default fraction 0.9).  It is reported as ``None`` when no layer's Wilson interval lies above
the control's (the concept is not decodable above control at any depth).

Texts longer than the context are truncated to ``max_length`` tokens with a warning (the count is
recorded in the result), or refused with ``on_long="error"``.

The built-in concepts use the VADER ground-truth sentences (``data.sentiment_sentences``):
``sentiment`` (positive: mean rating >= 1, negative: <= -1, the rest dropped) and ``source``
(movie / tweet / amazon / nyt).  Both are probed on one deterministic sample, balanced over the
eight (sentiment, source) cells, so one forward pass serves both concepts and neither label is a
proxy for the other.
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from layerscope.model.adapter import ModelParts, find_parts
from layerscope.errors import LayerscopeError

CONCEPTS = ("sentiment", "source")
POOLINGS = ("mean", "last")
DEFAULT_CS = (1e-3, 1e-2, 1e-1, 1.0)
MIN_PER_CLASS = 8


# =========================================================================== models


@dataclass
class Subject:
    """A model ready for analysis: the module, its parts, tokenizer and provenance."""

    model: nn.Module
    parts: ModelParts
    tokenizer: Any
    model_id: str
    weights_sha256: str | None
    model_dir: Path | None

    @property
    def num_layers(self) -> int:
        return self.parts.num_layers

    def check_layer(self, layer: int, what: str = "layer") -> int:
        """Validate a residual-stream layer index (0 = embeddings .. L = output of the last block)."""
        L = self.num_layers
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise LayerscopeError(f"{what} must be an integer, got {layer!r}")
        if not 0 <= int(layer) <= L:
            raise LayerscopeError(
                f"{what} {layer} is out of range: {self.model_id} has layers 0..{L} "
                f"(0 = embeddings, {L} = output of the last block)"
            )
        return int(layer)

    def require_lm_head(self, what: str) -> None:
        if not self.parts.has_lm_head:
            kind = "an encoder" if not self.parts.causal else "a model without an output head"
            raise LayerscopeError(
                f"{what} needs a causal language model with an output head; {self.model_id} is {kind} "
                f"({self.parts.family}) - probes and layer similarity work for it, {what} does not"
            )


def load_subject(model: Any = None, tokenizer: Any = None, trust_remote_code: bool = False,
                 need_tokenizer: bool = True) -> Subject:
    """Resolve a model spec (path, hub id, alias, None) or a loaded module into a Subject."""
    model_id, sha, model_dir = "in-memory", None, None
    if model is None or isinstance(model, str) or hasattr(model, "__fspath__"):
        from layerscope.model.loading import load_model

        loaded = load_model(model, trust_remote_code=trust_remote_code)
        model, model_id, sha, model_dir = loaded.model, loaded.model_id, loaded.weights_sha256, loaded.path
        tokenizer = tokenizer or loaded.tokenizer
    elif isinstance(model, nn.Module):
        model_id = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    else:
        raise LayerscopeError(f"model must be a path, hub id, alias or a torch module, got {type(model).__name__}")
    if need_tokenizer and tokenizer is None:
        raise LayerscopeError(f"{model_id} has no tokenizer: pass one (tokenizer=...) to analyse text")
    model.eval()
    return Subject(model=model, parts=find_parts(model), tokenizer=tokenizer, model_id=str(model_id),
                   weights_sha256=sha, model_dir=model_dir)


def max_context(model: nn.Module) -> int | None:
    from layerscope.metrics.scan import max_positions

    return max_positions(model)


def layer_names(num_layers: int) -> list[str]:
    return ["embeddings"] + [f"block {i}" for i in range(num_layers)]


# =========================================================================== hooks


def _block_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise LayerscopeError("could not find the hidden states among a block's inputs")


def _block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def tap_layers(parts: ModelParts, fn: Callable[[int, torch.Tensor], None],
               layers: Sequence[int] | None = None) -> Iterator[None]:
    """Call ``fn(layer, hidden)`` for each residual-stream layer during forward passes.

    Layer 0 is the input of block 0 (embeddings), layer ``l`` the output of block ``l - 1``.
    """
    L = parts.num_layers
    wanted = set(range(L + 1)) if layers is None else {int(x) for x in layers}
    handles = []
    try:
        if 0 in wanted:
            def pre(module, args, kwargs):
                fn(0, _block_hidden(args, kwargs))

            handles.append(parts.blocks[0].register_forward_pre_hook(pre, with_kwargs=True))
        for i in range(L):
            if i + 1 in wanted:
                def post(module, args, output, _l=i + 1):
                    fn(_l, _block_output(output))

                handles.append(parts.blocks[i].register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()


def run_base(parts: ModelParts, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
    """One forward pass of the body (embeddings + blocks, no output head)."""
    base = parts.base_model()
    dev = next(parts.model.parameters()).device
    kwargs: dict[str, Any] = {"input_ids": input_ids.to(dev)}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.to(dev)
    try:
        base(**kwargs, use_cache=False)
    except TypeError as exc:
        if "use_cache" not in str(exc):
            raise
        base(**kwargs)


# =========================================================================== tokenization


@dataclass
class Encoded:
    ids: list[list[int]]
    max_length: int
    n_truncated: int
    longest: int


def encode_texts(subject: Subject, texts: Sequence[str], max_length: int | None = None,
                 on_long: str = "truncate") -> Encoded:
    """Token ids per text (with the tokenizer's own special tokens), truncated or refused when too long."""
    if on_long not in ("truncate", "error"):
        raise LayerscopeError(f"on_long must be 'truncate' or 'error', got {on_long!r}")
    ctx = max_context(subject.model)
    if max_length is None:
        max_length = min(ctx or 512, 512)
    elif isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise LayerscopeError(f"max_length must be an integer >= 2, got {max_length!r}")
    elif ctx and max_length > ctx:
        raise LayerscopeError(f"max_length {max_length} exceeds the context of {subject.model_id} ({ctx} tokens)")
    tok = subject.tokenizer
    enc = tok(list(texts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    out, n_trunc, longest = [], 0, 0
    for i, ids in enumerate(enc):
        ids = list(ids)
        longest = max(longest, len(ids))
        if not ids:
            raise LayerscopeError(f"text {i} encodes to no tokens")
        if len(ids) > max_length:
            if on_long == "error":
                raise LayerscopeError(
                    f"text {i} is {len(ids)} tokens, longer than the limit of {max_length}; shorten it, "
                    "raise --max-length (up to the model's context) or use --on-long truncate"
                )
            n_trunc += 1
            ids = tok(texts[i], add_special_tokens=True, truncation=True, max_length=max_length,
                      verbose=False)["input_ids"]
            ids = list(ids)[:max_length]
        out.append(ids)
    if n_trunc:
        warnings.warn(f"{n_trunc} of {len(out)} texts were longer than {max_length} tokens and were truncated",
                      stacklevel=3)
    return Encoded(ids=out, max_length=max_length, n_truncated=n_trunc, longest=longest)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask (real tokens keep positions 0..n-1, also for causal models)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[r, : len(s)] = 1
    return ids, mask


def pad_id_of(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


def length_batches(lengths: Sequence[int], batch_size: int, token_budget: int = 8192) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding), deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) >= batch_size or (len(cur) + 1) * lengths[i] > token_budget):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


# =========================================================================== features

PRECISIONS = ("auto", "float32", "bfloat16")


def resolve_precision(precision: str, model: nn.Module) -> str:
    """'float32' or 'bfloat16' (autocast). 'auto' picks bfloat16 where the hardware computes it natively
    (CUDA, or a CPU with AVX512-BF16/AMX: about 3x faster there, features within cosine 0.9997 of fp32)."""
    if precision not in PRECISIONS:
        raise LayerscopeError(f"unknown precision '{precision}' (use {', '.join(PRECISIONS)})")
    if precision != "auto":
        return precision
    p = next(model.parameters(), None)
    if p is None or p.dtype != torch.float32:
        return "float32"
    if p.device.type == "cuda":
        return "bfloat16"
    try:
        native = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except Exception:  # noqa: BLE001 - private helpers may move
        native = False
    return "bfloat16" if native and p.device.type == "cpu" else "float32"


@contextmanager
def _autocast(precision: str, model: nn.Module) -> Iterator[None]:
    if precision == "bfloat16":
        dev = next(model.parameters()).device.type
        with torch.autocast(dev, dtype=torch.bfloat16):
            yield
    else:
        yield


@dataclass
class LayerFeatures:
    """Pooled residual-stream features: ``pooled[p]`` is float32 [L+1, N, d] for pooling p."""

    pooled: dict[str, np.ndarray]
    token_norm: np.ndarray  # [L+1] mean L2 norm of real tokens (first position excluded when possible)
    n_tokens: int
    n_truncated: int
    max_length: int
    wall_time_s: float
    precision: str = "float32"
    mean_skip_first: bool = False


@torch.no_grad()
def collect_features(subject: Subject, texts: Sequence[str], *, poolings: Sequence[str] = POOLINGS,
                     batch_size: int = 32, max_length: int | None = None, on_long: str = "truncate",
                     precision: str = "float32", mean_skip_first: bool | None = None,
                     progress: Callable[[int, int], None] | None = None) -> LayerFeatures:
    """Mean-over-real-tokens and last-real-token residual states of every layer, one forward pass per batch.

    precision: 'float32', 'bfloat16' (autocast; pooling is always done in float32) or 'auto'.
    mean_skip_first: leave the first token out of the mean (default: for causal models, whose first
    position is an attention sink; texts of one token keep it).
    """
    for p in poolings:
        if p not in POOLINGS:
            raise LayerscopeError(f"unknown pooling '{p}' (use {', '.join(POOLINGS)})")
    if not texts:
        raise LayerscopeError("no texts to encode")
    t0 = time.perf_counter()
    parts = subject.parts
    L = parts.num_layers
    precision = resolve_precision(precision, subject.model)
    enc = encode_texts(subject, texts, max_length=max_length, on_long=on_long)
    lengths = [len(s) for s in enc.ids]
    skip_first = parts.causal if mean_skip_first is None else bool(mean_skip_first)
    d = None
    pooled: dict[str, np.ndarray] = {}
    norm_sum = np.zeros(L + 1)
    norm_cnt = np.zeros(L + 1)
    pad = pad_id_of(subject.tokenizer)
    batches = length_batches(lengths, batch_size)
    for bi, idx in enumerate(batches):
        ids, mask = pad_batch([enc.ids[i] for i in idx], pad)
        m = mask.float()
        lens = mask.sum(1)
        rows = torch.tensor(idx)
        # The first position of a decoder is an attention sink with outsized activations; averaged in,
        # its weight 1/length would leak the text's length into the pooled features.
        norm_mask = m.clone()
        if ids.shape[1] > 1:
            norm_mask[:, 0] = 0
        norm_mask = torch.where(norm_mask.sum(1, keepdim=True) > 0, norm_mask, m)
        pool_mask = norm_mask if skip_first else m
        pool_den = pool_mask.sum(1)

        def grab(layer: int, h: torch.Tensor) -> None:
            nonlocal d
            h = h.detach().float().cpu()
            if d is None:
                d = h.shape[-1]
                for p in poolings:
                    pooled[p] = np.zeros((L + 1, len(texts), d), dtype=np.float32)
            if "mean" in poolings:
                pooled["mean"][layer, rows] = ((h * pool_mask[..., None]).sum(1) / pool_den[:, None]).numpy()
            if "last" in poolings:
                pooled["last"][layer, rows] = h[torch.arange(h.shape[0]), lens - 1].numpy()
            norms = h.norm(dim=-1)
            norm_sum[layer] += float((norms * norm_mask).sum())
            norm_cnt[layer] += float(norm_mask.sum())

        with tap_layers(parts, grab), _autocast(precision, subject.model):
            run_base(parts, ids, mask)
        if progress:
            progress(bi + 1, len(batches))
    for p in poolings:
        if not np.isfinite(pooled[p]).all():
            from layerscope.errors import NumericalError

            raise NumericalError("non-finite hidden states (NaN/Inf) while collecting probe features")
    return LayerFeatures(pooled=pooled, token_norm=norm_sum / np.maximum(norm_cnt, 1), n_tokens=int(sum(lengths)),
                         n_truncated=enc.n_truncated, max_length=enc.max_length,
                         wall_time_s=time.perf_counter() - t0, precision=precision, mean_skip_first=skip_first)


# =========================================================================== data


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
    from layerscope.data.corpora import _read_text_file

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


# =========================================================================== fitting


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = correct / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


class _Probe:
    """Standardise + logistic regression (the pair is what `fit_probe` returns as one object)."""

    def __init__(self, scaler, clf, C: float, cv_accuracy: list[float]):
        self.scaler, self.clf, self.C, self.cv_accuracy = scaler, clf, C, cv_accuracy

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.clf.predict(self.scaler.transform(X))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.clf.predict_proba(self.scaler.transform(X))

    @property
    def classes_(self) -> np.ndarray:
        return self.clf.classes_


def _fit_lr(X: np.ndarray, y: np.ndarray, C: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X)
    clf = LogisticRegression(C=C, max_iter=max_iter, tol=1e-3).fit(scaler.transform(X), y)
    return scaler, clf


def fit_probe(X_train: np.ndarray, y_train: np.ndarray, Cs: Sequence[float] = DEFAULT_CS, cv: int = 3,
              seed: int = 0, max_iter: int = 300) -> _Probe:
    """Logistic regression on standardised features, C chosen by stratified k-fold CV accuracy.

    The scaler is refitted inside each fold. BLAS runs single-threaded here: these problems are
    small, and a multi-threaded BLAS on a busy machine is many times slower, not faster.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    if not Cs:
        raise LayerscopeError("at least one value of C is needed")
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)
        counts = np.unique(y_train, return_counts=True)[1]
        folds = int(min(cv, counts.min()))
        cv_acc: list[float] = []
        if len(Cs) > 1 and folds >= 2:
            splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(X_train, y_train))
            for C in Cs:
                acc = 0.0
                for a, b in splits:
                    sc, clf = _fit_lr(X_train[a], y_train[a], float(C), max_iter)
                    acc += float((clf.predict(sc.transform(X_train[b])) == y_train[b]).mean())
                cv_acc.append(acc / len(splits))
            best = float(Cs[int(np.argmax(cv_acc))])
        else:
            best = float(Cs[0])
        sc, clf = _fit_lr(X_train, y_train, best, max_iter)
    return _Probe(sc, clf, best, cv_acc)


def chosen_C(probe: _Probe) -> float:
    return probe.C


@dataclass
class PoolingResult:
    accuracy: list[float]
    ci_low: list[float]
    ci_high: list[float]
    C: list[float]
    control: list[float] | None
    control_ci_low: list[float] | None
    control_ci_high: list[float] | None
    depth: int | None
    depth_reason: str
    best_layer: int
    best_accuracy: float
    baseline: float

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class ConceptResult:
    concept: str
    source: str
    classes: list[str]
    class_counts: dict[str, int]
    n: int
    n_train: int
    n_test: int
    majority: float
    depth_fraction: float
    poolings: dict[str, PoolingResult]
    primary_pooling: str = "mean"
    notes: list[str] = field(default_factory=list)

    @property
    def depth(self) -> int | None:
        return self.poolings[self.primary_pooling].depth

    @property
    def best_layer(self) -> int:
        return self.poolings[self.primary_pooling].best_layer

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "poolings"}
        d["poolings"] = {p: r.to_dict() for p, r in self.poolings.items()}
        d["depth"] = self.depth
        d["best_layer"] = self.best_layer
        return d


def concept_depth(acc: Sequence[float], baseline: float, fraction: float) -> int:
    best = max(acc)
    target = baseline + fraction * (best - baseline)
    return next(i for i, a in enumerate(acc) if a >= target - 1e-12)


def fit_layer_probes(features: np.ndarray, labels: Sequence[str], name: str, *, source: str = "",
                     test_size: float = 0.25, Cs: Sequence[float] = DEFAULT_CS, cv: int = 3,
                     control: bool = True, depth_fraction: float = 0.9, seed: int = 0,
                     pooling: str = "mean") -> PoolingResult:
    """Probe every layer of ``features`` [L+1, N, d]; see the module docstring for the depth rule."""
    res, _ = _fit_all(features, np.asarray(labels), test_size, Cs, cv, control, depth_fraction, seed)
    return res


def _split(y: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    if not 0 < test_size < 1:
        raise LayerscopeError(f"test_size must be between 0 and 1, got {test_size}")
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=test_size, stratify=y, random_state=seed)
    return np.sort(tr), np.sort(te)


def _fit_all(features: np.ndarray, y: np.ndarray, test_size: float, Cs, cv: int, control: bool,
             depth_fraction: float, seed: int, progress: Callable[[], None] | None = None):
    tr, te = _split(y, test_size, seed)
    y_ctrl = y[tr][np.random.default_rng(seed + 1).permutation(len(tr))]
    acc, lo, hi, cs, cacc, clo, chi = [], [], [], [], [], [], []
    n_test = len(te)
    for layer in range(features.shape[0]):
        X = features[layer]
        pr = fit_probe(X[tr], y[tr], Cs, cv, seed)
        correct = int((pr.predict(X[te]) == y[te]).sum())
        acc.append(correct / n_test)
        a, b = wilson_interval(correct, n_test)
        lo.append(a)
        hi.append(b)
        cs.append(pr.C)
        if control:
            cc = int((fit_probe(X[tr], y_ctrl, Cs, cv, seed).predict(X[te]) == y[te]).sum())
            cacc.append(cc / n_test)
            a, b = wilson_interval(cc, n_test)
            clo.append(a)
            chi.append(b)
        if progress:
            progress()
    _, counts = np.unique(y[te], return_counts=True)
    majority = float(counts.max() / n_test)
    baseline = max(majority, float(np.mean(cacc))) if control else majority
    best = int(np.argmax(acc))
    above = [lo[i] > (max(chi) if control else majority) for i in range(len(acc))]
    if any(above):
        depth, reason = concept_depth(acc, baseline, depth_fraction), (
            f"first layer reaching {depth_fraction:.0%} of the best accuracy above the baseline {baseline:.3f}")
    else:
        depth, reason = None, "no layer's 95% interval lies above the control: not decodable at any depth"
    res = PoolingResult(accuracy=acc, ci_low=lo, ci_high=hi, C=cs,
                        control=cacc if control else None, control_ci_low=clo if control else None,
                        control_ci_high=chi if control else None, depth=depth, depth_reason=reason,
                        best_layer=best, best_accuracy=float(acc[best]), baseline=baseline)
    return res, (tr, te, majority)


def probe_concept(feats: LayerFeatures, data: LabelledTexts, *, test_size: float = 0.25,
                  Cs: Sequence[float] = DEFAULT_CS, cv: int = 3, control: bool = True,
                  depth_fraction: float = 0.9, seed: int = 0,
                  progress: Callable[[], None] | None = None) -> ConceptResult:
    classes = check_labels(data.labels, data.name)
    if not 0 < depth_fraction <= 1:
        raise LayerscopeError(f"depth fraction must be in (0, 1], got {depth_fraction}")
    y = np.asarray(data.labels)
    pools: dict[str, PoolingResult] = {}
    n_train = n_test = 0
    majority = 0.0
    for p, X in feats.pooled.items():
        if X.shape[1] != len(y):
            raise LayerscopeError(f"{X.shape[1]} feature rows but {len(y)} labels")
        pools[p], (tr, te, majority) = _fit_all(X, y, test_size, Cs, cv, control, depth_fraction, seed, progress)
        n_train, n_test = len(tr), len(te)
    return ConceptResult(concept=data.name, source=data.source, classes=classes,
                         class_counts={c: int((y == c).sum()) for c in classes}, n=len(y), n_train=n_train,
                         n_test=n_test, majority=majority, depth_fraction=depth_fraction, poolings=pools,
                         primary_pooling="mean" if "mean" in pools else next(iter(pools)),
                         notes=list(data.notes))


# =========================================================================== result


@dataclass
class ProbeResult:
    model_id: str
    model_family: str
    weights_sha256: str | None
    num_layers: int
    layer_names: list[str]
    concepts: dict[str, ConceptResult]
    similarity: Any = None  # similarity.SimilarityResult
    options: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    created: str = ""

    def depth(self, concept: str) -> int | None:
        return self.concepts[concept].depth

    def to_dict(self) -> dict:
        from layerscope import __version__

        return {
            "kind": "layerscope.probe",
            "model_id": self.model_id,
            "model_family": self.model_family,
            "weights_sha256": self.weights_sha256,
            "num_layers": self.num_layers,
            "layer_names": self.layer_names,
            "layer_convention": "layer 0 = embeddings (input of block 0); layer l = output of block l-1",
            "concepts": {k: c.to_dict() for k, c in self.concepts.items()},
            "similarity": self.similarity.to_dict() if self.similarity is not None else None,
            "options": self.options,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "notes": self.notes,
            "created": self.created,
            "layerscope_version": __version__,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(_jsonable(self.to_dict()), indent=2, allow_nan=False)
        if path is not None:
            from layerscope.outputs import write_text_atomic

            write_text_atomic(path, text + "\n")
        return text

    def summary(self) -> str:
        lines = [f"{self.model_id} ({self.model_family}, {self.num_layers} blocks)"]
        for name, c in self.concepts.items():
            for p, r in c.poolings.items():
                ctrl = f", control mean {np.mean(r.control):.3f}" if r.control else ""
                lines.append(f"  {name} [{p}]: best {r.best_accuracy:.3f} at layer {r.best_layer}, depth "
                             f"{r.depth if r.depth is not None else 'n/a'} (majority {c.majority:.3f}{ctrl})")
        return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return None if not math.isfinite(f) else f
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


# =========================================================================== API


def _as_labelled(data: Any, text_field: str, label_field: str) -> LabelledTexts:
    if isinstance(data, LabelledTexts):
        return data
    if isinstance(data, (str, Path)) or hasattr(data, "__fspath__"):
        return load_labelled_file(data, text_field, label_field)
    if isinstance(data, dict) and "texts" in data and "labels" in data:
        texts, labels = list(data["texts"]), list(data["labels"])
    elif isinstance(data, (list, tuple)) and data and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in data):
        texts, labels = [str(r[0]) for r in data], [r[1] for r in data]
    elif isinstance(data, (list, tuple)) and data and all(isinstance(r, dict) for r in data):
        for i, r in enumerate(data):
            if label_field not in r:
                raise LayerscopeError(f"item {i}: no '{label_field}' field")
            if text_field not in r:
                raise LayerscopeError(f"item {i}: no '{text_field}' field")
        texts, labels = [str(r[text_field]) for r in data], [r[label_field] for r in data]
    else:
        raise LayerscopeError("data must be a .csv/.jsonl path, a list of (text, label) pairs or of dicts, "
                              "or {'texts': [...], 'labels': [...]}")
    if len(texts) != len(labels):
        raise LayerscopeError(f"{len(texts)} texts but {len(labels)} labels")
    labs = [_label_str(x) for x in labels]
    if any(x is None for x in labs):
        raise LayerscopeError(f"item {labs.index(None)}: empty label")
    return LabelledTexts(texts=texts, labels=labs, name=label_field, source="in-memory data")  # type: ignore[arg-type]


def _progress_printer(enabled: bool, label: str):
    if not enabled:
        return None

    def show(done: int, total: int) -> None:
        print(f"\r{label}: {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    return show


def probe(
    model: Any = None,
    data: Any = None,
    *,
    concepts: Sequence[str] | str | None = None,
    text_field: str = "text",
    label_field: str = "label",
    tokenizer: Any = None,
    n: int = 2000,
    test_size: float = 0.25,
    poolings: Sequence[str] = POOLINGS,
    depth_fraction: float = 0.9,
    Cs: Sequence[float] = DEFAULT_CS,
    cv: int = 3,
    control: bool = True,
    batch_size: int = 32,
    max_length: int | None = None,
    on_long: str = "truncate",
    precision: str = "auto",
    cka: bool = False,
    cka_data: Any = "wikipedia",
    cka_tokens: int = 2048,
    cka_outlier_ratio: float | None = 5.0,
    seed: int = 0,
    progress: bool = False,
    trust_remote_code: bool = False,
) -> ProbeResult:
    """Fit a linear probe at every layer of `model` for each concept; optionally add the layer CKA map.

    data: None (built-in concepts, see `concepts`: 'sentiment', 'source'), a .csv/.tsv/.jsonl/.json
    path with `text_field`/`label_field`, a list of (text, label) pairs, or {'texts', 'labels'}.
    At most `n` examples are used (a deterministic class-balanced subsample).
    """
    t0 = time.perf_counter()
    subject = model if isinstance(model, Subject) else load_subject(model, tokenizer, trust_remote_code)
    if isinstance(n, bool) or not isinstance(n, int) or n < 16:
        raise LayerscopeError(f"n must be an integer >= 16, got {n!r}")
    datasets: list[LabelledTexts] = []
    if data is None:
        if concepts is None:
            concepts = list(CONCEPTS)
        elif isinstance(concepts, str):
            concepts = [c.strip() for c in concepts.split(",") if c.strip()]
        for c in concepts:
            if c not in CONCEPTS:
                raise LayerscopeError(f"unknown concept '{c}' (built-in concepts: {', '.join(CONCEPTS)})")
        sample = sentiment_sample(n, seed) if concepts else []
        datasets = [concept_data(c, sample) for c in concepts]
    else:
        if concepts:
            raise LayerscopeError("give either a dataset (data=/--data) or built-in concepts, not both")
        full = _as_labelled(data, text_field, label_field)
        check_labels(full.labels, full.name)
        keep = balanced_subsample(full.labels, n, seed)
        if len(keep) < len(full.labels):
            full.notes.append(f"class-balanced subsample of {len(keep)} of {len(full.labels)} rows (seed {seed})")
        datasets = [LabelledTexts([full.texts[i] for i in keep], [full.labels[i] for i in keep], full.name,
                                  full.source, full.notes)]
    for ds in datasets:
        check_labels(ds.labels, ds.name)
    timings: dict[str, float] = {}
    notes: list[str] = []
    results: dict[str, ConceptResult] = {}
    feats = None
    if datasets:
        texts = datasets[0].texts
        feats = collect_features(subject, texts, poolings=poolings, batch_size=batch_size, max_length=max_length,
                                 on_long=on_long, precision=precision,
                                 progress=_progress_printer(progress, "features"))
        timings["features"] = feats.wall_time_s
        if feats.n_truncated:
            notes.append(f"{feats.n_truncated} texts longer than {feats.max_length} tokens were truncated")
        t1 = time.perf_counter()
        total = len(datasets) * len(feats.pooled) * (subject.num_layers + 1)
        done = [0]
        show = _progress_printer(progress, "probes")

        def tick() -> None:
            done[0] += 1
            if show:
                show(done[0], total)

        for ds in datasets:
            results[ds.name] = probe_concept(feats, ds, test_size=test_size, Cs=Cs, cv=cv, control=control,
                                             depth_fraction=depth_fraction, seed=seed, progress=tick)
        timings["probes"] = time.perf_counter() - t1
    sim = None
    if cka:
        from layerscope.analysis.similarity import layer_similarity

        t2 = time.perf_counter()
        sim = layer_similarity(subject, data=cka_data, tokens=cka_tokens, seed=seed,
                               outlier_ratio=cka_outlier_ratio or None)
        timings["cka"] = time.perf_counter() - t2
    timings["total"] = time.perf_counter() - t0
    return ProbeResult(
        model_id=subject.model_id, model_family=subject.parts.family, weights_sha256=subject.weights_sha256,
        num_layers=subject.num_layers, layer_names=layer_names(subject.num_layers), concepts=results,
        similarity=sim,
        options={"n": n, "test_size": test_size, "poolings": list(poolings), "depth_fraction": depth_fraction,
                 "Cs": list(Cs), "cv": cv, "control": "shuffled training labels" if control else None,
                 "batch_size": batch_size, "max_length": feats.max_length if feats else max_length,
                 "on_long": on_long, "seed": seed, "n_tokens": feats.n_tokens if feats else 0,
                 "precision": feats.precision if feats else None, "torch_threads": torch.get_num_threads(),
                 "mean_pooling_skips_first_token": feats.mean_skip_first if feats else None,
                 "cka_tokens": cka_tokens if cka else None},
        timings=timings, notes=notes + list(subject.parts.notes),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


# =========================================================================== HTML


