"""Pooled residual-stream features of texts at every layer (mean over real tokens, last real token)."""
from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from layerscope.engine.runner import BlockRunner
from layerscope.errors import LayerscopeError
from layerscope.model.subject import Subject, max_context

POOLINGS = ("mean", "last")


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
    except AttributeError:  # private torch helpers: absent in some builds
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
    padded = [pad_batch([enc.ids[i] for i in idx], pad) for idx in batches]
    runner = BlockRunner(parts, [])
    with _autocast(precision, subject.model):
        for bi, (idx, (ids, mask)) in enumerate(zip(batches, padded)):
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

            def grab(layer: int, b: int, h: torch.Tensor) -> None:
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

            runner.stream(grab, inputs=[{"input_ids": ids, "attention_mask": mask}])
            if progress:
                progress(bi + 1, len(batches))
    for p in poolings:
        if not np.isfinite(pooled[p]).all():
            from layerscope.errors import NumericalError

            raise NumericalError("non-finite hidden states (NaN/Inf) while collecting probe features")
    return LayerFeatures(pooled=pooled, token_norm=norm_sum / np.maximum(norm_cnt, 1), n_tokens=int(sum(lengths)),
                         n_truncated=enc.n_truncated, max_length=enc.max_length,
                         wall_time_s=time.perf_counter() - t0, precision=precision, mean_skip_first=skip_first)
