"""Low-rank factorization (compress/lowrank.py) against independent computations."""
from __future__ import annotations

import pytest
import torch

from layerscope.compress.lowrank import factorize, relative_output_error, rank_for_keep, factor_params


def _layer(seed=0, out=12, inp=10, tokens=300):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    X = torch.randn(tokens, inp, generator=g, dtype=torch.float64) @ torch.randn(inp, inp, generator=g, dtype=torch.float64)
    return W, X


def test_whitened_truncation_loss_equals_the_dropped_singular_values_and_is_optimal():
    W, X = _layer()
    xtx = X.t() @ X
    f = factorize(W, "whitened", xtx, damp=0.0)
    for r in (2, 5, 8):
        approx = f.weight(r)
        err = float(((W - approx) @ X.t()).pow(2).sum())  # ‖(W − Ŵ)X‖² from the data
        assert err == pytest.approx(float((f.S[r:] ** 2).sum()), rel=1e-6)
        # Eckart–Young in the data space: the best rank-r approximation of the outputs W Xᵀ
        U, S, Vh = torch.linalg.svd(W @ X.t(), full_matrices=False)
        assert err == pytest.approx(float((S[r:] ** 2).sum()), rel=1e-6)
        assert relative_output_error(W, approx, xtx) == pytest.approx(err / float((W @ X.t()).pow(2).sum()), rel=1e-9)


def test_whitened_beats_plain_svd_on_the_outputs_and_svd_is_eckart_young_on_weights():
    W, X = _layer(seed=1)
    xtx = X.t() @ X
    fw, fs = factorize(W, "whitened", xtx), factorize(W, "svd")
    U, S, Vh = torch.linalg.svd(W)
    torch.testing.assert_close(fs.weight(3), (U[:, :3] * S[:3]) @ Vh[:3])
    assert relative_output_error(W, fw.weight(3), xtx) < relative_output_error(W, fs.weight(3), xtx)


def test_factors_shapes_and_parameter_count():
    W, X = _layer()
    a, b = factorize(W, "svd").factors(4)
    assert a.shape == (4, 10) and b.shape == (12, 4)
    r = rank_for_keep((12, 10), 0.5)
    assert factor_params((12, 10), r) <= 0.5 * 120 < factor_params((12, 10), r + 1)
