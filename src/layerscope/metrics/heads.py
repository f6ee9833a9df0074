"""Per-head attention statistics (needs attention probabilities: eager attention on a few sequences)."""
from __future__ import annotations

import torch

from layerscope.metrics.base import BlockObservation, Column, Metric


class AttentionHeads(Metric):
    """Per head: attention entropy, attention-sink mass on the first token, relative output norm,
    and a dormant flag.

    Guo et al., 2024, "Active-Dormant Attention Heads: Mechanistically Demystifying Extreme-Token
    Phenomena in LLMs": a dormant head puts almost all its attention on the first (sink) token and
    writes almost nothing. Flag rule used here: sink mass >= 0.7 and the head's mean output norm
    (input of the attention output projection, per head) <= 0.5 x the layer's mean head norm.
    Computed on the eager-attention sequences only (SDPA returns no probabilities).
    """

    name = "attention_heads"
    direction = "lower"
    definition = "share of heads flagged dormant (sink mass >= 0.7 and relative output norm <= 0.5)"
    reference = "Guo et al. 2024, Active-Dormant Attention Heads"
    needs = frozenset({"attn_probs", "head_out"})
    sink_threshold = 0.7
    norm_threshold = 0.5

    @staticmethod
    def unavailable(parts) -> str | None:
        return None if parts.num_heads else "number of attention heads unknown"

    def begin(self, ctx):
        super().begin(ctx)
        H = ctx.num_heads
        self.H = H
        self.ent = torch.zeros(self.L, H, dtype=torch.float64)
        self.sink = torch.zeros(self.L, H, dtype=torch.float64)
        self.norm = torch.zeros(self.L, H, dtype=torch.float64)
        self.n_q = [0] * self.L
        self.n_tok = [0] * self.L
        self.causal = ctx.parts.causal

    def observe(self, obs: BlockObservation) -> None:
        if obs.attn_probs is None:
            return
        p = obs.attn_probs.float()  # [B, H, T, S]; float32 terms, float64 sums
        i = obs.index
        if p.shape[1] != self.H:  # the observer already filters these; never add a wrong-shaped tensor
            return
        q0 = 1 if self.causal and p.shape[2] > 1 else 0  # the first query can only attend to itself
        p = p[:, :, q0:, :]
        # per-query entropy summed in float32 over at most a few thousand keys (relative error ~1e-6), then
        # accumulated in float64; a float64 copy of the [B, H, T, S] probabilities would cost more than the rest
        ent = -torch.xlogy(p, p).sum(-1)  # [B, H, T']
        self.ent[i] += ent.double().sum(dim=(0, 2))
        self.sink[i] += p[..., 0].double().sum(dim=(0, 2))
        self.n_q[i] += p.shape[0] * p.shape[2]
        if obs.head_out is not None:
            self.norm[i] += obs.head_out.double().norm(dim=-1).sum(dim=(0, 1))
            self.n_tok[i] += obs.head_out.shape[0] * obs.head_out.shape[1]

    def _unmeasured_reason(self) -> str:
        runner = self.ctx.runner
        if runner is None or not any(b.eager for b in runner.batches):
            return "no sequence ran with eager attention (--attn-seqs 0), so no attention probabilities"
        return (f"the attention kernel returned no attention probabilities with {self.H} heads (the config's "
                "count): a kernel without weights, or another head layout")

    def finish(self) -> list[Column]:
        measured = torch.tensor([n > 0 for n in self.n_q])
        nq = torch.tensor(self.n_q, dtype=torch.float64).clamp_min(1)[:, None]
        ent = self.ent / nq
        sink = self.sink / nq
        have_norm = all(n > 0 for n, m in zip(self.n_tok, measured.tolist()) if m) and bool(measured.any())
        norm_rule = f"sink mass >= {self.sink_threshold} and relative output norm <= {self.norm_threshold}"
        if have_norm:
            norm = self.norm / torch.tensor(self.n_tok, dtype=torch.float64).clamp_min(1)[:, None]
            rel = norm / norm.mean(dim=1, keepdim=True).clamp_min(1e-30)
            dormant = ((sink >= self.sink_threshold) & (rel <= self.norm_threshold)).double()
            rule_text, fallback = norm_rule, {}
        else:  # weaker rule, and the column says so
            rel = torch.full_like(sink, float("nan"))
            dormant = (sink >= self.sink_threshold).double()
            rule_text = (f"sink mass >= {self.sink_threshold} only (FALLBACK: head outputs were not observed, so "
                         "the output-norm condition of the rule could not be applied)")
            fallback = {"fallback": "sink-only dormant rule: head outputs (input of the output projection) not observed"}
        unmeasured = {}
        if not bool(measured.all()):  # unmeasured layers are None, never 0 (and so never ranked)
            reason = self._unmeasured_reason()
            unmeasured = {"not_measured": reason,
                          "unmeasured_layers": [i for i, m in enumerate(measured.tolist()) if not m]}
            nan = float("nan")
            for t in (ent, sink, rel, dormant):
                t[~measured] = nan
        seqs = {"observed_queries_per_layer": self.n_q[0], **unmeasured}
        rule = {"sink_threshold": self.sink_threshold,
                "norm_threshold": self.norm_threshold if have_norm else None, **fallback, **unmeasured}
        return [
            self.column("head", ent.tolist(), metric="attention_entropy", direction=None,
                        definition="mean over queries of the entropy (nats) of the head's attention distribution", **seqs),
            self.column("head", sink.tolist(), metric="sink_mass", direction="lower",
                        definition="mean attention probability on the first token", **seqs),
            self.column("head", rel.tolist(), metric="head_output_norm", direction="higher",
                        definition="head's mean output norm / mean over the layer's heads",
                        **{**seqs, **({} if have_norm else {"not_measured": "head outputs were not observed"})}),
            self.column("head", dormant.tolist(), metric="dormant_head", direction="lower",
                        definition=f"1 if {rule_text}", **rule),
            self.column("attention", ent.mean(1).tolist(), metric="attention_entropy", direction=None,
                        definition="attention entropy (nats) averaged over the layer's heads", **unmeasured),
            self.column("attention", sink.mean(1).tolist(), metric="sink_mass", direction="lower",
                        definition="attention-sink mass on the first token, averaged over heads", **unmeasured),
            self.column("attention", dormant.mean(1).tolist(), metric="dormant_share",
                        definition=f"share of heads flagged dormant ({rule_text})", **rule),
        ]
