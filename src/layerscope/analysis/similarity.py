"""Layer similarity: linear CKA between every pair of residual-stream layers.

Linear centred kernel alignment (Kornblith et al. 2019, "Similarity of Neural Network
Representations Revisited"):  for token representations X [n, d1] and Y [n, d2] with centred
columns,  CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F).  It is 1 for identical
representations and invariant to orthogonal transforms and isotropic scaling of either.

Computed on calibration tokens (Wikipedia calibration split by default) through the Gram matrices
K = X X^T (cheaper than the feature-space form when the model is wider than ~n/L).  The first
position of every window is left out by default: decoder models park an outsized "attention
sink" activation there that would dominate every layer's Gram matrix.  For the same reason the
main matrix also leaves out the few tokens whose residual norm exceeds `outlier_ratio` (default 5)
times the layer's median at any layer ("massive activations", Sun et al. 2024): in SmolLM2 about
1.4% of tokens, which otherwise make layers 3-8 look identical (CKA 0.99+) and layer 2->3 look
unrelated (0.31).  The matrix over all tokens is kept beside it (`matrix_all_tokens`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from layerscope.errors import LayerscopeError


def linear_cka(X: Any, Y: Any) -> float:
    """Linear CKA between two representations of the same n examples ([n, d1], [n, d2])."""
    X = torch.as_tensor(np.asarray(X), dtype=torch.float64)
    Y = torch.as_tensor(np.asarray(Y), dtype=torch.float64)
    if X.dim() != 2 or Y.dim() != 2 or X.shape[0] != Y.shape[0]:
        raise LayerscopeError(f"CKA needs two [n, d] matrices with the same n, got {tuple(X.shape)} and {tuple(Y.shape)}")
    X = X - X.mean(0)
    Y = Y - Y.mean(0)
    num = (Y.T @ X).pow(2).sum()
    den = (X.T @ X).norm() * (Y.T @ Y).norm()
    return float(num / den) if den > 0 else float("nan")


@torch.no_grad()
def cka_matrix(states: Sequence[Any], chunk: int = 1 << 20) -> np.ndarray:
    """All-pairs linear CKA of a list of [n, d_i] representations, as an [m, m] float64 array."""
    if not states:
        raise LayerscopeError("no representations to compare")
    n = int(np.asarray(states[0]).shape[0]) if not isinstance(states[0], torch.Tensor) else states[0].shape[0]
    if n < 2:
        raise LayerscopeError("CKA needs at least two examples")
    m = len(states)
    flat = torch.empty((m, n * n), dtype=torch.float32)
    valid = np.ones(m, dtype=bool)
    for i, s in enumerate(states):
        X = torch.as_tensor(np.asarray(s) if not isinstance(s, torch.Tensor) else s).to(torch.float64)
        if X.shape[0] != n:
            raise LayerscopeError("all representations must cover the same examples")
        X = X - X.mean(0)
        K = X @ X.T
        nrm = K.norm()
        if not torch.isfinite(nrm) or nrm == 0:
            valid[i] = False
            flat[i] = 0
            continue
        flat[i] = (K / nrm).reshape(-1).to(torch.float32)
        del K, X
    G = torch.zeros((m, m), dtype=torch.float64)
    for s in range(0, n * n, chunk):
        c = flat[:, s:s + chunk].to(torch.float64)
        G += c @ c.T
    out = G.numpy()
    out[~valid, :] = np.nan
    out[:, ~valid] = np.nan
    d = np.arange(m)[valid]
    out[d, d] = 1.0
    return out


@dataclass
class SimilarityResult:
    matrix: np.ndarray  # [L+1, L+1]
    layer_names: list[str]
    n_tokens: int
    source: str
    skip_first: bool
    model_id: str = ""
    notes: list[str] = field(default_factory=list)
    matrix_all_tokens: np.ndarray | None = None
    outlier_ratio: float | None = None
    n_outliers: int = 0

    def to_dict(self) -> dict:
        def rows(mat: np.ndarray) -> list:
            return [[None if not math.isfinite(v) else round(float(v), 6) for v in row] for row in mat]

        m = rows(self.matrix)
        adj = [float(self.matrix[i, i + 1]) for i in range(len(self.matrix) - 1)]
        return {
            "metric": "linear CKA (Kornblith et al. 2019)",
            "model_id": self.model_id,
            "layer_names": self.layer_names,
            "matrix": m,
            "adjacent": [round(v, 6) for v in adj],
            "n_tokens": self.n_tokens,
            "source": self.source,
            "first_position_excluded": self.skip_first,
            "outlier_ratio": self.outlier_ratio,
            "outlier_tokens_excluded": self.n_outliers,
            "matrix_all_tokens": rows(self.matrix_all_tokens) if self.matrix_all_tokens is not None else None,
            "notes": self.notes,
        }


@torch.no_grad()
def layer_similarity(model: Any = None, data: Any = "wikipedia", *, tokens: int = 2048, seq_len: int = 128,
                     seed: int = 0, skip_first: bool = True, split: str = "calibration",
                     outlier_ratio: float | None = 5.0, tokenizer: Any = None,
                     batch_size: int = 8) -> SimilarityResult:
    """Linear CKA between all pairs of layers 0..L on calibration tokens (see the module docstring)."""
    from layerscope.data.windows import prepare_tokens
    from layerscope.engine.runner import BlockRunner
    from layerscope.model.subject import Subject, layer_names, load_subject, max_context

    subject = model if isinstance(model, Subject) else load_subject(model, tokenizer)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 8:
        raise LayerscopeError(f"CKA needs at least 8 tokens, got {tokens!r}")
    ctx = max_context(subject.model)
    if ctx:
        seq_len = min(seq_len, ctx)
    per_window = seq_len - 1 if skip_first else seq_len
    n_windows = max(1, math.ceil(tokens / per_window))
    ids, source = prepare_tokens(subject.tokenizer, data, n_windows * seq_len, seq_len, split)
    L = subject.num_layers
    states: list[list[torch.Tensor]] = [[] for _ in range(L + 1)]
    start = 1 if skip_first and ids.shape[1] > 1 else 0
    def grab(layer: int, b: int, h: torch.Tensor) -> None:
        states[layer].append(h[:, start:].reshape(-1, h.shape[-1]).float().cpu())

    runner = BlockRunner(subject.parts, [])
    runner.stream(grab, inputs=({"input_ids": x, "attention_mask": torch.ones_like(x)}
                                for x in ids.split(batch_size)))
    mats = [torch.cat(x)[:tokens] for x in states]
    n = int(mats[0].shape[0])
    full = cka_matrix(mats)
    matrix, n_out, notes = full, 0, []
    if outlier_ratio:
        norms = torch.stack([m.norm(dim=-1) for m in mats])  # [L+1, n]
        ratio = (norms / norms.median(dim=1, keepdim=True).values.clamp_min(1e-12)).max(0).values
        keep = ratio <= outlier_ratio
        n_out = int((~keep).sum())
        if n_out and int(keep.sum()) >= 2:
            matrix = cka_matrix([m[keep] for m in mats])
            notes.append(f"{n_out} of {n} tokens with a residual norm above {outlier_ratio:g}x the layer median "
                         "(massive activations) are left out of the main matrix; matrix_all_tokens keeps them")
    return SimilarityResult(matrix=matrix, layer_names=layer_names(L), n_tokens=n, source=str(source),
                            skip_first=bool(start), model_id=subject.model_id, notes=notes,
                            matrix_all_tokens=full, outlier_ratio=outlier_ratio, n_outliers=n_out)


# =========================================================================== HTML


