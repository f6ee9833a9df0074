"""Gradient scorers: one forward + backward over calibration data, through the block-sequential engine.

Loss: L = mean next-token NLL over every position with a next token in the calibration windows
(the scan's windows; option ``gradient_tokens`` keeps only the first windows up to that many
tokens). The windows are processed in micro-batches of ``gradient_batch_size`` sequences (default
1); each micro-batch b contributes (n_b / N) * L_b to one backward whose gradients accumulate in
``.grad``, so ``.grad`` ends as exactly dL/dw of the whole calibration set (torch autograd, all
parameters with requires_grad on for the duration, restored afterwards).

Per unit U (a block: all its parameters, norms included; a sublayer: the parameters of the
attention module / of the MLP module -- for OPT-like blocks whose MLP is two loose linears, the
block's linears that `sublayer_of` assigns to the MLP):

* ``taylor``      -- |sum_{w in U} w * dL/dw|: first-order Taylor estimate of the loss change when the
  whole group is removed (LLM-Pruner, Ma et al. 2023, "vector-wise" group importance);
  ``taylor_abs``  -- sum_{w in U} |w * dL/dw| (LLM-Pruner's element-wise first order, summed).
* ``fisher``      -- sum_{w in U} mean_b (dL_b/dw)^2: empirical Fisher information at the granularity of
  the micro-batches (per sequence with the default micro-batch of 1), L_b the mean NLL of
  micro-batch b. Squared micro-batch gradients are read by tensor hooks during the same backward.
* ``grad_norm``   -- ||dL/dW_U||_2: gradient norm per layer, as used by IST (Yao et al. 2024) and LISA
  (Pan et al. 2024) to decide which layers to train. Its details carry the skew across layers and
  the embedding / output-head gradient norms relative to the block mean.
* ``weight_norm`` -- ||W_U||_F / mean over blocks (data-free, descriptive): the layer-wise norm skew
  LISA reports. Details: raw norms, skewness (scipy.stats.skew), max/mean, min/mean, coefficient
  of variation, embedding and head norms relative to the block mean.

Peak memory (RSS sampled every 2 ms by a thread, psutil; else the process's ru_maxrss) and wall
time of the forward + backward are stored in the details of every gradient column.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from layerscope.engine.runner import Batch, BlockRunner
from layerscope.errors import LayerscopeError
from layerscope.metrics.base import Column, Metric

UNITS = ("block", "attention", "mlp")


# --------------------------------------------------------------------------- parameters per unit
def unit_parameters(parts, i: int) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Named parameters of block i, of its attention sublayer and of its MLP sublayer."""
    block = parts.blocks[i]
    named = list(block.named_parameters())
    attn_ids = {id(p) for p in parts.attention[i].parameters()}
    mlp = parts.mlp[i]
    if mlp is not None and any(True for _ in mlp.children()):
        mlp_ids = {id(p) for p in mlp.parameters()}
    else:  # MLP as loose linears in the block (OPT: fc1, fc2)
        mlp_ids = {id(p) for n, m in parts.block_linears(i).items() if parts.sublayer_of(n) == "mlp"
                   for p in m.parameters()}
        mlp_ids -= attn_ids
    return {
        "block": named,
        "attention": [(n, p) for n, p in named if id(p) in attn_ids],
        "mlp": [(n, p) for n, p in named if id(p) in mlp_ids],
    }


# --------------------------------------------------------------------------- memory
class PeakRSS:
    """Peak resident set size while the block runs (a sampling thread; psutil if installed)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.baseline = self.peak = 0
        self.method = "psutil RSS sampled every 2 ms"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:
            self._proc = None
            self.method = "resource.getrusage ru_maxrss (process lifetime peak)"

    def _rss(self) -> int:
        if self._proc is not None:
            return int(self._proc.memory_info().rss)
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> "PeakRSS":
        self.baseline = self.peak = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self._rss())

    def summary(self) -> dict[str, Any]:
        mb = 1024 * 1024
        return {"rss_before_mb": round(self.baseline / mb, 1), "peak_rss_mb": round(self.peak / mb, 1),
                "peak_rss_increase_mb": round((self.peak - self.baseline) / mb, 1), "method": self.method}


# --------------------------------------------------------------------------- the computation
@dataclass
class GradientStats:
    num_layers: int
    taylor: dict[str, list[float]] = field(default_factory=dict)
    taylor_abs: dict[str, list[float]] = field(default_factory=dict)
    fisher: dict[str, list[float]] = field(default_factory=dict)
    grad_norm: dict[str, list[float]] = field(default_factory=dict)
    loss: float = float("nan")
    tokens: int = 0
    positions: int = 0
    micro_batches: int = 0
    embedding_grad_norm: float | None = None
    head_grad_norm: float | None = None
    head_tied: bool = False
    memory: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0

    def info(self) -> dict[str, Any]:
        return {"loss": self.loss, "tokens": self.tokens, "positions_scored": self.positions,
                "micro_batches": self.micro_batches, "memory": self.memory,
                "wall_time_s": round(self.wall_time_s, 3)}


def _next_token_nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten().to(logits.device),
                           reduction="sum")


def _engine_logits(runner: BlockRunner, x: torch.Tensor) -> torch.Tensor:
    """The model's logits for windows `x`, with autograd, through the block-sequential engine."""
    batch = runner.capture_batch(Batch(inputs={"input_ids": x, "attention_mask": torch.ones_like(x)}), grad=True)
    h = batch.first_hidden
    for i in range(runner.parts.num_layers):
        h = runner.forward_block(i, h, batch)
    return runner.head_logits(h)


def gradient_statistics(parts, ids: torch.Tensor, micro_batch: int = 1) -> GradientStats:
    """Taylor, Fisher and gradient norms of every block / sublayer on token windows `ids` [N, T]."""
    if not parts.has_lm_head:
        raise LayerscopeError("gradient scorers need a causal LM head (the loss is the next-token NLL)")
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise LayerscopeError("gradient scorers need token windows [sequences, tokens >= 2]")
    model = parts.model
    L = parts.num_layers
    device = next(model.parameters()).device
    stats = GradientStats(num_layers=L)
    for d in (stats.taylor, stats.taylor_abs, stats.fisher, stats.grad_norm):
        d.update({u: [0.0] * L for u in UNITS})
    units = [unit_parameters(parts, i) for i in range(L)]
    owners: dict[int, list[tuple[str, int]]] = {}
    for i, groups in enumerate(units):
        for u, named in groups.items():
            for _, p in named:
                owners.setdefault(id(p), []).append((u, i))

    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    old_grads = [p.grad for p in params]
    fisher_sq = {u: np.zeros(L) for u in UNITS}
    scale = {"inv_w": 1.0}
    handles = []

    def make_hook(entries: list[tuple[str, int]]):
        def hook(g: torch.Tensor) -> None:
            sq = float(g.detach().double().pow(2).sum()) * scale["inv_w"] ** 2
            for u, i in entries:
                fisher_sq[u][i] += sq

        return hook

    ids = ids.long()
    n_seq, T = ids.shape
    N = n_seq * (T - 1)
    micro_batch = max(1, int(micro_batch))
    runner = BlockRunner(parts, [])
    t0 = time.perf_counter()
    try:
        with PeakRSS() as mem, torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
                p.grad = None
            seen: set[int] = set()
            for p in params:
                if id(p) in owners and id(p) not in seen:
                    seen.add(id(p))
                    handles.append(p.register_hook(make_hook(owners[id(p)])))
            total_nll = 0.0
            for s in range(0, n_seq, micro_batch):
                x = ids[s:s + micro_batch].to(device)
                n_b = x.shape[0] * (T - 1)
                w = n_b / N
                scale["inv_w"] = 1.0 / w  # the hooks see w * dL_b/dw
                logits = _engine_logits(runner, x)
                nll = _next_token_nll_sum(logits, x)
                total_nll += float(nll.detach())
                (nll / n_b * w).backward()
                stats.micro_batches += 1
                del logits, nll
            for h in handles:
                h.remove()
            handles.clear()
            with torch.no_grad():
                for i, groups in enumerate(units):
                    for u, named in groups.items():
                        dot = absdot = sq = 0.0
                        for _, p in named:
                            if p.grad is None:
                                continue
                            g = p.grad.double()
                            wd = p.detach().double()
                            dot += float((wd * g).sum())
                            absdot += float((wd * g).abs().sum())
                            sq += float(g.pow(2).sum())
                        stats.taylor[u][i] = abs(dot)
                        stats.taylor_abs[u][i] = absdot
                        stats.grad_norm[u][i] = math.sqrt(sq)
                        stats.fisher[u][i] = float(fisher_sq[u][i]) / stats.micro_batches
                emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
                if emb is not None and getattr(emb, "weight", None) is not None and emb.weight.grad is not None:
                    stats.embedding_grad_norm = float(emb.weight.grad.double().norm())
                head = parts.head
                if head is not None and head.weight.grad is not None:
                    stats.head_grad_norm = float(head.weight.grad.double().norm())
                    stats.head_tied = emb is not None and head.weight is getattr(emb, "weight", None)
        stats.memory = mem.summary()
    finally:
        for h in handles:
            h.remove()
        for p, f, g in zip(params, flags, old_grads):
            p.grad = g
            p.requires_grad_(f)
    stats.wall_time_s = time.perf_counter() - t0
    stats.loss = total_nll / N
    stats.tokens = int(ids.numel())
    stats.positions = N
    return stats


def skew_statistics(values: list[float], embedding: float | None = None, head: float | None = None) -> dict[str, Any]:
    """How unevenly a per-layer quantity is spread over depth (LISA's layer-wise norm skew)."""
    from scipy import stats as sps

    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0 or v.mean() == 0:
        return {}
    mean = float(v.mean())
    out: dict[str, Any] = {
        "skewness": float(sps.skew(v)) if v.size > 2 and v.std() > 0 else 0.0,
        "max_over_mean": float(v.max() / mean),
        "min_over_mean": float(v.min() / mean),
        "coefficient_of_variation": float(v.std() / mean),
        "argmax_layer": int(np.argmax(v)),
        "argmin_layer": int(np.argmin(v)),
    }
    if embedding is not None:
        out["embedding_over_block_mean"] = embedding / mean
    if head is not None:
        out["head_over_block_mean"] = head / mean
    return out


def calibration_ids(ctx) -> torch.Tensor:
    """The scan's calibration windows [N, T], cut to option ``gradient_tokens`` (whole windows)."""
    if ctx.runner is None or not ctx.runner.batches:
        raise LayerscopeError("gradient scorers need calibration data")
    if "input_ids" not in ctx.runner.batches[0].inputs:
        raise LayerscopeError("gradient scorers need token ids (text data)")
    ids = torch.cat([b.inputs["input_ids"] for b in ctx.runner.batches], dim=0)
    cap = ctx.options.get("gradient_tokens")
    if cap:
        ids = ids[: max(1, int(cap) // ids.shape[1])]
    return ids


def shared_gradients(ctx) -> GradientStats:
    """One forward + backward per scan, shared by taylor, fisher and grad_norm."""
    stats = getattr(ctx, "_layerscope_gradients", None)
    if stats is None:
        stats = gradient_statistics(ctx.parts, calibration_ids(ctx), int(ctx.options.get("gradient_batch_size", 1)))
        ctx._layerscope_gradients = stats
    return stats


# --------------------------------------------------------------------------- the metrics
_REF_TAYLOR = "Ma et al. 2023, LLM-Pruner (first-order Taylor importance); Molchanov et al. 2019"
_REF_FISHER = "Kirkpatrick et al. 2017 (EWC); Kwon et al. 2022, A Fast Post-Training Pruning Framework"
_REF_GRAD = "Yao et al. 2024 (IST); Pan et al. 2024, LISA: Layerwise Importance Sampling"


class _LMHeadNeeded(Metric):
    @staticmethod
    def unavailable(parts) -> str | None:
        return None if parts.has_lm_head else "needs a causal LM head (the loss is the next-token NLL)"


class Taylor(_LMHeadNeeded):
    """First-order Taylor importance |sum w * dL/dw| per block and sublayer (see module docstring)."""

    name = "taylor"
    direction = "higher"
    definition = "|sum over the unit's weights of w * dL/dw|, L = mean next-token NLL on calibration data"
    reference = _REF_TAYLOR

    def finish(self) -> list[Column]:
        s = shared_gradients(self.ctx)
        cols = []
        for u in UNITS:
            cols.append(self.column(u, s.taylor[u], **s.info()))
            cols.append(self.column(u, s.taylor_abs[u], metric="taylor_abs", **s.info(),
                                    definition="sum over the unit's weights of |w * dL/dw| (element-wise first order)"))
        return cols


class Fisher(_LMHeadNeeded):
    """Empirical Fisher sum_w mean_b (dL_b/dw)^2 per block and sublayer (see module docstring)."""

    name = "fisher"
    direction = "higher"
    definition = "sum over the unit's weights of the mean over micro-batches of (dL_b/dw)^2"
    reference = _REF_FISHER

    def finish(self) -> list[Column]:
        s = shared_gradients(self.ctx)
        return [self.column(u, s.fisher[u], granularity="micro-batch of "
                            f"{int(self.ctx.options.get('gradient_batch_size', 1))} sequence(s)", **s.info())
                for u in UNITS]


class GradNorm(_LMHeadNeeded):
    """Gradient norm ||dL/dW|| per block and sublayer, with its skew across layers."""

    name = "grad_norm"
    direction = "higher"
    definition = "L2 norm of dL/dW over the unit's weights, L = mean next-token NLL on calibration data"
    reference = _REF_GRAD

    def finish(self) -> list[Column]:
        s = shared_gradients(self.ctx)
        cols = []
        for u in UNITS:
            extra = {}
            if u == "block":
                extra["skew"] = skew_statistics(s.grad_norm[u], s.embedding_grad_norm,
                                                None if s.head_tied else s.head_grad_norm)
                extra["embedding_grad_norm"] = s.embedding_grad_norm
                extra["head_grad_norm"] = s.head_grad_norm
                extra["head_tied_to_embedding"] = s.head_tied
            cols.append(self.column(u, s.grad_norm[u], **extra, **s.info()))
        return cols


class WeightNorm(Metric):
    """Per-layer weight norm / mean over layers and its skew (LISA, Pan et al. 2024). Data-free."""

    name = "weight_norm"
    direction = None
    needs_data = False
    definition = "Frobenius norm of the unit's parameters divided by its mean over the blocks"
    reference = "Pan et al. 2024, LISA: Layerwise Importance Sampling for Memory-Efficient LLM Fine-Tuning"

    @torch.no_grad()
    def finish(self) -> list[Column]:
        parts = self.ctx.parts
        raw = {u: [0.0] * self.L for u in UNITS}
        for i in range(self.L):
            for u, named in unit_parameters(parts, i).items():
                raw[u][i] = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for _, p in named))
        model = parts.model
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        emb_norm = float(emb.weight.detach().double().norm()) if emb is not None and hasattr(emb, "weight") else None
        head = parts.head
        tied = head is not None and emb is not None and head.weight is getattr(emb, "weight", None)
        head_norm = float(head.weight.detach().double().norm()) if head is not None and not tied else None
        cols = []
        for u in UNITS:
            mean = float(np.mean(raw[u])) if raw[u] else 0.0
            ratio = [v / mean if mean else None for v in raw[u]]
            extra: dict[str, Any] = {"norms": raw[u]}
            if u == "block":
                extra["skew"] = skew_statistics(raw[u], emb_norm, head_norm)
                extra["embedding_norm"] = emb_norm
                extra["head_norm"] = head_norm
                extra["head_tied_to_embedding"] = tied
            cols.append(self.column(u, ratio, **extra))
        return cols
