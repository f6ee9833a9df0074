"""Every scan metric against an independent computation from an ordinary full forward pass."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from layerscope.model.adapter import find_parts
from layerscope.metrics.weights import (effective_rank, gram_eigenvalues, gram_eigenvalues_many, outlier_share,
                                       power_law_alpha, stable_rank)
from layerscope.metrics.scan import scan
from tiny_models import DECODERS, FAMILIES, build, sample_inputs


def full_pass(model, data, eager: bool = False):
    """Block inputs/outputs and sublayer tensors from hooks on a plain model forward."""
    parts = find_parts(model)
    rec = {"in": {}, "out": {}, "mid": {}, "act": {}, "probs": {}}
    handles = []
    for i, b in enumerate(parts.blocks):
        handles.append(b.register_forward_pre_hook(
            lambda m, a, k, i=i: rec["in"].__setitem__(i, (a[0] if a else k["hidden_states"]).detach()), with_kwargs=True))
        handles.append(b.register_forward_hook(
            lambda m, a, o, i=i: rec["out"].__setitem__(i, (o[0] if isinstance(o, tuple) else o).detach())))
        if parts.mid[i] is not None and parts.mid[i][0] == "input":
            handles.append(parts.mid[i][1].register_forward_pre_hook(
                lambda m, a, i=i: rec["mid"].__setitem__(i, a[0].detach())))
        if parts.mlp_down_proj[i] is not None:
            handles.append(parts.mlp_down_proj[i].register_forward_pre_hook(
                lambda m, a, i=i: rec["act"].__setitem__(i, a[0].detach())))
        handles.append(parts.attention[i].register_forward_hook(
            lambda m, a, o, i=i: rec["probs"].__setitem__(i, o[1].detach() if isinstance(o, tuple) and len(o) > 1
                                                           and isinstance(o[1], torch.Tensor) else None)))
    impl = model.config._attn_implementation
    try:
        if eager:
            model.config._attn_implementation = "eager"
        with torch.no_grad():
            if isinstance(data, dict):
                logits = model(**data)
            else:
                logits = model(input_ids=data, attention_mask=torch.ones_like(data))
    finally:
        model.config._attn_implementation = impl
        for h in handles:
            h.remove()
    return parts, rec, getattr(logits, "logits", None)


def mean_1mcos(a, b):
    return float((1 - F.cosine_similarity(a.double(), b.double(), dim=-1)).mean())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_block_influence_matches_forward_hooks(family):
    """BI from the block-sequential engine == 1 - cos from hooks on a plain forward, every block (last included)."""
    model = build(family)
    data = sample_inputs(family, n=4, seq=20)
    table = scan(model, data, ["block_influence"], batch_size=3, attn_seqs=0)
    _, rec, _ = full_pass(model, data)
    L = find_parts(model).num_layers
    expected = [mean_1mcos(rec["in"][i], rec["out"][i]) for i in range(L)]
    np.testing.assert_allclose(table.values("block_influence"), expected, rtol=0, atol=1e-5)
    assert len(expected) == L and all(e > 1e-4 for e in expected)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2", "opt", "falcon_sequential"])
def test_sublayer_influence_and_contribution(family):
    model = build(family)
    data = sample_inputs(family)
    table = scan(model, data, ["block_influence", "relative_contribution"], attn_seqs=0)
    parts, rec, _ = full_pass(model, data)
    for i in range(parts.num_layers):
        h, mid, out = rec["in"][i], rec["mid"][i].reshape(rec["in"][i].shape), rec["out"][i]
        assert table.values("block_influence", "attention")[i] == pytest.approx(mean_1mcos(h, mid), abs=1e-6)
        assert table.values("block_influence", "mlp")[i] == pytest.approx(mean_1mcos(mid, out), abs=1e-6)
        rc = float(((mid - h).double().norm(dim=-1) / h.double().norm(dim=-1)).mean())
        assert table.values("relative_contribution", "attention")[i] == pytest.approx(rc, rel=1e-6)


def test_parallel_block_sublayers_sum_to_block_change():
    """GPT-NeoX parallel residual: attention and MLP contributions are read separately and add up."""
    model = build("gpt_neox")
    parts = find_parts(model)
    assert parts.parallel
    data = sample_inputs("gpt_neox")
    table = scan(model, data, ["relative_contribution"], attn_seqs=0)
    got = {"attention": {}, "mlp": {}}
    hooks = [m.register_forward_hook(lambda mod, a, o, i=i, u=u: got[u].__setitem__(i, o[0] if isinstance(o, tuple) else o))
             for u, mods in (("attention", parts.attention), ("mlp", parts.mlp)) for i, m in enumerate(mods)]
    try:
        _, rec, _ = full_pass(model, data)
    finally:
        for h in hooks:
            h.remove()
    for i in range(parts.num_layers):
        h, out = rec["in"][i].double(), rec["out"][i].double()
        a, m = got["attention"][i].double(), got["mlp"][i].double()
        torch.testing.assert_close(a + m, out - h, rtol=1e-5, atol=1e-5)  # the two contributions add up
        for unit, delta in (("attention", a), ("mlp", m)):
            rc = float((delta.norm(dim=-1) / h.norm(dim=-1)).mean())
            assert table.values("relative_contribution", unit)[i] == pytest.approx(rc, rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_engine_reproduces_full_forward(family):
    """Block-by-block execution over captured inputs gives exactly the plain forward's block outputs,
    also for Gemma-3's mixed sliding/global layers (per-block masks and rotary embeddings) with
    sequences longer than the sliding window."""
    model = build(family)
    data = sample_inputs(family, n=3, seq=32)
    _, rec, _ = full_pass(model, data)
    table = scan(model, data, ["hidden_growth"], attn_seqs=0, batch_size=2)
    L = find_parts(model).num_layers
    expected = [float(rec["out"][i].double().norm(dim=-1).mean()) for i in range(L)]
    np.testing.assert_allclose(table.values("hidden_norm"), expected, rtol=1e-5)


def test_angular_distance():
    model = build("llama")
    data = sample_inputs("llama")
    table = scan(model, data, ["angular_distance"], attn_seqs=0)
    _, rec, _ = full_pass(model, data)
    L = 4
    states = [rec["in"][i] for i in range(L)] + [rec["out"][L - 1]]
    for n in (1, 2, 4):
        got = table.values(f"angular_distance_n{n}")
        for l in range(L):
            if l + n > L:
                assert math.isnan(got[l])
            else:
                cos = F.cosine_similarity(states[l].double(), states[l + n].double(), dim=-1).clamp(-1, 1)
                assert got[l] == pytest.approx(float((torch.arccos(cos) / math.pi).mean()), abs=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_logit_lens_against_model_logits(family):
    """Lens through the model's own final norm + head: the last layer reproduces the model's logits
    (KL 0, top-1 agreement 1); every layer matches a direct computation on all positions."""
    model = build(family)
    data = sample_inputs(family, n=2, seq=16)
    table = scan(model, data, ["logit_lens"], lens_tokens=10_000, attn_seqs=0)  # all positions
    parts, rec, logits = full_pass(model, data)
    final = F.log_softmax(logits.float(), -1).reshape(-1, logits.shape[-1])
    kl = table.values("logit_lens_kl")
    top1 = table.values("logit_lens_top1")
    for i in range(parts.num_layers):
        lens = model.lm_head(parts.final_norm(rec["out"][i])).float()
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            lens = torch.tanh(lens / cap) * cap
        lp = F.log_softmax(lens, -1).reshape(-1, logits.shape[-1])
        assert kl[i] == pytest.approx(float((final.exp() * (final - lp)).sum(-1).mean()), abs=1e-5)
        assert top1[i] == pytest.approx(float((lp.argmax(-1) == final.argmax(-1)).float().mean()))
    assert kl[-1] == pytest.approx(0.0, abs=1e-6) and top1[-1] == 1.0
    drop = table.values("logit_lens_kl_drop")
    assert drop[1:] == pytest.approx(kl[:-1] - kl[1:], abs=1e-6)


def test_logit_lens_subsample_is_recorded():
    model = build("llama")
    table = scan(model, sample_inputs("llama", n=4, seq=32), ["logit_lens"], lens_tokens=20, attn_seqs=0)
    col = table.column("logit_lens_kl")
    assert 16 <= col.details["sampled_tokens"] <= 24 and "subsample" in col.details["note"]


def test_massive_activations_and_sparsity():
    model = build("llama")
    data = sample_inputs("llama", n=2)
    table = scan(model, data, ["massive_activations", "mlp_sparsity"], batch_size=2, attn_seqs=0)
    _, rec, _ = full_pass(model, data)
    col = table.column("massive_activations")
    for i in range(4):
        a = rec["out"][i].abs()
        assert col.values[i] == pytest.approx(float(a.max() / a.median()), rel=1e-5)
        assert col.details["per_layer"][i]["dim"] == int(a.reshape(-1, a.shape[-1]).max(0).values.argmax())
        act = rec["act"][i].abs()
        sparse = float((act < 0.01 * act.amax(-1, keepdim=True)).float().mean())
        assert table.values("mlp_sparsity", "mlp")[i] == pytest.approx(sparse, abs=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_attention_head_statistics(family):
    """Entropy and sink mass from the eager sequences equal those from output attention probabilities."""
    model = build(family)
    data = sample_inputs(family, n=3, seq=12)
    table = scan(model, data, ["attention_heads"], attn_seqs=2, batch_size=2)
    parts, rec, _ = full_pass(model, data[:2], eager=True)
    q0 = 1 if parts.causal else 0
    for i in range(parts.num_layers):
        p = rec["probs"][i].double()[:, :, q0:, :]
        ent = (-(p * torch.log(p.clamp_min(1e-30))).sum(-1)).mean(dim=(0, 2))
        np.testing.assert_allclose(table.values("attention_entropy", "head")[i], ent.numpy(), rtol=1e-6)
        np.testing.assert_allclose(table.values("sink_mass", "head")[i], p[..., 0].mean(dim=(0, 2)).numpy(), rtol=1e-6)
    assert table.values("dormant_head", "head").shape == (parts.num_layers, 4)


def test_dormant_head_flag():
    """A head that attends only to the first token and writes nothing is flagged dormant."""
    model = build("llama")
    attn = model.model.layers[1].self_attn
    with torch.no_grad():
        attn.q_proj.weight[:8].zero_()  # head 0: uniform scores...
        attn.o_proj.weight[:, :8].zero_()
        attn.v_proj.weight[:8].zero_()  # ...and a zero value (kv head 0 is shared by heads 0 and 1)
    table = scan(model, sample_inputs("llama", n=2, seq=6), ["attention_heads"], attn_seqs=2)
    norms = table.values("head_output_norm", "head")[1]
    assert norms[0] == pytest.approx(0.0, abs=1e-6)
    sink = table.values("sink_mass", "head")[1]
    flags = table.values("dormant_head", "head")[1]
    # Uniform attention over 6 tokens puts ~0.41 (mean over queries 1..5) on the first one: below the
    # 0.7 sink threshold, so the silent head is not flagged yet.
    assert sink[0] == pytest.approx(np.mean([1 / n for n in range(2, 7)]), rel=1e-5) and flags[0] == 0.0
    # A head that attends only to the first token and writes nothing *is* flagged; a busy one is not.
    from layerscope.metrics.base import BlockObservation, ScanContext
    from layerscope.metrics.heads import AttentionHeads

    m = AttentionHeads()
    m.begin(ScanContext(parts=find_parts(model), runner=None, num_layers=4, num_heads=4, n_tokens=6))
    probs = torch.softmax(torch.randn(1, 4, 6, 6), -1)
    probs[:, 0] = 0.0
    probs[:, 0, :, 0] = 1.0  # head 0: all attention on the first token
    head_out = torch.randn(1, 6, 4, 8)
    head_out[:, :, 0] = 0.0  # head 0 writes nothing
    for i in range(4):
        m.observe(BlockObservation(index=i, batch_index=0, h_in=torch.zeros(1, 6, 32), h_out=torch.zeros(1, 6, 32),
                                   attn_probs=probs, head_out=head_out))
    cols = {c.name: c for c in m.finish()}
    assert [row[0] for row in cols["dormant_head@head"].values] == [1.0] * 4
    assert all(row[1:] == [0.0, 0.0, 0.0] for row in cols["dormant_head@head"].values)
    assert cols["dormant_share@attention"].values == [0.25] * 4


def test_weight_statistics_against_svd():
    torch.manual_seed(0)
    w = torch.randn(40, 24)
    s = torch.linalg.svdvals(w.double()).numpy()
    eig = gram_eigenvalues(w)
    # float32 Gram + eigensolver: eigenvalues to ~1e-6 of the largest, statistics to ~1e-5
    np.testing.assert_allclose(np.sort(eig), np.sort(s ** 2), rtol=1e-4, atol=1e-6 * (s ** 2).max())
    assert stable_rank(eig) == pytest.approx((s ** 2).sum() / (s ** 2).max(), rel=1e-5)
    p = s / s.sum()
    assert effective_rank(eig) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-5)
    # batched by Gram size, in any order and orientation: the same spectra as one at a time
    many = gram_eigenvalues_many([w, w.T, torch.randn(7, 24), w[:10]])
    np.testing.assert_allclose(many[0], eig)
    np.testing.assert_allclose(many[1], eig, rtol=1e-5, atol=1e-6 * eig.max())
    np.testing.assert_allclose(many[3], gram_eigenvalues(w[:10]))
    z = np.abs((w.double().numpy() - w.double().numpy().mean()) / w.double().numpy().std(ddof=1))
    assert outlier_share(w) == pytest.approx(float((z > 1).mean()))


def test_power_law_alpha_recovers_known_exponent():
    rng = np.random.default_rng(0)
    alpha = 3.0
    sample = (1 - rng.random(4000)) ** (-1 / (alpha - 1))  # Pareto with density ~ x^-alpha, x >= 1
    assert power_law_alpha(sample) == pytest.approx(alpha, abs=0.2)


def test_weight_metrics_need_no_data():
    model = build("llama")
    table = scan(model, None, ["weights"])
    assert table.provenance.calibration_tokens == 0
    parts = find_parts(model)
    w = parts.blocks[2].mlp.down_proj.weight
    per = table.column("stable_rank").details["per_matrix"][2]["mlp.down_proj"]["stable_rank"]
    s = torch.linalg.svdvals(w.double())
    assert per == pytest.approx(float((s ** 2).sum() / s.max() ** 2) / min(w.shape))


@pytest.mark.parametrize("family", DECODERS)
def test_every_decoder_family_full_default_scan(family):
    model = build(family)
    table = scan(model, sample_inputs(family, n=3, seq=16), None, batch_size=2)
    L = find_parts(model).num_layers
    assert table.provenance.skipped == {}
    for name, col in table.columns.items():
        assert len(col.values) == L, name
    assert np.isfinite(table.values("block_influence")).all()
    assert table.values("logit_lens_kl")[-1] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("family", ["bert", "roberta", "vit"])
def test_encoders_scan_without_lens(family):
    model = build(family)
    table = scan(model, sample_inputs(family, n=3, seq=16), None, batch_size=2)
    assert "logit_lens" in table.provenance.skipped
    assert np.isfinite(table.values("block_influence")).all()
    assert np.isfinite(table.values("attention_entropy", "head")).all()
