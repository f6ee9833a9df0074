"""Vocabulary-bounded next-token scoring: KL(full || changed), NLL and top-1 agreement in chunks of positions.

Every verb that compares a changed model with the full one on next-token distributions (ablation,
greedy removal, quant sensitivity, the logit lens, sweeps) scores through this module, so no
``[tokens x vocab]`` tensor of a whole batch is built, kept or re-allocated per unit: positions are
processed in chunks whose logits fit one reused buffer of about `CHUNK_BYTES`.

The reference (the full model) is kept without its vocabulary axis. For an output head that is a
plain float32 linear map z = W x + b (x = final_norm(h); no logit soft-capping), with p the
reference distribution and q the changed one at a position,

    KL(p || q) = sum_v p_v log p_v - sum_v p_v z_v + logsumexp(z)      (log q_v = z_v - logsumexp(z))
               = negent(p)        - x . (W^T p) - b . p + logsumexp(z),

so per position the reference stores negent(p), m = W^T p (hidden size), b . p and its top-1 token:
O(positions x hidden) memory, exact up to float rounding. A changed model then costs one head matmul
per chunk, a gather of the target logit and a logsumexp, all in the reused buffer.

Other heads (soft-capped logits as in Gemma 2, non-float32 heads, custom modules) use the direct
formula sum_v p_v (log p_v - log q_v) per chunk; there the reference log-probabilities are stored
per chunk in `reference_dtype` (float32 by default; bfloat16 halves the memory at a small loss of
precision), or, above `max_reference_bytes`, re-computed from the stored final hidden states.

Sums are accumulated in float64. `naive_scores` is the full-tensor formula the tests compare with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_BYTES = 128 << 20  # float32 logits of one chunk of positions
MAX_REFERENCE_BYTES = 1 << 30  # generic path: stored reference log-probs above this are re-computed instead


@dataclass
class Score:
    """Sums over the scored positions (divide by `n` for means)."""

    kl: float = 0.0
    nll: float = 0.0
    n: int = 0
    top1: int = 0  # positions whose top-1 token equals the reference's

    def __iter__(self):  # (kl, nll, n), the shape ablation code unpacks
        return iter((self.kl, self.nll, self.n))


class OutputHead:
    """Final norm + output head (+ the family's logit soft-capping), evaluated on chunks of positions."""

    def __init__(self, final_norm: nn.Module | None, head: nn.Module, softcap: float | None = None,
                 chunk_bytes: int = CHUNK_BYTES, proj: nn.Module | None = None):
        self.final_norm = final_norm
        self.proj = proj  # between the final norm and the head (OPT-350m's project_out)
        self.head = head
        self.softcap = softcap or None
        weight = getattr(head, "weight", None)
        self.vocab = int(weight.shape[0]) if weight is not None else None
        self.linear = (isinstance(head, nn.Linear) and weight.dtype == torch.float32 and self.softcap is None
                       and not head._forward_hooks and not head._forward_pre_hooks)
        self.chunk_bytes = chunk_bytes
        self._buf: torch.Tensor | None = None

    @classmethod
    def of(cls, parts, **kw) -> "OutputHead":
        cap = getattr(getattr(parts.model, "config", None), "final_logit_softcapping", None)
        return cls(parts.final_norm, parts.head, cap, proj=getattr(parts, "head_proj", None), **kw)

    def chunk_size(self, vocab: int | None = None) -> int:
        v = vocab or self.vocab or 1
        return max(8, self.chunk_bytes // (4 * v))

    def normed(self, h: torch.Tensor) -> torch.Tensor:
        x = self.final_norm(h) if self.final_norm is not None else h
        x = self.proj(x) if self.proj is not None else x
        return x.to(self.head.weight.dtype) if getattr(self.head, "weight", None) is not None else x

    def buffer(self, n: int, device) -> torch.Tensor:
        if self._buf is None or self._buf.shape[0] < n or self._buf.device != torch.device(device):
            self._buf = torch.empty(n, self.vocab, dtype=torch.float32, device=device)
        return self._buf[:n]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """float32 logits [n, V] of normed hidden states x [n, d]; in the reused buffer when linear."""
        if self.linear:
            out = self.buffer(x.shape[0], x.device)
            torch.mm(x, self.head.weight.t(), out=out)
            if self.head.bias is not None:
                out.add_(self.head.bias)
            return out
        z = self.head(x).float()
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a[i, v] * b[i, v] without an [n, V] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _log_softmax(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p, p, float64 logsumexp) of logits z [n, V]; two new [n, V] tensors (one chunk)."""
    mx = z.amax(-1, keepdim=True)
    logp = z - mx
    p = torch.exp(logp)
    s = p.sum(-1, keepdim=True)
    p.div_(s)
    logp.sub_(s.log())
    return logp, p, mx.squeeze(-1).double() + s.squeeze(-1).double().log()


def _lse_(z: torch.Tensor, mx: torch.Tensor | None = None) -> torch.Tensor:
    """float64 logsumexp over the last axis; destroys z (exp in place). mx: z's row maxima [n, 1] if known."""
    mx = z.amax(-1, keepdim=True) if mx is None else mx
    s = z.sub_(mx).exp_().sum(-1)
    return mx.squeeze(-1).double() + s.double().log()


class ReferenceScorer:
    """The full model's next-token distributions on one batch, stored without the vocabulary axis
    (see the module docstring), and the scoring of a changed model against them.

    h_final: the full model's final hidden states [B, T, d] before the final norm; targets: token ids
    [B, T] (position t is scored against ids[t+1]) or None (KL / top-1 only; then every position is
    scored). `score_hidden(h)` scores a changed model's final hidden states; `score_logits(z)` its
    logits [B, T, V] (generic path).
    """

    @torch.no_grad()
    def __init__(self, head: OutputHead | None, h_final: torch.Tensor | None = None, ids: torch.Tensor | None = None, *,
                 logits: torch.Tensor | None = None, reference_dtype: torch.dtype = torch.float32,
                 max_reference_bytes: int = MAX_REFERENCE_BYTES, top1: bool = True):
        self.head = head
        self.shift = ids is not None
        src = h_final if h_final is not None else logits
        self.targets = ids[:, 1:].reshape(-1).to(src.device) if ids is not None else None
        self.n = self._positions(src).shape[0]
        self.reference_dtype = reference_dtype
        self.top1 = top1  # also count top-1 agreement (an argmax over the vocabulary per chunk)
        self.linear = head is not None and head.linear and logits is None
        self.nll = 0.0
        self.chunks: list[dict[str, Any]] = []
        vocab = head.vocab if logits is None else logits.shape[-1]
        step = max(8, (head.chunk_bytes if head is not None else CHUNK_BYTES) // (4 * vocab))
        rows = self._positions(src)
        keep_logp = not self.linear and (logits is not None or self.n * vocab * reference_dtype.itemsize
                                         <= max_reference_bytes)
        for a in range(0, self.n, step):
            part = rows[a:a + step]
            if logits is None:
                x = head.normed(part)
                z = head.logits(x)
            else:
                x, z = None, part.float()
            c = self._stats(z, x, a, keep_logp)
            if not self.linear and not keep_logp:
                c["h"] = part  # re-compute the reference log-probs from these when scoring
            self.chunks.append(c)

    def _positions(self, t: torch.Tensor) -> torch.Tensor:
        t = t[:, :-1] if self.shift else t
        return t.reshape(-1, t.shape[-1])

    def _tgt(self, a: int, n: int) -> torch.Tensor | None:
        return None if self.targets is None else self.targets[a:a + n]

    @torch.no_grad()
    def _stats(self, z: torch.Tensor, x: torch.Tensor | None, a: int, keep_logp: bool) -> dict[str, Any]:
        n = z.shape[0]
        c: dict[str, Any] = {"a": a, "n": n, "top": z.max(-1).indices if self.top1 else None}
        tgt = self._tgt(a, n)
        zt = z.gather(-1, tgt[:, None]).squeeze(-1).double() if tgt is not None else None
        if self.linear:  # p in place of the logits buffer: no [n, V] allocation beyond it
            mx = z.amax(-1, keepdim=True)
            s = z.sub_(mx).exp_().sum(-1, keepdim=True)
            p = z.div_(s)
            lse = mx.squeeze(-1).double() + s.squeeze(-1).double().log()
            w, b = self.head.head.weight, self.head.head.bias
            c["m"] = (p @ w).double()
            c["pb"] = (p @ b).double() if b is not None else None
            # sum_v p log p = sum_v p z - lse = x . m + b . p - lse (the same identity as the scoring)
            c["negent"] = (x.double() * c["m"]).sum(-1) + (c["pb"] if c["pb"] is not None else 0.0) - lse
        else:
            logp, p, lse = _log_softmax(z)  # one chunk; the reference is built once per batch
            c["negent"] = _rowdot(p, logp).double()
            if keep_logp:
                c["logp"] = logp.to(self.reference_dtype)
        if zt is not None:
            self.nll += float((lse - zt).sum())
        return c

    # ------------------------------------------------------------------ scoring a changed model
    @torch.no_grad()
    def score_hidden(self, h: torch.Tensor) -> Score:
        rows = self._positions(h)
        out = Score(n=self.n)
        for c in self.chunks:
            x = self.head.normed(rows[c["a"]:c["a"] + c["n"]])
            self._score_chunk(out, c, self.head.logits(x), x)
        return out

    @torch.no_grad()
    def score_logits(self, logits: torch.Tensor) -> Score:
        if self.linear:
            raise ValueError("a reference built from hidden states scores hidden states (score_hidden)")
        rows = self._positions(logits)
        out = Score(n=self.n)
        for c in self.chunks:
            self._score_chunk(out, c, rows[c["a"]:c["a"] + c["n"]].float(), None)
        return out

    def _ref_logp(self, c: dict[str, Any]) -> torch.Tensor:
        if "logp" in c:
            return c["logp"].float()
        return _log_softmax(self.head.logits(self.head.normed(c["h"])))[0]

    def _score_chunk(self, out: Score, c: dict[str, Any], z: torch.Tensor, x: torch.Tensor | None) -> None:
        tgt = self._tgt(c["a"], c["n"])
        mx = None
        if self.top1:  # one pass gives the maxima and their positions (argmax alone is ~3x slower on CPU)
            mx, top = z.max(-1, keepdim=True)
            out.top1 += int((top.squeeze(-1) == c["top"]).sum())
        zt = z.gather(-1, tgt[:, None]).squeeze(-1).double() if tgt is not None else None
        if self.linear and x is not None:
            pz = (x.double() * c["m"]).sum(-1)
            if c["pb"] is not None:
                pz = pz + c["pb"]
            lse = _lse_(z, mx)  # z is the head's reused buffer
            kl = c["negent"] - pz + lse
        else:
            logp = self._ref_logp(c)
            logq, _, lse = _log_softmax(z)
            diff = logq.neg_().add_(logp)  # log p - log q, elementwise (no cancellation of two sums)
            kl = _rowdot(logp.exp(), diff).double()  # (the stored reference stays untouched)
        out.kl += float(kl.sum())
        if zt is not None:
            out.nll += float((lse - zt).sum())


def naive_scores(ref_logits: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor | None) -> Score:
    """The full-tensor formula (for tests and the naive bench reference): log_softmax over [B, T, V]."""
    if ids is not None:
        ref_logits, logits = ref_logits[:, :-1], logits[:, :-1]
    ref_logits, logits = ref_logits.reshape(-1, ref_logits.shape[-1]), logits.reshape(-1, logits.shape[-1])
    logp = F.log_softmax(ref_logits.float(), -1)
    logq = F.log_softmax(logits.float(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    nll = -logq.gather(-1, ids[:, 1:].reshape(-1, 1).to(logq.device)) if ids is not None else kl.new_zeros(1)
    top = (logq.argmax(-1) == logp.argmax(-1)).sum()
    return Score(kl=float(kl.double().sum()), nll=float(nll.double().sum()), n=int(kl.numel()), top1=int(top))


def token_nll(logits: torch.Tensor, ids: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Next-token NLL of every position [B, T-1] (float64) from logits [B, T, V], computed in chunks
    of positions (no log_softmax copy of the whole batch)."""
    B, T, V = logits.shape
    out = torch.empty(B, T - 1, dtype=torch.float64, device=logits.device)
    step = max(1, chunk_bytes // (4 * V))
    for bi in range(B):
        for a in range(0, T - 1, step):
            z = logits[bi, a:min(a + step, T - 1)].float()
            zt = z.gather(-1, ids[bi, a + 1:a + 1 + z.shape[0], None].to(z.device)).squeeze(-1).double()
            out[bi, a:a + z.shape[0]] = torch.logsumexp(z, -1).double() - zt
    return out

