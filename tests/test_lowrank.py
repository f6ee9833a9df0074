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


def test_fisher_loss_curve_equals_the_gradient_weighted_output_error_of_each_layer():
    """actions.lowrank.loss_curves(loss="fisher") against autograd and hooks on the plain model:
    ½ Σ_j F_j (E M Eᵀ)_jj with F_j the mean squared NLL gradient at output j, M = XᵀX / tokens."""
    import torch.nn.functional as F

    from layerscope.actions.lowrank import _rank, loss_curves
    from layerscope.model.adapter import find_parts
    from tiny_models import build, sample_inputs

    model = build("llama").eval()
    parts = find_parts(model)
    ids = sample_inputs("llama", n=4, seq=16)
    keeps = [0.25, 0.5, 1.0]
    curves = loss_curves(parts, ids, "whitened", 1e-4, keeps, loss="fisher")

    name = f"{parts.blocks_path}.1.mlp.down_proj"
    mod = dict(model.named_modules())[name]
    seen = {}
    h1 = mod.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))

    def keep_output(m, a, out):
        out.retain_grad()
        seen["y"] = out

    h2 = mod.register_forward_hook(keep_output)
    logits = model(ids).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1),
                          reduction="sum")
    nll.backward()
    h1.remove(), h2.remove()
    g = seen["y"].grad.reshape(-1, mod.weight.shape[0]).double()
    x = seen["x"].reshape(-1, mod.weight.shape[1]).double()
    fisher = (g ** 2).mean(0)
    M = x.t() @ x / x.shape[0]
    W = mod.weight.detach().double()
    f = factorize(W, "whitened", x.t() @ x, 1e-4)
    for k, got in zip(keeps, curves[name]):
        if k >= 1:
            assert got == 0.0
            continue
        E = W - f.weight(_rank(W.shape, k)).double()
        want = 0.5 * float((fisher * torch.diagonal(E @ M @ E.t())).sum())
        assert want > 0 and got == pytest.approx(want, rel=1e-3)
    assert curves[name][0] > curves[name][1]  # keeping less loses more
