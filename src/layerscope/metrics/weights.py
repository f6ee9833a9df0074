"""Weight-only metrics (no data): outliers and the singular-value spectrum of every linear layer."""
from __future__ import annotations

import math

import numpy as np
import torch

from ..adapter import linear_weight
from .base import Column, Metric, register


def gram_eigenvalues(w: torch.Tensor) -> np.ndarray:
    """Squared singular values of w, ascending (eigenvalues of the smaller Gram matrix)."""
    w = w.detach().double()
    g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return torch.linalg.eigvalsh(g).clamp_min(0).numpy()


def stable_rank(eig: np.ndarray) -> float:
    """||W||_F^2 / ||W||_2^2 (Rudelson & Vershynin 2007)."""
    return float(eig.sum() / eig.max()) if eig.max() > 0 else 0.0


def effective_rank(eig: np.ndarray) -> float:
    """exp(Shannon entropy of sigma_i / sum sigma) (Roy & Vetterli 2007)."""
    s = np.sqrt(eig[eig > 0])
    p = s / s.sum()
    return float(math.exp(-(p * np.log(p)).sum()))


def power_law_alpha(eig: np.ndarray, min_tail: int = 10) -> float:
    """Exponent of a power law fitted to the tail of the eigenvalue spectrum (ESD) by maximum
    likelihood, with the tail start x_min chosen to minimise the Kolmogorov-Smirnov distance
    (Clauset, Shalizi & Newman 2009), as WeightWatcher does (Martin & Mahoney 2021)."""
    x = np.sort(eig[eig > eig.max() * 1e-12])
    n = len(x)
    if n < min_tail + 1:
        return float("nan")
    best = (float("inf"), float("nan"))
    logx = np.log(x)
    for k in range(0, n - min_tail):
        tail_log = logx[k:] - logx[k]
        s = tail_log.sum()
        if s <= 0:
            continue
        m = n - k
        alpha = 1.0 + m / s
        emp = np.arange(m) / m
        theo = 1.0 - np.exp((1.0 - alpha) * tail_log)
        ks = float(np.abs(emp - theo).max())
        if ks < best[0]:
            best = (ks, alpha)
    return best[1]


def outlier_share(w: torch.Tensor, z: float = 1.0) -> float:
    """Share of weights whose z-score |w - mean| / std exceeds z: the ZD score of Layer-Wise
    Quantization (Dumitru et al. 2024)."""
    w = w.detach().double().flatten()
    std = w.std()
    if std == 0:
        return 0.0
    return float(((w - w.mean()).abs() / std > z).double().mean())


@register
class WeightSpectrum(Metric):
    """Outlier share (ZD), stable rank, effective rank and power-law alpha of each linear layer's
    singular values, aggregated per block and per attention / MLP sublayer. No data needed.

    ZD: Dumitru et al. 2024, "Layer-Wise Quantization" (smaller ZD = more important, as the paper
    ranks). Stable rank (Rudelson & Vershynin 2007), effective rank (Roy & Vetterli 2007), alpha:
    Martin & Mahoney 2021, heavy-tailed self-regularisation / WeightWatcher (smaller alpha = better
    trained layer). Ranks are divided by min(out, in) so matrices of different shapes compare.
    """

    name = "weights"
    needs_data = False
    direction = None
    definition = "weight statistics per linear layer, averaged over the unit's matrices"
    reference = "Dumitru et al. 2024 (ZD); Roy & Vetterli 2007; Martin & Mahoney 2021 (alpha)"

    STATS = {
        "zd_outlier_share": ("lower", "share of weights with |z-score| > 1 (ZD score), parameter-weighted"),
        "stable_rank": ("higher", "||W||_F^2 / ||W||_2^2 divided by min(out, in), mean over matrices"),
        "effective_rank": ("higher", "exp(entropy of normalised singular values) / min(out, in), mean over matrices"),
        "power_law_alpha": ("lower", "MLE power-law exponent of the eigenvalue spectrum tail, mean over matrices"),
    }

    def begin(self, ctx):
        super().begin(ctx)
        self.per_layer: list[dict[str, dict]] = [dict() for _ in range(self.L)]

    @torch.no_grad()
    def observe_weights(self, i: int) -> None:
        parts = self.ctx.parts
        rows = {}
        for name, mod in parts.block_linears(i).items():
            w = linear_weight(mod).float()
            eig = gram_eigenvalues(w)
            k = min(w.shape)
            rows[name] = {
                "sublayer": parts.sublayer_of(name),
                "params": w.numel(),
                "zd_outlier_share": outlier_share(w),
                "stable_rank": stable_rank(eig) / k,
                "effective_rank": effective_rank(eig) / k,
                "power_law_alpha": power_law_alpha(eig),
            }
        self.per_layer[i] = rows

    def _aggregate(self, rows: dict, stat: str) -> float | None:
        if not rows:
            return None
        if stat == "zd_outlier_share":
            tot = sum(r["params"] for r in rows.values())
            return sum(r[stat] * r["params"] for r in rows.values()) / tot
        vals = [r[stat] for r in rows.values() if r[stat] == r[stat]]
        return float(np.mean(vals)) if vals else None

    def finish(self) -> list[Column]:
        cols = []
        for stat, (direction, definition) in self.STATS.items():
            for unit in ("block", "attention", "mlp"):
                vals = []
                for rows in self.per_layer:
                    sel = rows if unit == "block" else {k: r for k, r in rows.items() if r["sublayer"] == unit}
                    vals.append(self._aggregate(sel, stat))
                extra = {"per_matrix": [{k: {s: r[s] for s in self.STATS} for k, r in rows.items()}
                                        for rows in self.per_layer]} if unit == "block" else {}
                cols.append(self.column(unit, vals, metric=stat, direction=direction, definition=definition, **extra))
        return cols
