"""Token-level perplexity with an explicit, recorded protocol."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel

from layerscope.evaluation.scoring import token_nll
from layerscope.errors import LayerscopeError


class PerplexityProtocol(BaseModel):
    """Everything that determines a perplexity number; stored beside every result.

    One protocol for every verb (eval, sweep, prune, quantize, and the ablation ground truth's
    windows): when the tokenizer adds a BOS token by itself (Gemma, Llama-3), *every* window starts
    with BOS followed by `context_length - 1` text tokens, exactly like the windows of
    `data.windows.tokenize_windows` that ablation and the scans use; each text token in a window
    is then scored (BOS is its context). Without BOS every window holds `context_length` text
    tokens and its first token is not scored. `bos_each_window` records which one was used
    (None before it is resolved from the tokenizer).
    """

    dataset: str = "wikipedia"
    split: str = "evaluation"
    context_length: int = 512
    stride: int = 512  # = context_length: disjoint windows; smaller: sliding windows with overlap
    max_tokens: int = 16384  # length of the evaluated token stream
    batch_size: int = 4
    bos_each_window: bool | None = None  # None: as the tokenizer does by itself (resolved and recorded)

    def describe(self) -> str:
        bos = {True: ", BOS + text in every window", False: ", no BOS", None: ""}[self.bos_each_window]
        return (f"{self.dataset}:{self.split}, {self.max_tokens} tokens, context {self.context_length}, "
                f"stride {self.stride}{bos}")


class PerplexityResult(BaseModel):
    protocol: PerplexityProtocol
    perplexity: float
    mean_nll: float
    tokens_scored: int
    model_id: str = ""


def adds_bos(tokenizer: Any) -> bool:
    from layerscope.data.windows import _adds_bos

    return _adds_bos(tokenizer)


def token_stream(tokenizer: Any, protocol: PerplexityProtocol) -> torch.Tensor:
    """The evaluated token stream: documents joined in order, cut to protocol.max_tokens text tokens,
    preceded by the BOS token when windows start with BOS (see `PerplexityProtocol`)."""
    from layerscope.data.sources import load_texts
    from layerscope.data.windows import tokenize_windows

    bos = adds_bos(tokenizer) if protocol.bos_each_window is None else protocol.bos_each_window
    texts = load_texts(protocol.dataset, split=protocol.split)
    ids = tokenize_windows(tokenizer, texts, n_tokens=protocol.max_tokens, seq_len=protocol.max_tokens,
                           add_bos=False).reshape(-1)
    if bos:
        ids = torch.cat([torch.tensor([tokenizer.bos_token_id], dtype=torch.long), ids])
    return ids


def _resolve_bos(protocol: PerplexityProtocol, tokenizer: Any, model: torch.nn.Module,
                 ids: torch.Tensor) -> PerplexityProtocol:
    if protocol.bos_each_window is not None:
        return protocol
    if tokenizer is not None:
        bos = adds_bos(tokenizer)
    else:  # a stream from token_stream starts with BOS exactly when windows do
        bos_id = getattr(getattr(model, "config", None), "bos_token_id", None)
        bos = bos_id is not None and int(ids.reshape(-1)[0]) == int(bos_id)
    return protocol.model_copy(update={"bos_each_window": bool(bos)})


def windows(n: int, context_length: int, stride: int, bos: bool = False) -> list[tuple[int, int, int]]:
    """(begin, end, scored) windows over a stream of n text tokens; the last `scored` text tokens
    of each window are counted once.

    Without BOS, a window holds context_length text tokens and its first one has no context; with
    stride == context_length the windows are disjoint and every token but the first of each window
    is scored. With `bos`, a window holds BOS + context_length - 1 text tokens, all scorable.
    A smaller stride re-reads the overlap as context.
    """
    if context_length < 2:
        raise LayerscopeError("context length must be at least 2 tokens")
    if not 1 <= stride <= context_length:
        raise LayerscopeError("stride must be between 1 and the context length")
    span = context_length - 1 if bos else context_length
    stride = min(stride, span)
    out, prev_end = [], 0
    for begin in range(0, n - (0 if bos else 1), stride):
        end = min(begin + span, n)
        first = begin if bos else begin + 1  # with BOS even the window's first text token has context
        scored = end - max(prev_end, first)  # targets not scored before
        if scored > 0:
            out.append((begin, end, scored))
        prev_end = end
        if end == n:
            break
    return out


@torch.no_grad()
def stream_nll(model: torch.nn.Module, ids: torch.Tensor, context_length: int, stride: int,
               batch_size: int = 4, bos: bool = False) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods and the number of scored tokens. With `bos`,
    ids[0] is the BOS token and every window is BOS + text (see `PerplexityProtocol`)."""
    device = next(model.parameters()).device
    head = ids[:1] if bos else ids[:0]
    ids = ids[1:] if bos else ids
    wins = windows(int(ids.numel()), context_length, stride, bos=bos)
    total, count = 0.0, 0
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for w in wins:
        groups.setdefault(w[1] - w[0], []).append(w)
    for length, ws in groups.items():
        for s in range(0, len(ws), batch_size):
            chunk = ws[s:s + batch_size]
            x = torch.stack([torch.cat([head, ids[b:e]]) for b, e, _ in chunk]).to(device)
            logits = model(input_ids=x, use_cache=False).logits
            nll = token_nll(logits, x)  # [B, length-1], in chunks of positions (evaluation/scoring.py)
            for row, (_, _, scored) in zip(nll, chunk):
                total += float(row[-scored:].double().sum())
                count += scored
    return total, count


def perplexity(model: torch.nn.Module, tokenizer: Any = None, protocol: PerplexityProtocol | None = None,
               ids: torch.Tensor | None = None, model_id: str = "") -> PerplexityResult:
    """Perplexity of a causal LM under `protocol` (pass `ids` to reuse an already tokenized stream)."""
    protocol = protocol or PerplexityProtocol()
    if ids is None:
        if tokenizer is None:
            raise LayerscopeError("perplexity needs a tokenizer or a token stream")
        ids = token_stream(tokenizer, protocol)
    protocol = _resolve_bos(protocol, tokenizer, model, ids)
    was_training = model.training
    model.eval()
    try:
        total, count = stream_nll(model, ids.reshape(-1), protocol.context_length, protocol.stride, protocol.batch_size,
                                  bos=bool(protocol.bos_each_window))
    finally:
        model.train(was_training)
    if count == 0:
        raise LayerscopeError("no tokens were scored: the evaluation text is shorter than two tokens")
    mean = total / count
    if not math.isfinite(mean):
        raise LayerscopeError("the model produced non-finite log-likelihoods (NaN/Inf)")
    return PerplexityResult(protocol=protocol, perplexity=math.exp(mean), mean_nll=mean, tokens_scored=count,
                            model_id=model_id)


# ----------------------------------------------------------------------------- encoders

class EmbeddingProtocol(BaseModel):
    """How the sentence embeddings of an encoder are compared; stored beside every result."""

    dataset: str = "sentiment"
    split: str = "evaluation"
    sentences: int = 512
    max_length: int = 128
    batch_size: int = 32
    pooling: str = "mean over non-padding tokens, L2-normalised (sentence-transformers' all-MiniLM-L6-v2 pipeline)"


class FidelityResult(BaseModel):
    protocol: EmbeddingProtocol
    mean_cosine: float  # mean over sentences of cos(pruned embedding, original embedding)
    min_cosine: float
    recall_at_1: float  # share of sentences whose pruned embedding is closest to their own original
    similarity_spearman: float  # Spearman rank correlation of all pairwise cosine similarities
    sentences: int
    model_id: str = ""
    reference_id: str = ""


def sentence_texts(protocol: EmbeddingProtocol) -> list[str]:
    """The evaluated sentences: the first `protocol.sentences` of the chosen split (deterministic)."""
    from layerscope.data.sources import load_texts

    texts = [t.strip() for t in load_texts(protocol.dataset, split=protocol.split) if t.strip()]
    if protocol.dataset not in ("sentiment",):  # documents: one sentence-sized piece per line
        texts = [line.strip() for t in texts for line in t.splitlines() if len(line.split()) >= 4]
    if len(texts) < 2:
        raise LayerscopeError("embedding fidelity needs at least two sentences")
    return texts[: protocol.sentences]


@torch.no_grad()
def sentence_embeddings(model: torch.nn.Module, tokenizer: Any, texts: list[str], max_length: int = 128,
                        batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled (attention-mask weighted), L2-normalised last hidden states, as sentence-transformers."""
    device = next(model.parameters()).device
    out = []
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(texts), batch_size):
            enc = tokenizer(texts[s:s + batch_size], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            h = model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            emb = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(F.normalize(emb, p=2, dim=1))
    finally:
        model.train(was_training)
    return torch.cat(out)


def embedding_fidelity(model: torch.nn.Module, reference: torch.nn.Module, tokenizer: Any,
                       protocol: EmbeddingProtocol | None = None, texts: list[str] | None = None,
                       model_id: str = "", reference_id: str = "") -> FidelityResult:
    """How well a (pruned) encoder's sentence embeddings reproduce the reference model's."""
    from scipy.stats import spearmanr

    protocol = protocol or EmbeddingProtocol()
    texts = texts if texts is not None else sentence_texts(protocol)
    a = sentence_embeddings(model, tokenizer, texts, protocol.max_length, protocol.batch_size)
    b = sentence_embeddings(reference, tokenizer, texts, protocol.max_length, protocol.batch_size)
    cos = (a * b).sum(-1)
    sim = a @ b.T  # [pruned i, original j]
    recall = float((sim.argmax(dim=1) == torch.arange(len(texts))).float().mean())
    iu = torch.triu_indices(len(texts), len(texts), offset=1)
    rho = spearmanr((a @ a.T)[iu[0], iu[1]].numpy(), (b @ b.T)[iu[0], iu[1]].numpy()).statistic
    return FidelityResult(protocol=protocol, mean_cosine=float(cos.mean()), min_cosine=float(cos.min()),
                          recall_at_1=recall, similarity_spearman=float(rho), sentences=len(texts),
                          model_id=model_id, reference_id=reference_id)
