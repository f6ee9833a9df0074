"""How much each block and sublayer changes the residual stream (one forward pass)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from layerscope.metrics.base import Accumulator, BlockObservation, Column, Metric


def one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token 1 - cos(a, b) in float64 (so tiny changes are not lost to rounding)."""
    return 1.0 - F.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-12)


class _PerUnitMetric(Metric):
    """A per-token statistic of (stream in, stream out, contribution) for the block and each sublayer."""

    def per_token(self, x_in: torch.Tensor, x_out: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def begin(self, ctx):
        super().begin(ctx)
        self.acc = {u: Accumulator(self.L) for u in ("block", "attention", "mlp")}

    def observe(self, obs: BlockObservation) -> None:
        i = obs.index
        d_attn, d_mlp = obs.delta_attn, obs.delta_mlp
        self.acc["block"].add(i, self.per_token(obs.h_in, obs.h_out, obs.h_out - obs.h_in))
        self.acc["attention"].add(i, self.per_token(obs.h_in, obs.h_in + d_attn, d_attn))
        self.acc["mlp"].add(i, self.per_token(obs.mlp_in, obs.mlp_in + d_mlp, d_mlp))

    def finish(self) -> list[Column]:
        return [self.column(u, a.mean()) for u, a in self.acc.items()]


class BlockInfluence(_PerUnitMetric):
    """Block Influence: BI = 1 - E_t[cos(x_in, x_out)] per block, attention and MLP sublayer.

    ShortGPT (Men et al., 2024, "ShortGPT: Layers in LLMs are More Redundant Than You Expect") for
    blocks; He et al., 2024, "What Matters in Transformers? Not All Attention is Needed" for the
    attention / MLP sublayers, where the sublayer's input is the residual stream it reads and its
    output that stream plus the sublayer's contribution.
    """

    name = "block_influence"
    direction = "higher"
    definition = "1 - mean over tokens of cos(input, output) of the unit's residual stream"
    reference = "ShortGPT (Men et al. 2024); What Matters in Transformers? (He et al. 2024)"

    def per_token(self, x_in, x_out, delta):
        return one_minus_cos(x_in, x_out)


class AngularDistance(Metric):
    """Angular distance d(x_l, x_{l+n}) = arccos(cos(x_l, x_{l+n})) / pi between the inputs of
    block l and block l+n, averaged over all tokens (the paper uses the last token).

    Gromov et al., 2024, "The Unreasonable Ineffectiveness of the Deeper Layers". A small distance
    means blocks l..l+n-1 can be removed together; the value is stored at l (None where l+n > L).
    """

    name = "angular_distance"
    direction = "higher"
    definition = "arccos(cos(input of block l, input of block l+n)) / pi, mean over tokens; value at l"
    reference = "Gromov et al. 2024, The Unreasonable Ineffectiveness of the Deeper Layers"
    windows = (1, 2, 4, 8)

    def begin(self, ctx):
        super().begin(ctx)
        self.windows = tuple(ctx.options.get("angular_windows", self.windows))
        self.nmax = max(self.windows)
        self.acc = {n: Accumulator(self.L) for n in self.windows}
        self.history: dict[int, dict[int, torch.Tensor]] = {}  # batch -> {block index: its input}

    def observe(self, obs: BlockObservation) -> None:
        hist = self.history.setdefault(obs.batch_index, {})
        hist[obs.index] = obs.h_in
        # The output of block i is the input of block i+1.
        end = obs.index + 1
        for n in self.windows:
            start = end - n
            if start >= 0 and start in hist:
                cos = F.cosine_similarity(hist[start].double(), obs.h_out.double(), dim=-1, eps=1e-12)
                self.acc[n].add(start, torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi)
        for k in [k for k in hist if k <= end - self.nmax]:
            del hist[k]

    def finish(self) -> list[Column]:
        return [
            self.column("block", self.acc[n].mean(), metric=f"angular_distance_n{n}",
                        definition=f"arccos(cos(input of block l, input of block l+{n})) / pi, mean over tokens")
            for n in self.windows
        ]


class RelativeContribution(_PerUnitMetric):
    """Relative contribution ||f(x)|| / ||x||: the norm of what a block / sublayer adds to the
    residual stream, relative to the stream it reads, per token.

    Csordas et al., 2025, "Do Language Models Use Their Depth Efficiently?".
    """

    name = "relative_contribution"
    direction = "higher"
    definition = "mean over tokens of ||unit output - unit input|| / ||unit input|| on the residual stream"
    reference = "Csordas et al. 2025, Do Language Models Use Their Depth Efficiently?"

    def per_token(self, x_in, x_out, delta):
        return delta.double().norm(dim=-1) / x_in.double().norm(dim=-1).clamp_min(1e-12)


class HiddenStateGrowth(Metric):
    """Hidden-state norm and variance of each block's output and the per-block norm growth
    ||x_out|| / ||x_in||.

    Sun et al., 2025, "The Curse of Depth in Large Language Models": under Pre-LN the output
    variance grows with depth, so deep blocks act almost as the identity.
    """

    name = "hidden_growth"
    direction = "higher"
    definition = "mean over tokens of ||block output|| / ||block input||"
    reference = "Sun et al. 2025, The Curse of Depth in Large Language Models"

    def begin(self, ctx):
        super().begin(ctx)
        self.norm = Accumulator(self.L)
        self.var = Accumulator(self.L)
        self.growth = Accumulator(self.L)

    def observe(self, obs: BlockObservation) -> None:
        out = obs.h_out.double()
        n_out = out.norm(dim=-1)
        self.norm.add(obs.index, n_out)
        self.var.add(obs.index, out.var(dim=-1, unbiased=False))
        self.growth.add(obs.index, n_out / obs.h_in.double().norm(dim=-1).clamp_min(1e-12))

    def finish(self) -> list[Column]:
        return [
            self.column("block", self.growth.mean(), metric="norm_growth"),
            self.column("block", self.norm.mean(), metric="hidden_norm", direction=None,
                        definition="mean over tokens of the L2 norm of the block's output hidden state"),
            self.column("block", self.var.mean(), metric="hidden_variance", direction=None,
                        definition="mean over tokens of the variance across features of the block's output"),
        ]
