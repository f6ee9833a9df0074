"""The statistics pass (engine/moments.py) against plain forward hooks on the full model."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from layerscope.engine.moments import LinearStats, linear_moments
from layerscope.model.adapter import find_parts
from tiny_models import build, sample_inputs


def _reference_xtx(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σ x xᵀ of every nn.Linear input from ordinary hooks on one full forward (float64)."""
    out: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            def hook(_m, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                out[name] = out.get(name, 0) + x.t() @ x
            handles.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    for h in handles:
        h.remove()
    return out


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_moments_match_plain_hooks_on_full_model(family):
    model = build(family)
    ids = sample_inputs(family, n=6, seq=16)
    ref = _reference_xtx(model, ids)
    parts = find_parts(model)
    got: dict[str, LinearStats] = {}

    def on_block(i, block, stats):
        assert block is parts.blocks[i]
        for n, st in stats.items():
            got[f"{parts.blocks_path}.{i}.{n}"] = st

    linear_moments(parts, ids, on_block=on_block, sequential=True, batch_size=4)
    block_refs = {k: v for k, v in ref.items() if k.startswith(parts.blocks_path + ".")}
    assert set(got) == set(block_refs)
    for k, st in got.items():
        assert st.tokens == ids.numel()
        assert st.xtx.dtype == torch.float64
        torch.testing.assert_close(st.xtx, block_refs[k], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(st.col_norms(), torch.sqrt(torch.diagonal(block_refs[k])).float())
        h = st.hessian(0.01)
        plain = 2 * block_refs[k] / ids.numel()
        plain = plain + 0.01 * torch.diagonal(plain).mean() * torch.eye(plain.shape[0], dtype=plain.dtype)
        torch.testing.assert_close(h, plain.float(), rtol=1e-4, atol=1e-4)


def _zero_first_mlp_row(block):
    with torch.no_grad():
        block.mlp.down_proj.weight.mul_(0.5)


def test_sequential_stats_see_the_changed_prefix_and_non_sequential_the_original():
    """sequential=True: block i+1's XᵀX equals plain hooks on the model whose blocks 0..i were changed;
    sequential=False: equals plain hooks on the original model."""
    model = build("llama")
    ids = sample_inputs("llama", n=4, seq=12)
    changed = copy.deepcopy(model)
    for b in find_parts(changed).blocks:
        _zero_first_mlp_row(b)
    ref_orig, ref_changed = _reference_xtx(model, ids), _reference_xtx(changed, ids)
    for sequential, ref in ((True, ref_changed), (False, ref_orig)):
        m = copy.deepcopy(model)
        parts = find_parts(m)
        got = {}

        def on_block(i, block, stats):
            for n, st in stats.items():
                got[f"{parts.blocks_path}.{i}.{n}"] = st.xtx.clone()
            _zero_first_mlp_row(block)

        linear_moments(parts, ids, on_block=on_block, sequential=sequential)
        for k, v in got.items():
            torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-3)
        # block 1's inputs differ between the two models, so the check is not vacuous
        k = f"{parts.blocks_path}.1.self_attn.q_proj"
        assert not torch.allclose(ref_orig[k], ref_changed[k], rtol=1e-3)


def test_select_limits_the_watched_linears():
    model = build("llama")
    parts = find_parts(model)
    seen = set()
    linear_moments(parts, sample_inputs("llama", n=2, seq=8),
                   on_block=lambda i, b, s: seen.update(s), select=lambda n, m: n.endswith("down_proj"))
    assert seen == {"mlp.down_proj"}


def test_token_weighted_moments_match_plain_hooks_and_reject_missing_weights():
    """token_weights: Σ_t a_t x_t x_tᵀ per linear, with one weight per token of each batch in batch order."""
    from layerscope.errors import LayerscopeError
    from layerscope.engine.runner import make_batches

    model = build("llama")
    parts = find_parts(model)
    ids = sample_inputs("llama", n=6, seq=16)
    batches, _ = make_batches(ids, 4)  # batches of 4 and 2 sequences
    g = torch.Generator().manual_seed(0)
    names = [f"{parts.blocks_path}.{i}.{n}" for i in range(parts.num_layers) for n in parts.block_linears(i)]
    weights = {n: [torch.rand(int(b["input_ids"].numel()), generator=g) for b in batches] for n in names}
    xs: dict[str, list[torch.Tensor]] = {}
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_pre_hook(
        lambda _m, a, n=n: xs.setdefault(n, []).append(a[0].detach().reshape(-1, a[0].shape[-1]).double()))
        for n in names]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    got = {}
    linear_moments(parts, batches, on_block=lambda i, _b, s: got.update(
        {f"{parts.blocks_path}.{i}.{n}": st for n, st in s.items()}), sequential=False, token_weights=weights)
    for n in names:
        X = torch.cat(xs[n])
        a = torch.cat(weights[n]).double()
        torch.testing.assert_close(got[n].wxtx, (X * a[:, None]).T @ X, rtol=1e-4, atol=1e-4)
        assert got[n].calls == len(batches)
    short = {n: w[:1] for n, w in weights.items()}
    with pytest.raises(LayerscopeError, match="more batches than token weights"):
        linear_moments(parts, batches, on_block=lambda *a: None, sequential=False, token_weights=short)
