"""Weight-only metrics (no data): outliers and the singular-value spectrum of every linear layer."""
from __future__ import annotations

import json
import math

import numpy as np
import torch

from layerscope.errors import NumericalError
from layerscope.metrics.base import Column, Metric
from layerscope.model.adapter import linear_weight
from layerscope.outputs import write_json_atomic


def _jsonable(rows):
    return [{k: {f: (None if isinstance(v, float) and v != v else v) for f, v in r.items()} for k, r in layer.items()}
            for layer in rows]


def gram_eigenvalues(w: torch.Tensor) -> np.ndarray:
    """Squared singular values of w, ascending (eigenvalues of the smaller Gram matrix)."""
    return gram_eigenvalues_many([w])[0]


def gram_eigenvalues_many(ws: list[torch.Tensor]) -> list[np.ndarray]:
    """`gram_eigenvalues` of several matrices: the smaller-side Gram matrix of each in float32, one
    batched symmetric eigensolve per Gram size. float32 keeps the statistics within ~2e-5 relative of
    a float64 SVD (eigenvalues to ~1e-7 of the largest) at about half the cost (cold-scan budget)."""
    grams = []
    for w in ws:
        w = w.detach().float()
        grams.append(w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w)
    out: list[np.ndarray | None] = [None] * len(ws)
    by_size: dict[int, list[int]] = {}
    for k, g in enumerate(grams):
        by_size.setdefault(g.shape[0], []).append(k)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # LAPACK's symmetric eigensolver is faster single-threaded at these sizes
    try:
        for idx in by_size.values():
            eig = torch.linalg.eigvalsh(torch.stack([grams[k] for k in idx])).clamp_min(0).double().numpy()
            for k, e in zip(idx, eig):
                out[k] = e
    finally:
        torch.set_num_threads(threads)
    return out  # type: ignore[return-value]


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
    logx = np.log(x)
    ks_idx = np.arange(n - min_tail)  # candidate x_min positions
    m = n - ks_idx  # tail sizes
    s = np.cumsum(logx[::-1])[::-1][ks_idx] - m * logx[ks_idx]  # sum of log(x / x_min) over each tail
    valid = s > 0
    alpha = np.where(valid, 1.0 + m / np.where(valid, s, 1.0), np.nan)
    j = np.arange(n)
    rel = logx[None, :] - logx[ks_idx, None]  # [candidates, n]; entries with j < k are masked
    inside = j[None, :] >= ks_idx[:, None]
    emp = (j[None, :] - ks_idx[:, None]) / m[:, None]
    theo = 1.0 - np.exp((1.0 - alpha[:, None]) * np.where(inside, rel, 0.0))
    ks = np.where(inside, np.abs(emp - theo), 0.0).max(axis=1)
    ks = np.where(valid, ks, np.inf)
    best = int(np.argmin(ks))
    return float(alpha[best]) if np.isfinite(ks[best]) else float("nan")


def outlier_share(w: torch.Tensor, z: float = 1.0) -> float:
    """Share of weights whose z-score |w - mean| / std exceeds z: the ZD score of Layer-Wise
    Quantization (Dumitru et al. 2024)."""
    w = w.detach().flatten()
    wd = w.double()
    mean, std = float(wd.mean()), float(wd.std())  # moments in float64, the comparison in the weights' dtype
    if std == 0:
        return 0.0
    return int(((w - mean).abs() > z * std).sum()) / w.numel()


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

    CACHE_VERSION = 2  # 2: float32 Gram spectra (values within ~2e-5 of version 1)

    def begin(self, ctx):
        super().begin(ctx)
        self.per_layer: list[dict[str, dict]] = [dict() for _ in range(self.L)]
        self.cache_file = None
        self.cached = False
        sha = ctx.options.get("weights_sha256")
        if sha and ctx.options.get("weights_cache", True):  # weight statistics depend on the weights alone: reuse them across scans
            from layerscope.paths import cache_root

            self.cache_file = cache_root() / "weights" / f"{sha}-v{self.CACHE_VERSION}.json"
            try:
                rows = json.loads(self.cache_file.read_text())
                if isinstance(rows, list) and len(rows) == self.L:
                    self.per_layer, self.cached = rows, True
            except (OSError, ValueError):
                pass

    @torch.no_grad()
    def observe_weights(self, i: int) -> None:
        if self.cached:
            return
        parts = self.ctx.parts
        rows = {}
        linears = parts.block_linears(i)
        ws = {name: linear_weight(mod).float() for name, mod in linears.items()}
        for name, w in ws.items():
            if not torch.isfinite(w.sum()):  # NaN/Inf anywhere makes the sum non-finite
                raise NumericalError(f"non-finite weights (NaN/Inf) in block {i}, {name}")
        eigs = dict(zip(ws, gram_eigenvalues_many(list(ws.values()))))
        for name, w in ws.items():
            eig = eigs[name]
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
        vals = [r[stat] for r in rows.values() if r[stat] is not None and r[stat] == r[stat]]
        return float(np.mean(vals)) if vals else None

    def finish(self) -> list[Column]:
        if self.cache_file is not None and not self.cached:
            try:
                write_json_atomic(self.cache_file, _jsonable(self.per_layer))
            except OSError:
                pass
        cols = []
        for stat, (direction, definition) in self.STATS.items():
            for unit in ("block", "attention", "mlp"):
                vals = []
                for rows in self.per_layer:
                    sel = rows if unit == "block" else {k: r for k, r in rows.items() if r["sublayer"] == unit}
                    vals.append(self._aggregate(sel, stat))
                extra = {"per_matrix": [{k: {s: r[s] for s in self.STATS} for k, r in rows.items()}
                                        for rows in self.per_layer], "cached": self.cached} if unit == "block" else {}
                cols.append(self.column(unit, vals, metric=stat, direction=direction, definition=definition, **extra))
        return cols
