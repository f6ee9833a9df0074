"""Token windows: documents tokenized, concatenated and cut into [sequences, tokens] tensors."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import torch

from layerscope.data.splits import BUILTIN_SOURCES
from layerscope.data.wikipedia import WIKI_CLEAN_VERSION
from layerscope.errors import LayerscopeError

# =========================================================================== tokenization


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except (TypeError, ValueError, KeyError):  # a tokenizer that cannot encode a plain word adds no BOS
        return False
    return bool(ids) and ids[0] == bos


def tokenize_windows(tokenizer, texts: list[str], n_tokens: int, seq_len: int,
                     add_bos: bool | None = None):
    """Token windows ``LongTensor[n_seq, seq_len]`` with ``n_seq = max(1, n_tokens // seq_len)``.

    Documents are tokenized one by one (no special tokens) and concatenated, each followed by
    the EOS token when the tokenizer has one, until ``max(n_tokens, seq_len)`` tokens are
    collected; the stream is then cut into consecutive windows from its start (deterministic).
    With `add_bos` (default: whatever the tokenizer does by itself) every window starts with
    BOS followed by ``seq_len - 1`` text tokens.  Too little text raises
    ``LayerscopeError("calibration text too short: ...")``.
    """
    import torch

    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise LayerscopeError(f"number of tokens must be a positive integer, got {n_tokens!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise LayerscopeError(f"sequence length must be a positive integer, got {seq_len!r}")
    if add_bos is None:
        add_bos = _adds_bos(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos and bos is None:
        raise LayerscopeError("add_bos was requested but the tokenizer has no BOS token")
    if add_bos and seq_len < 2:
        raise LayerscopeError("sequence length must be at least 2 when windows start with BOS")
    eos = getattr(tokenizer, "eos_token_id", None)

    n_seq = max(1, n_tokens // seq_len)
    need = max(n_tokens, seq_len)
    stream: list[int] = []
    for text in texts:
        if not text:
            continue
        stream.extend(_encode(tokenizer, text))
        if eos is not None:
            stream.append(eos)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise LayerscopeError(f"calibration text too short: {len(stream)} tokens, need {need}")
    per = seq_len - 1 if add_bos else seq_len
    body = torch.tensor(stream[: n_seq * per], dtype=torch.long).view(n_seq, per)
    if add_bos:
        body = torch.cat([torch.full((n_seq, 1), bos, dtype=torch.long), body], dim=1)
    return body


def count_tokens(tokenizer, texts: Iterable[str]) -> int:
    """Total number of tokens (no special tokens, no separators) in `texts`."""
    return sum(len(_encode(tokenizer, t)) for t in texts if t)


def cache_key(source: str | Path, split: str, n_tokens: int, seq_len: int, tokenizer=None, **extra) -> str:
    """A short stable hash naming one tokenized calibration set (for on-disk caches).

    File sources contribute their content hash, tokenizers their name, size and a probe encoding.
    """
    parts: dict = {"source": str(source), "split": split, "n_tokens": n_tokens, "seq_len": seq_len,
                   "extra": {k: extra[k] for k in sorted(extra)}}
    if not (isinstance(source, str) and source in BUILTIN_SOURCES):
        path = Path(source)
        if path.is_file():
            parts["file_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    else:
        parts["wiki_clean_version"] = WIKI_CLEAN_VERSION
    if tokenizer is not None:
        parts["tokenizer"] = [getattr(tokenizer, "name_or_path", ""), len(tokenizer),
                              _encode(tokenizer, "Layerscope probe: 123 naïve words.")]
    blob = json.dumps(parts, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def prepare_tokens(
    tokenizer: Any, data: Any, tokens: int, seq_len: int, split: str = "calibration"
) -> tuple[torch.Tensor, str]:
    """Turn `data` (source name, path, list of texts, or a [N, T] id tensor) into [N, T] windows."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype not in (torch.int64, torch.int32):
            raise LayerscopeError("token data must be an integer tensor of shape [sequences, tokens]")
        return data.long(), f"tensor {tuple(data.shape)}"
    from layerscope.data.sources import load_texts

    if tokenizer is None:
        raise LayerscopeError("this model has no tokenizer: pass token ids or pixel values instead of text")
    if data is None:
        data = "wikipedia"
    if isinstance(data, (list, tuple)):
        texts, label = [str(t) for t in data], f"{len(data)} texts"
    else:
        texts = load_texts(data, split=split)
        label = f"{data}:{split}" if str(data) in ("wikipedia", "shakespeare") else str(data)
    ids = tokenize_windows(tokenizer, texts, n_tokens=tokens, seq_len=seq_len)
    return ids, label
