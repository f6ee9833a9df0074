"""Metric `quant_sensitivity`: what quantizing one block alone does to the model's predictions.

For block i, every weight layer of that block (and only those) is replaced by its HQQ fake-quant
reconstruction (default 3 bits, group 64, round to nearest), the calibration batches run from the
block's *unchanged* input (the scan already holds it: the prefix 0..i-1 is never recomputed) through
the quantized block i and then the unmodified blocks i+1..L-1 and the head, and the mean over tokens
of KL(p_full || p_quantized) of the next-token distributions is recorded (nats per token).

Options (scan(options=...)):
  quant_bits    int or list of ints, default 3 - every width is recorded (details["kl"]), the first
                 one (or 3 when present) fills the column; the allocator reads them all
  quant_group   group size, default 64
  quant_method  'rtn' (default) or 'hqq' (HQQ's optimiser)
  quant_tokens  use only the first calibration batches holding up to this many tokens (default all)

Not in DEFAULT_METRICS: it costs about (L+1)/2 forward passes of the calibration text per bit width.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from layerscope.compress.quant import Scheme, check_linear, check_scheme, fake_quant
from layerscope.errors import LayerscopeError
from layerscope.evaluation.scoring import OutputHead, ReferenceScorer
from layerscope.metrics.base import Accumulator, BlockObservation, Column, Metric
from layerscope.model.offload import make_resident


def schemes_from_options(options: dict[str, Any]) -> list[Scheme]:
    bits = options.get("quant_bits", 3)
    if isinstance(bits, (int, str)):
        bits = [bits]
    group = int(options.get("quant_group", 64))
    method = str(options.get("quant_method", "rtn"))
    out: list[Scheme] = []
    for b in bits:
        try:
            b = int(b)
        except (TypeError, ValueError):
            raise LayerscopeError(f"quant_bits must be integers, got {b!r}") from None
        s = check_scheme(b, group, method)
        if not s.quantized:
            raise LayerscopeError("quant_sensitivity needs a quantized bit width (16 means unquantized)")
        if s not in out:
            out.append(s)
    return out


class QuantSensitivity(Metric):
    name = "quant_sensitivity"
    direction = "higher"
    definition = ("mean KL(full || block alone fake-quantized with HQQ) of next-token distributions, nats/token; "
                  "the block's linears at the given bits/group (default 3-bit, group 64, round to nearest)")
    reference = "per-layer quantization sensitivity as in mixed-precision allocation (HAWQ, Dong et al. 2019; " \
                "llama.cpp imatrix-free mixes); measured here as output KL"
    needs_data = True

    @staticmethod
    def unavailable(parts) -> str | None:
        return None if parts.has_lm_head else "no causal LM head"

    def begin(self, ctx) -> None:
        super().begin(ctx)
        self.schemes = schemes_from_options(ctx.options)
        primary = [s for s in self.schemes if s.bits == 3]
        self.primary = primary[0] if primary else self.schemes[0]
        self.acc = {s: Accumulator(self.L) for s in self.schemes}
        self.max_tokens = ctx.options.get("quant_tokens")
        self.ref: dict[int, ReferenceScorer] = {}  # per batch, vocabulary-bounded (evaluation/scoring.py)
        self.head = OutputHead.of(ctx.parts) if ctx.parts.has_lm_head else None
        self.qweights: dict[Scheme, dict[str, torch.Tensor]] = {}
        self.used_batches: set[int] | None = None
        self.tokens_used = 0

    # ------------------------------------------------------------------ helpers
    def _selected(self, b: int) -> bool:
        if self.used_batches is None:
            runner = self.ctx.runner
            used, total = set(), 0
            for k, batch in enumerate(runner.batches):
                n = int(next(iter(batch.inputs.values())).numel())
                if self.max_tokens is not None and used and total + n > int(self.max_tokens):
                    break
                used.add(k)
                total += n
            self.used_batches, self.tokens_used = used, total
        return b in self.used_batches

    def observe_weights(self, index: int) -> None:
        parts = self.ctx.parts
        linears = parts.block_linears(index)
        for s in self.schemes:
            q = {}
            for name, m in linears.items():
                check_linear(f"{parts.blocks_path}.{index}.{name}", m, s)
                q[name] = fake_quant(m.weight.data, s)
            self.qweights[s] = q

    def block_done(self, index: int) -> None:
        self.qweights = {}

    def _suffix(self, start: int, h: torch.Tensor, batch) -> torch.Tensor:
        runner = self.ctx.runner
        for j in range(start, self.L):
            h = runner.forward_block(j, h, batch)
        return h

    def _reference(self, b: int, h0: torch.Tensor, batch) -> ReferenceScorer:
        ref = self.ref.get(b)
        if ref is None:
            ref = self.ref[b] = ReferenceScorer(self.head, self._suffix(0, h0, batch), top1=False)
        return ref

    @torch.no_grad()
    def observe(self, obs: BlockObservation) -> None:
        if not self._selected(obs.batch_index):
            return
        runner = self.ctx.runner
        batch = runner.batches[obs.batch_index]
        if obs.batch_index not in self.ref and obs.index != 0:
            raise LayerscopeError("quant_sensitivity must see every block from the first one")
        ref = self._reference(obs.batch_index, obs.h_in, batch)
        linears = self.ctx.parts.block_linears(obs.index)
        for s in self.schemes:
            make_resident(self.ctx.parts.model, obs.index)  # out-of-core: the suffix run freed this block
            original = {n: m.weight.data for n, m in linears.items()}
            try:
                for n, m in linears.items():
                    m.weight.data = self.qweights[s][n]
                h = runner.forward_block(obs.index, obs.h_in, batch)
            finally:
                for n, m in linears.items():
                    m.weight.data = original[n]
            score = ref.score_hidden(self._suffix(obs.index + 1, h, batch))
            self.acc[s].sum[obs.index] += score.kl
            self.acc[s].count[obs.index] += score.n

    def finish(self) -> list[Column]:
        kl = {s.label: self.acc[s].mean() for s in self.schemes}
        self.ref = {}
        return [self.column(
            "block", self.acc[self.primary].mean(),
            bits=self.primary.bits, group_size=self.primary.group_size, method=self.primary.method,
            tokens=self.tokens_used, kl=kl, schemes=[s.to_dict() for s in self.schemes],
            note=("each block quantized alone (HQQ fake-quant, bit-exact with HQQLinear), the rest of the model "
                  "unchanged; KL(full || quantized) of next-token distributions, mean over calibration tokens"),
        )]


def kl_from_details(details: dict[str, Any]) -> dict[Scheme, list]:
    """{Scheme: per-block KL} from a quant_sensitivity column's details."""
    out: dict[Scheme, list] = {}
    schemes = details.get("schemes") or []
    kl = details.get("kl") or {}
    for d in schemes:
        s = Scheme(int(d["bits"]), int(d["group_size"]), str(d.get("method", "rtn")))
        if s.label in kl:
            out[s] = kl[s.label]
    return out


@torch.no_grad()
def naive_quant_sensitivity(model, input_ids: torch.Tensor, scheme: Scheme, batch_size: int = 4) -> list[float]:
    """Reference implementation without prefix reuse: quantize block i, rerun the whole model.

    For tests: must equal the metric up to float rounding.
    """
    from layerscope.compress.quant import FakeQuantizer, full_name
    from layerscope.model.adapter import find_parts

    parts = find_parts(model)
    fq = FakeQuantizer(parts)
    out = []
    refs = [F.log_softmax(model(input_ids=input_ids[s:s + batch_size], use_cache=False).logits.float(), -1)
            for s in range(0, input_ids.shape[0], batch_size)]
    for i in range(parts.num_layers):
        fq.apply({full_name(parts, i, n): scheme for n in parts.block_linears(i)})
        total, count = 0.0, 0
        for k, s in enumerate(range(0, input_ids.shape[0], batch_size)):
            logq = F.log_softmax(model(input_ids=input_ids[s:s + batch_size], use_cache=False).logits.float(), -1)
            kl = (refs[k].exp() * (refs[k] - logq)).sum(-1)
            total += float(kl.double().sum())
            count += kl.numel()
        fq.restore()
        out.append(total / count)
    return out


def measure_scores(model, tokenizer, *, bits: list[int] | tuple[int, ...] = (3,), group_size: int = 64,
                   method: str = "rtn", tokens: int = 2048, seq_len: int = 512, data: Any = "wikipedia",
                   extra_metrics: list[str] | tuple[str, ...] = (), batch_size: int = 4, progress: bool = False):
    """ScoreTable with quant_sensitivity at every `bits` (and any other metrics) on calibration text."""
    from layerscope.metrics.scan import scan

    return scan(model, data, ["quant_sensitivity", *extra_metrics], tokenizer=tokenizer, tokens=tokens,
                seq_len=seq_len, batch_size=batch_size, progress=progress,
                options={"quant_bits": list(bits), "quant_group": group_size, "quant_method": method})
