"""How much each block and sublayer changes the residual stream (one forward pass)."""
from __future__ import annotations

import math

import torch

from layerscope.metrics.base import Accumulator, BlockObservation, Column, Metric


class _PerUnitMetric(Metric):
    """A per-token statistic of (stream in, stream out) for the block and each sublayer, read from the
    observation's shared float64 norms and inner products (BlockObservation.dot)."""

    PAIRS = {"block": ("in", "out"), "attention": ("in", "attn_out"), "mlp": ("mlp_in", "mlp_out")}

    def per_token(self, obs: BlockObservation, a: str, b: str) -> torch.Tensor:
        raise NotImplementedError

    def begin(self, ctx):
        super().begin(ctx)
        self.acc = {u: Accumulator(self.L) for u in self.PAIRS}

    def observe(self, obs: BlockObservation) -> None:
        for unit, (a, b) in self.PAIRS.items():
            self.acc[unit].add(obs.index, self.per_token(obs, a, b))

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

    def per_token(self, obs, a, b):
        return 1.0 - obs.cos(a, b)


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
        # batch -> {block index: (its input as it came, per-token float64 norms)}; kept in the stream's own dtype
        # (float64 copies of up to 8 blocks' inputs per batch would double this metric's memory)
        self.history: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}

    def observe(self, obs: BlockObservation) -> None:
        hist = self.history.setdefault(obs.batch_index, {})
        hist[obs.index] = (obs.h_in, obs.norm("in"))
        # The output of block i is the input of block i+1.
        end = obs.index + 1
        out, n_out = obs.stream("out"), obs.norm("out")
        for n in self.windows:
            start = end - n
            if start == obs.index:  # the block's own input: shared with block influence
                cos = obs.cos("in", "out")
            elif start >= 0 and start in hist:
                x, n_x = hist[start]
                cos = (x.double() * out).sum(-1) / (n_x * n_out).clamp_min(1e-12)
            else:
                continue
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

    def per_token(self, obs, a, b):
        return obs.delta_norm(a, b) / obs.norm(a).clamp_min(1e-12)


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
        out = obs.stream("out")
        n_out = obs.norm("out")
        d = out.shape[-1]
        mean = out.sum(dim=-1) / d
        self.norm.add(obs.index, n_out)
        self.var.add(obs.index, (obs.dot("out", "out") / d - mean * mean).clamp_min(0))  # E[x²] − E[x]², float64
        self.growth.add(obs.index, n_out / obs.norm("in").clamp_min(1e-12))

    def finish(self) -> list[Column]:
        return [
            self.column("block", self.growth.mean(), metric="norm_growth"),
            self.column("block", self.norm.mean(), metric="hidden_norm", direction=None,
                        definition="mean over tokens of the L2 norm of the block's output hidden state"),
            self.column("block", self.var.mean(), metric="hidden_variance", direction=None,
                        definition="mean over tokens of the variance across features of the block's output"),
        ]
