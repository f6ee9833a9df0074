"""Pruners (compress/sparse.py) against independent computations."""
from __future__ import annotations

import pytest
import torch

from layerscope.compress.sparse import (
    prune_magnitude,
    prune_sparsegpt,
    prune_wanda,
    reconstruction_error,
    wanda_score,
)


def _layer(seed=0, out=6, inp=16, tokens=200):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    mix = torch.randn(inp, inp, generator=g)  # correlated inputs: compensation has something to do
    X = torch.randn(tokens, inp, generator=g) @ mix * torch.linspace(0.2, 3, inp)
    return W, X


def _hessian(X, damp=0.01):
    H = 2 * X.double().t() @ X.double() / X.shape[0]
    return H + damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)


def _naive_obs(W, H, mask):
    """Definition of the sequential OBS procedure: column by column, each pruned weight set to 0 and the
    columns to its right re-solved exactly (min (w-w0)ᵀH(w-w0) with the columns up to j fixed)."""
    W0 = W.double()
    out = W0.clone()
    cols = W.shape[1]
    for r in range(W.shape[0]):
        w = W0[r].clone()
        for j in range(cols):
            if not mask[r, j]:
                continue
            w[j] = 0.0
            F, R = slice(0, j + 1), slice(j + 1, cols)
            if j + 1 < cols:
                rhs = H[R, F] @ (w[F] - W0[r, F])
                w[R] = W0[r, R] - torch.linalg.solve(H[R, R], rhs)
        out[r] = w
    return out


def test_sparsegpt_obs_update_equals_naive_column_by_column_solve():
    W, X = _layer()
    H = _hessian(X)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(W.shape, generator=g) < 0.5
    got = prune_sparsegpt(W, H, 0.5, blocksize=8, mask=mask, dtype=torch.float64)  # two lazy blocks
    ref = _naive_obs(W, H, mask)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
    assert torch.all(got[mask] == 0)


def test_sparsegpt_with_a_pruned_prefix_is_the_least_squares_optimum_of_the_kept_weights():
    W, X = _layer(seed=1)
    H = _hessian(X)
    mask = torch.zeros_like(W, dtype=torch.bool)
    mask[:, :5] = True
    got = prune_sparsegpt(W, H, 0.3, mask=mask, dtype=torch.float64).double()
    # direct least squares: min ‖X w_keep - X w0‖ over the kept columns (with the same damping in H)
    K = slice(5, W.shape[1])
    ls = torch.linalg.solve(H[K, K], (H[K, :] @ W.double().t())).t()
    torch.testing.assert_close(got[:, K], ls, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_reconstructs_better_than_wanda_at_equal_sparsity(pattern):
    W, X = _layer(seed=2, out=12, inp=32)
    xtx = X.double().t() @ X.double()
    sg = prune_sparsegpt(W, _hessian(X).float(), 0.5, pattern)
    wd = prune_wanda(W, torch.sqrt(torch.diagonal(xtx)).float(), 0.5, pattern)
    assert (sg == 0).float().mean() == pytest.approx(0.5, abs=0.02)
    assert reconstruction_error(W, sg, xtx) < reconstruction_error(W, wd, xtx)


def test_wanda_score_and_rowwise_mask_match_a_plain_computation():
    W, X = _layer(seed=4)
    norms = torch.sqrt((X ** 2).sum(0))
    score = wanda_score(W, norms)
    plain = torch.stack([torch.stack([abs(W[i, j]) * torch.linalg.norm(X[:, j]) for j in range(W.shape[1])])
                         for i in range(W.shape[0])])
    torch.testing.assert_close(score, plain, rtol=1e-5, atol=1e-6)
    pruned = prune_wanda(W, norms, 0.25)
    for i in range(W.shape[0]):
        drop = set(torch.argsort(plain[i])[:4].tolist())
        assert {j for j in range(W.shape[1]) if pruned[i, j] == 0} == drop


def test_two_four_keeps_two_of_every_four_and_magnitude_is_layerwise():
    W, X = _layer(seed=5)
    p = prune_wanda(W, torch.ones(W.shape[1]), 0.5, "2:4")
    assert torch.all((p.reshape(W.shape[0], -1, 4) != 0).sum(-1) == 2)
    m = prune_magnitude(W, 0.5)
    thresh = W.abs().flatten().sort().values[W.numel() // 2 - 1]
    assert torch.equal(m == 0, W.abs() <= thresh)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_output_tap_kl_equals_full_forward_kl_of_the_changed_model(family):
    """OutputTap's prefix-reused KL(dense ‖ changed) equals the KL of two plain full forwards."""
    import copy

    import torch.nn.functional as F

    from layerscope.compress.blockwise import OutputTap
    from layerscope.model.adapter import find_parts
    from tiny_models import build, sample_inputs

    model = build(family).eval()
    ids = sample_inputs(family, n=3, seq=20)
    parts = find_parts(model)
    tap = OutputTap(parts, ids, batch_size=2)
    changed = copy.deepcopy(model)
    block = find_parts(changed).blocks[1]
    for m in block.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.data = prune_magnitude(m.weight.data, 0.5)

    def kl(a, b):
        with torch.no_grad():
            la = F.log_softmax(a(ids).logits[:, :-1].double(), -1)  # positions that have a next token
            lb = F.log_softmax(b(ids).logits[:, :-1].double(), -1)
        return float((la.exp() * (la - lb)).sum(-1).mean())

    want = kl(model, changed)
    assert want > 1e-6  # the change is visible, so equality below means something
    assert tap.kl_of(find_parts(changed)) == pytest.approx(want, rel=1e-4)
    saved = {n: p.data for n, p in parts.blocks[1].named_parameters()}
    for n, p in parts.blocks[1].named_parameters():  # block 1 changed in place, the rest dense
        p.data = dict(block.named_parameters())[n].data
    assert tap.kl(1) == pytest.approx(want, rel=1e-4)
    for n, p in parts.blocks[1].named_parameters():
        p.data = saved[n]
    assert tap.kl(1) == pytest.approx(0.0, abs=1e-9)
