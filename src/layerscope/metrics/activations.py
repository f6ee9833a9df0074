"""Activation statistics: massive activations in the residual stream, MLP activation sparsity."""
from __future__ import annotations

import numpy as np
import torch

from layerscope.metrics.base import Accumulator, BlockObservation, Column, Metric


def _lower_median(x: torch.Tensor) -> torch.Tensor:
    """torch.median's value (the lower middle for an even count); numpy's introselect on CPU is several
    times faster than torch.median there."""
    if x.device.type != "cpu":
        return x.median()
    k = (x.numel() - 1) // 2
    return torch.tensor(float(np.partition(x.numpy(), k)[k]), dtype=x.dtype)


class MassiveActivations(Metric):
    """Massive activations: max |a| / median |a| of each block's output hidden state, with where the
    maximum sits (token position, feature dimension) and the dimensions that carry the largest values.

    Sun et al., 2024, "Massive Activations in Large Language Models"; "Hidden Dynamics of Massive
    Activations in Transformer Training" (2025). Blocks that create massive activations are
    load-bearing: removing them breaks the attention-sink mechanism. The median is taken per batch
    and averaged over batches (streaming); the maximum is exact.
    """

    name = "massive_activations"
    direction = "higher"
    definition = "max |a| / median |a| over the block output's entries (median averaged over batches)"
    reference = "Sun et al. 2024, Massive Activations in LLMs; Hidden Dynamics of Massive Activations (2025)"
    top_dims = 3

    def begin(self, ctx):
        super().begin(ctx)
        self.max = [0.0] * self.L
        self.where: list[dict] = [{} for _ in range(self.L)]
        self.median = Accumulator(self.L)
        self.dim_max: list[torch.Tensor | None] = [None] * self.L

    def observe(self, obs: BlockObservation) -> None:
        a = obs.h_out.detach().abs().float()
        i = obs.index
        flat = a.reshape(-1)
        top, at = flat.max(0)  # value and position in one pass
        m = float(top)
        sample = flat if flat.numel() <= 4_000_000 else flat[:: flat.numel() // 4_000_000 + 1]
        self.median.add(i, _lower_median(sample).reshape(1))
        per_dim = a.reshape(-1, a.shape[-1]).amax(0)
        self.dim_max[i] = per_dim if self.dim_max[i] is None else torch.maximum(self.dim_max[i], per_dim)
        if m > self.max[i]:
            idx = int(at)
            b, rest = divmod(idx, a.shape[1] * a.shape[2])
            pos, dim = divmod(rest, a.shape[2])
            self.max[i] = m
            self.where[i] = {"value": m, "token_position": pos, "dim": dim}

    def finish(self) -> list[Column]:
        med = self.median.mean()
        ratio = [mx / md if md else None for mx, md in zip(self.max, med)]
        per_layer = []
        for i in range(self.L):
            top = torch.topk(self.dim_max[i], min(self.top_dims, self.dim_max[i].numel()))
            per_layer.append({**self.where[i], "median": med[i],
                              "top_dims": [int(d) for d in top.indices],
                              "top_values": [float(v) for v in top.values]})
        return [self.column("block", ratio, per_layer=per_layer)]


class MLPSparsity(Metric):
    """MLP activation sparsity: share of intermediate activations (the input of the MLP's down
    projection) whose magnitude is below `threshold` x that token's largest intermediate magnitude.

    Luo et al., 2024, "Sparsing Law: Towards Large Language Models with Greater Activation Sparsity";
    CHESS (He et al., 2024). Sparser MLPs use less of their capacity on this data.
    """

    name = "mlp_sparsity"
    direction = "lower"
    definition = "share of MLP intermediate activations with |a| < 0.01 * max_j |a_j| of the same token"
    reference = "Luo et al. 2024, Sparsing Law; He et al. 2024, CHESS"
    needs = frozenset({"mlp_act"})
    threshold = 0.01

    @staticmethod
    def unavailable(parts) -> str | None:
        return None if all(p is not None for p in parts.mlp_down_proj) else "MLP down projection not found"

    def begin(self, ctx):
        super().begin(ctx)
        self.threshold = float(ctx.options.get("sparsity_threshold", self.threshold))
        self.acc = Accumulator(self.L)

    def observe(self, obs: BlockObservation) -> None:
        a = obs.mlp_act.detach().abs().float()
        tau = self.threshold * a.amax(dim=-1, keepdim=True)
        self.acc.add(obs.index, (a < tau).float().mean(dim=-1))

    def finish(self) -> list[Column]:
        return [self.column("mlp", self.acc.mean(), threshold=self.threshold)]
