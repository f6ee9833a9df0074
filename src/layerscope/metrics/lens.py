"""Logit lens: decode each block's output through the model's own final norm and head."""
from __future__ import annotations

import torch

from layerscope.evaluation.scoring import OutputHead, ReferenceScorer
from layerscope.metrics.base import BlockObservation, Column, Metric


class LogitLens(Metric):
    """Logit lens on a fixed random subsample of token positions.

    nostalgebraist, 2020, "interpreting GPT: the logit lens"; used for depth efficiency in Csordas et
    al. 2025 and Biran et al. 2024, "Hopping Too Late". Each block's output passes through the model's
    final norm and output head (HF's output_hidden_states[-1] already has the final norm applied, so
    we never take hidden states from there). Reported: KL(final || layer), top-1 agreement with the
    model's own prediction, and the KL drop a block causes (its contribution to the prediction).
    """

    name = "logit_lens"
    direction = "higher"
    definition = "KL(final || lens at input) - KL(final || lens at output) of the block, on a token subsample"
    reference = "nostalgebraist 2020 (logit lens); Csordas et al. 2025; Biran et al. 2024"
    default_tokens = 256

    @staticmethod
    def unavailable(parts) -> str | None:
        return None if parts.has_lm_head else "no causal LM head"

    def begin(self, ctx):
        super().begin(ctx)
        self.n_sample = int(ctx.options.get("lens_tokens", self.default_tokens))
        self.selected: dict[int, torch.Tensor] = {}
        self.states: dict[int, list[torch.Tensor]] = {}  # layer (-1 = embeddings) -> per-batch rows
        self.gen = torch.Generator().manual_seed(ctx.seed)
        self.total_positions = ctx.n_tokens

    def _select(self, obs: BlockObservation) -> torch.Tensor:
        sel = self.selected.get(obs.batch_index)
        if sel is None:
            n = obs.h_in.shape[0] * obs.h_in.shape[1]
            k = max(1, round(self.n_sample * n / max(self.total_positions, 1)))
            sel = torch.randperm(n, generator=self.gen)[: min(k, n)].sort().values
            self.selected[obs.batch_index] = sel
        return sel

    def observe(self, obs: BlockObservation) -> None:
        sel = self._select(obs)
        if obs.index == 0:
            self.states.setdefault(-1, []).append(obs.h_in.reshape(-1, obs.h_in.shape[-1])[sel].clone())
        self.states.setdefault(obs.index, []).append(obs.h_out.reshape(-1, obs.h_out.shape[-1])[sel].clone())

    @torch.no_grad()
    def finish(self) -> list[Column]:
        # vocabulary-bounded: positions in chunks, the final distribution kept without its vocabulary axis
        ref = ReferenceScorer(OutputHead.of(self.ctx.parts), torch.cat(self.states[self.L - 1]))
        kl, top1 = {}, {}
        for layer in range(-1, self.L):
            score = ref.score_hidden(torch.cat(self.states[layer]))
            kl[layer] = score.kl / score.n
            top1[layer] = score.top1 / score.n
            self.states[layer] = []  # free as we go
        n = ref.n
        note = f"computed on a random subsample of {n} token positions (seed {self.ctx.seed})"
        return [
            self.column("block", [kl[i - 1] - kl[i] for i in range(self.L)], metric="logit_lens_kl_drop",
                        sampled_tokens=n, note=note, kl_embeddings=kl[-1], top1_embeddings=top1[-1]),
            self.column("block", [kl[i] for i in range(self.L)], metric="logit_lens_kl", direction=None,
                        definition="KL(final || logit lens at the block's output), nats, on a token subsample",
                        sampled_tokens=n, note=note),
            self.column("block", [top1[i] for i in range(self.L)], metric="logit_lens_top1", direction=None,
                        definition="share of sampled tokens whose logit-lens top-1 equals the model's final top-1",
                        sampled_tokens=n, note=note),
        ]
