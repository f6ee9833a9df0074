"""Ground truth scorers (ablation, gradients, relevance) and the agreement analysis.

Each scorer is checked against an independent computation on tiny random models: prefix-reuse
ablation against naive reruns of the whole model, Taylor / Fisher against torch.autograd.grad,
gradient x activation against forward hooks with retain_grad on a full-model backward.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from conftest import requires_smollm2
from tiny_models import build, sample_inputs
from layerscope.model.adapter import find_parts
from layerscope.analysis.agreement import analyse
from layerscope.analysis.agreement_stats import correlate, oriented, topk_overlap
from layerscope.engine.runner import BlockRunner, make_batches
from layerscope.errors import LayerscopeError
from layerscope.metrics.ground_truth.ablation import leave_one_out
from layerscope.metrics.ground_truth.gradients import gradient_statistics, unit_parameters
from layerscope.metrics.ground_truth.relevance import relevance_statistics
from layerscope.metrics import DEFAULT_METRICS, METRICS
from layerscope.metrics.scan import scan
from layerscope.metrics.table import Provenance, ScoreColumn, ScoreTable

FAMS = ["llama", "gpt2"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a loaded machine two threads are ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _runner(model, ids, batch_size=2):
    parts = find_parts(model)
    batches, _ = make_batches(ids, batch_size)
    r = BlockRunner(parts, batches)
    r.capture()
    return r


def _logits(model, ids):
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits


def _kl_nll(full, changed, ids):
    """Independent scoring: kl_div on log-probabilities, cross_entropy for the NLL (sums, counts)."""
    lp, lq = F.log_softmax(full[:, :-1].float(), -1), F.log_softmax(changed[:, :-1].float(), -1)
    kl = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1).double().sum()
    nll = F.cross_entropy(changed[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum").double()
    return float(kl), float(nll)


# --------------------------------------------------------------------------- ablation
@pytest.mark.parametrize("family", FAMS)
@torch.no_grad()
def test_prefix_reuse_ablation_equals_naive_rerun(family):
    model = build(family)
    parts = find_parts(model)
    L = parts.num_layers
    ids = sample_inputs(family, n=4, seq=20)
    res = leave_one_out(_runner(model, ids))
    parent_path, _, attr = parts.blocks_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    original = getattr(parent, attr)
    kl = {u: np.zeros(L) for u in ("block", "attention", "mlp")}
    nll = {u: np.zeros(L) for u in kl}
    base = 0.0
    for s in range(0, 4, 2):
        x = ids[s:s + 2]
        full = _logits(model, x)
        base += _kl_nll(full, full, x)[1]
        for i in range(L):
            setattr(parent, attr, nn.ModuleList([b for j, b in enumerate(original) if j != i]))  # block physically gone
            try:
                k, n = _kl_nll(full, _logits(model, x), x)
            finally:
                setattr(parent, attr, original)
            kl["block"][i] += k
            nll["block"][i] += n
            for unit, mod in (("attention", parts.attention[i]), ("mlp", parts.mlp[i])):
                h = mod.register_forward_hook(
                    lambda m, a, o: (torch.zeros_like(o[0]),) + tuple(o[1:]) if isinstance(o, tuple) else torch.zeros_like(o))
                try:
                    k, n = _kl_nll(full, _logits(model, x), x)
                finally:
                    h.remove()
                kl[unit][i] += k
                nll[unit][i] += n
    N = 4 * 19
    assert res.positions == N
    np.testing.assert_allclose(res.base_nll, base / N, rtol=1e-6)
    for u in kl:
        # both sides round logits in float32 (the vocabulary-bounded scorer sums p.z as x.(W^T p), the
        # reference here takes log_softmax differences): they agree to ~1e-7 nats per position
        np.testing.assert_allclose(res.kl(u), kl[u] / N, rtol=1e-5, atol=2e-7)
        np.testing.assert_allclose(res.nll(u), nll[u] / N, rtol=1e-6)
        # a difference of two NLLs of ~5 nats: its absolute precision is that of fp32 log-softmax
        np.testing.assert_allclose(res.dloss(u), nll[u] / N - base / N, rtol=1e-5, atol=2e-6)
        assert min(res.kl(u)) > 0
    # prefix reuse: L + L(L-1)/2 + 2 * L(L+1)/2 block evaluations per batch, naive reruns L + L(L-1) + 2 * L^2
    assert res.block_evaluations == 2 * (L + L * (L - 1) // 2 + L * (L + 1))
    assert res.naive_block_evaluations == 2 * (L + L * (L - 1) + 2 * L * L)


def test_ablation_metric_columns_and_greedy():
    model = build("llama")
    ids = sample_inputs("llama", n=4, seq=16)
    t = scan(model, ids, "ablation", batch_size=2,
             options={"ablation_data": "calibration", "ablation_greedy": 2, "ablation_units": "block"})
    assert set(t.columns) == {"ablation_kl", "ablation_dloss", "ablation_dppl"}
    kl = t.values("ablation_kl")
    g = t.columns["ablation_kl"].details["greedy"]
    assert g["order"][0] == int(np.argmin(kl)) and len(g["order"]) == 2 and len(set(g["order"])) == 2
    assert g["curve"][0]["kl"] == pytest.approx(kl.min(), rel=1e-6)
    assert t.columns["ablation_kl"].details["data"].startswith("the scan's calibration batches")
    # held-out text needs a tokenizer: asked for explicitly, a clear error; by default the calibration
    # batches, and the details say so
    with pytest.raises(LayerscopeError, match="tokenizer"):
        scan(model, ids, "ablation", batch_size=2, options={"ablation_data": "evaluation"})
    t2 = scan(model, ids, "ablation", batch_size=2)
    assert t2.columns["ablation_kl"].details["data"].endswith("(no tokenizer for held-out text)")
    np.testing.assert_allclose(t2.values("ablation_kl"), kl, rtol=1e-6)


# --------------------------------------------------------------------------- gradients
def test_taylor_fisher_match_autograd():
    model = build("llama")
    parts = find_parts(model)
    ids = sample_inputs("llama", n=4, seq=16)
    s = gradient_statistics(parts, ids, micro_batch=2)
    assert all(p.grad is None for p in model.parameters())

    def loss(x):
        lg = _logits(model, x)
        return F.cross_entropy(lg[:, :-1].flatten(0, 1), x[:, 1:].flatten())

    groups = [unit_parameters(parts, i) for i in range(parts.num_layers)]
    flat = [p for g in groups for p in (q for _, q in g["block"])]
    g_all = dict(zip(map(id, flat), torch.autograd.grad(loss(ids), flat)))
    g_mb = [dict(zip(map(id, flat), torch.autograd.grad(loss(ids[k:k + 2]), flat))) for k in (0, 2)]
    for i, g in enumerate(groups):
        for u, named in g.items():
            ps = [p for _, p in named]
            taylor = abs(sum(float((p.double() * g_all[id(p)].double()).sum()) for p in ps))
            fisher = np.mean([sum(float(gm[id(p)].double().pow(2).sum()) for p in ps) for gm in g_mb])
            norm = sum(float(g_all[id(p)].double().pow(2).sum()) for p in ps) ** 0.5
            assert s.taylor[u][i] == pytest.approx(taylor, rel=1e-4, abs=1e-9)
            assert s.fisher[u][i] == pytest.approx(fisher, rel=1e-4)
            assert s.grad_norm[u][i] == pytest.approx(norm, rel=1e-4)
    assert s.memory["peak_rss_mb"] >= s.memory["rss_before_mb"] > 0


def test_gradient_metrics_in_scan():
    model = build("gpt2")
    t = scan(model, sample_inputs("gpt2", n=2, seq=12), "taylor,fisher,grad_norm,weight_norm", batch_size=2)
    for name in ("taylor", "taylor_abs@mlp", "fisher@attention", "grad_norm", "weight_norm@mlp"):
        assert name in t.columns and np.isfinite(t.values(name)).all()
    assert t.columns["weight_norm"].direction is None
    assert np.mean(t.values("weight_norm")) == pytest.approx(1.0)
    assert "skewness" in t.columns["weight_norm"].details["skew"]
    for m in ("ablation", "taylor", "fisher", "grad_norm", "weight_norm", "relevance"):
        assert m in METRICS and m not in DEFAULT_METRICS


# --------------------------------------------------------------------------- relevance
@pytest.mark.parametrize("family", FAMS)
def test_grad_x_activation_matches_hooks(family):
    model = build(family)
    parts = find_parts(model)
    L = parts.num_layers
    ids = sample_inputs(family, n=2, seq=12)
    r = relevance_statistics(_runner(model, ids, batch_size=1))["values"]
    saved = {}

    def keep(key, out):
        t = out[0] if isinstance(out, tuple) else out
        t.retain_grad()
        saved[key] = t

    hooks = []
    for i in range(L):
        hooks.append(parts.blocks[i].register_forward_pre_hook(
            lambda m, a, kw, i=i: saved.__setitem__(("in", i), a[0] if a else kw["hidden_states"]), with_kwargs=True))
        hooks.append(parts.blocks[i].register_forward_hook(lambda m, a, o, i=i: keep(("out", i), o)))
        hooks.append(parts.attention[i].register_forward_hook(lambda m, a, o, i=i: keep(("attention", i), o)))
        hooks.append(parts.mlp[i].register_forward_hook(lambda m, a, o, i=i: keep(("mlp", i), o)))
    try:
        lg = _logits(model, ids)
        F.cross_entropy(lg[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    for i in range(L):
        out, g = saved[("out", i)].detach().double(), saved[("out", i)].grad.double()
        delta = out - saved[("in", i)].detach().double()
        assert r["block"][i] == pytest.approx(float((out * g).sum(-1).abs().sum()), rel=1e-4)
        assert r["block_contribution"][i] == pytest.approx(float((delta * g).sum(-1).abs().sum()), rel=1e-4)
        assert r["block_signed"][i] == pytest.approx(-float((delta * g).sum()), rel=1e-4, abs=1e-7)
        for u in ("attention", "mlp"):
            a, ga = saved[(u, i)].detach().double(), saved[(u, i)].grad.double()
            assert r[u][i] == pytest.approx(float((a * ga).sum(-1).abs().sum()), rel=1e-4)
            assert r[f"{u}_signed"][i] == pytest.approx(-float((a * ga).sum()), rel=1e-4, abs=1e-7)


# --------------------------------------------------------------------------- agreement
def test_correlations_match_scipy_and_orientation():
    a = np.array([0.1, 0.5, 0.3, 0.9, 0.7, 0.2])
    b = np.array([1.0, 4.0, 2.0, 6.0, 3.0, 5.0])
    rho, tau = stats.spearmanr(a, b)[0], stats.kendalltau(a, b)[0]
    c = correlate(oriented(a, "higher"), oriented(b, "higher"))
    assert c["spearman"] == pytest.approx(rho) and c["kendall"] == pytest.approx(tau) and c["n"] == 6
    # a "lower" metric that orders the same way as the truth must come out positive
    c2 = correlate(oriented(-a, "lower"), oriented(b, "higher"))
    assert c2["spearman"] == pytest.approx(rho) and c2["kendall"] == pytest.approx(tau)
    # undefined entries are left out
    a_nan = np.array([0.1, 0.5, np.nan, 0.9, 0.7, 0.2])
    c3 = correlate(a_nan, b)
    mask = ~np.isnan(a_nan)
    assert c3["n"] == 5 and c3["spearman"] == pytest.approx(stats.spearmanr(a_nan[mask], b[mask])[0])


def test_topk_overlap():
    metric = np.array([5.0, 1.0, 2.0, 9.0, 3.0, 8.0, 0.5])  # least important: 6, 1, 2, 4, 0
    truth = np.array([0.0, 7.0, 1.0, 9.0, 2.0, 8.0, 3.0])  # least important: 0, 2, 4, 6, 1
    assert topk_overlap(metric, truth, 3) == {"k": 3, "overlap": pytest.approx(1 / 3), "metric": [6, 1, 2], "truth": [0, 2, 4]}
    assert topk_overlap(metric, truth, 5)["overlap"] == pytest.approx(1.0)
    assert topk_overlap(metric, truth, 50)["k"] == 7


def _table(L=6, with_truth=True, seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.random(L)
    cols = {
        "good": ("higher", truth + 0.01 * rng.random(L)),
        "inverse": ("lower", truth * 3),  # lower = more important, but it grows with the truth: inverted
        "noise": ("higher", rng.random(L)),
    }
    t = ScoreTable(provenance=Provenance(model_id="toy", model_family="llama", num_layers=L, layerscope_version="0"))
    for name, (d, v) in cols.items():
        t.add(ScoreColumn(name=name, metric=name, unit="block", direction=d, definition="", values=list(v)))
    if with_truth:
        t.add(ScoreColumn(name="ablation_kl", metric="ablation_kl", unit="block", direction="higher", definition="",
                          values=list(truth)))
    return t


def test_analysis_recommendation_and_json():
    t = _table()
    res = analyse(t)
    assert res["truths"] == ["ablation_kl"]  # the other defaults are absent, quant_sensitivity optional
    rec = res["recommendation"]["block"]
    assert rec[0]["column"] == "good" and rec[0]["spearman"] == pytest.approx(1.0) and rec[0]["verdict"] == "trust"
    assert next(c for c in rec if c["column"] == "inverse")["verdict"] == "inverted"
    assert "good" in res["answer"]
    json.dumps(res, allow_nan=False)
    assert res["disagreements"]["units"]


def test_bad_input():
    with pytest.raises(LayerscopeError, match="unknown ground-truth metric 'nonsense'"):
        analyse(_table(), truths="ablation_kl,nonsense")
    with pytest.raises(LayerscopeError, match="none of the ground truths"):
        analyse(_table(with_truth=False))


def test_agree_rejects_scores_from_another_model(tmp_path):
    from layerscope.analysis.agreement import agree

    path = _table(L=6).to_json(tmp_path / "scores.json")
    with pytest.raises(LayerscopeError, match="6 layers, but this model has 4"):
        agree(build("llama"), scores=path, data=sample_inputs("llama"), second_corpus=None, bootstrap=0)
    with pytest.raises(LayerscopeError, match="unknown ground-truth"):
        agree(build("llama"), scores=path, truth="bogus", data=sample_inputs("llama"))


def test_agree_end_to_end_tiny(tmp_path):
    from layerscope.analysis.agreement import agree

    model = build("llama")
    ids = sample_inputs("llama", n=4, seq=16)
    t = agree(model, data=ids, second_corpus=None, tokens=ids.numel(), seq_len=16, batch_size=2, bootstrap=5,
              groups=2, ablation_data="calibration", out=tmp_path)
    res = json.loads((tmp_path / "agreement.json").read_text())
    assert res["truths"] == ["ablation_kl", "ablation_dloss", "taylor", "fisher"]
    rows = {r["column"]: r for r in res["rows"]}
    assert "block_influence" in rows and "ablation_kl" in rows["block_influence"]["vs"]
    assert rows["block_influence"]["stability"]["groups"] == 2
    assert rows["stable_rank"]["stability"]["spearman_mean"] == 1.0  # data-free
    assert set(res["recommendation"]) == {"block", "attention", "mlp"}
    html = (tmp_path / "report.html").read_text()
    assert 'data-section="agreement"' in html and 'data-chart="agreement-spearman"' in html
    assert t.extras["agreement"]["primary_truth"] == "ablation_kl"


# --------------------------------------------------------------------------- the real model
@pytest.mark.slow
@requires_smollm2
def test_smollm2_last_block_ablation_small():
    from layerscope.model.loading import load_model

    m = load_model(None)
    parts = find_parts(m.model)
    ids = torch.tensor(m.tokenizer("The capital of France is Paris. The capital of Italy is Rome.")["input_ids"])[None]
    res = leave_one_out(_runner(m.model, ids, 1), units=("block",), layers=[0, parts.num_layers - 1])
    kl = res.kl("block")
    assert kl[0] > kl[-1] > 0  # the first block of SmolLM2 is load-bearing
