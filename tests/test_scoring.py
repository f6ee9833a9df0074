"""Vocabulary-bounded scoring (evaluation/scoring.py) against the naive full-tensor formula."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from layerscope.evaluation.scoring import OutputHead, ReferenceScorer, naive_scores, token_nll
from tiny_models import build, sample_inputs
from layerscope.model.adapter import find_parts


def _hidden_and_logits(model, ids):
    parts = find_parts(model)
    with torch.no_grad():
        out = parts.base_model()(input_ids=ids, use_cache=False, output_hidden_states=False)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return parts, h


def _pre_norm_final(model, ids):
    """Final hidden state BEFORE the final norm (HF's last_hidden_state has it applied): hook the norm's input."""
    parts = find_parts(model)
    got = {}
    hk = parts.final_norm.register_forward_pre_hook(lambda m, a: got.setdefault("h", a[0].detach()))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
    finally:
        hk.remove()
    return parts, got["h"], logits


@pytest.mark.parametrize("family,linear", [("llama", True), ("gemma2", False)])
@pytest.mark.parametrize("with_targets", [True, False])
def test_chunked_reference_scoring_equals_full_tensor_formula(family, linear, with_targets):
    """KL, NLL and top-1 of a perturbed model vs the full model, with chunks of 8 positions (several per
    batch): the linear-head identity (llama) and the generic path (gemma2's soft-capped logits)."""
    model = build(family)
    ids = sample_inputs(family, n=3, seq=21)
    parts, h_ref, ref_logits = _pre_norm_final(model, ids)
    head = OutputHead.of(parts, chunk_bytes=8 * 4 * parts.head.weight.shape[0])
    assert head.linear is linear
    assert head.chunk_size() == 8
    torch.manual_seed(1)
    h_new = h_ref + 2.0 * torch.randn_like(h_ref)
    with torch.no_grad():
        new_logits = model.lm_head(parts.final_norm(h_new))
        if not linear:
            cap = model.config.final_logit_softcapping
            new_logits = torch.tanh(new_logits / cap) * cap
    targets = ids if with_targets else None
    ref = ReferenceScorer(head, h_ref, targets)
    assert len(ref.chunks) > 2
    want = naive_scores(ref_logits, new_logits, targets)
    got = ref.score_hidden(h_new)
    assert got.n == want.n == (3 * 20 if with_targets else 3 * 21)
    # float32 rounding of either formula (logits, log-softmax): ~1e-6 nats per position at most
    assert got.kl == pytest.approx(want.kl, rel=1e-5, abs=1e-6 * want.n)
    assert got.top1 == want.top1
    if with_targets:
        assert got.nll == pytest.approx(want.nll, rel=1e-6)
        assert ref.nll == pytest.approx(naive_scores(ref_logits, ref_logits, ids).nll, rel=1e-6)
    # the unchanged model scores zero KL and full top-1 agreement
    same = ref.score_hidden(h_ref)
    assert abs(same.kl) < 1e-4 * same.n and same.top1 == same.n
    # generic scoring from logits (the naive bench path) agrees too
    from_logits = ReferenceScorer(None, None, targets, logits=ref_logits).score_logits(new_logits)
    assert from_logits.kl == pytest.approx(want.kl, rel=1e-5, abs=1e-6 * want.n)


def test_linear_identity_handles_a_head_bias():
    torch.manual_seed(0)
    d, V = 16, 50
    head = nn.Linear(d, V, bias=True)
    norm = nn.LayerNorm(d)
    oh = OutputHead(norm, head, chunk_bytes=5 * 4 * V)
    assert oh.linear
    h_ref, h_new = torch.randn(2, 11, d), torch.randn(2, 11, d)
    ids = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        want = naive_scores(head(norm(h_ref)), head(norm(h_new)), ids)
        got = ReferenceScorer(oh, h_ref, ids).score_hidden(h_new)
    assert got.kl == pytest.approx(want.kl, rel=1e-5)
    assert got.nll == pytest.approx(want.nll, rel=1e-6)


def test_bfloat16_reference_storage_stays_close_on_the_generic_path():
    model = build("gemma2")
    ids = sample_inputs("gemma2", n=2, seq=17)
    parts, h_ref, ref_logits = _pre_norm_final(model, ids)
    head = OutputHead.of(parts)
    h_new = h_ref + 2.0 * torch.randn(h_ref.shape, generator=torch.Generator().manual_seed(2))
    f32 = ReferenceScorer(head, h_ref, ids).score_hidden(h_new)
    bf16 = ReferenceScorer(head, h_ref, ids, reference_dtype=torch.bfloat16).score_hidden(h_new)
    recomputed = ReferenceScorer(head, h_ref, ids, max_reference_bytes=0).score_hidden(h_new)
    assert recomputed.kl == pytest.approx(f32.kl, rel=1e-6)  # same formula, re-computed from hidden states
    assert bf16.nll == f32.nll  # the NLL never reads the stored reference
    # bf16 log-probs carry ~3 significant digits: a few percent on the KL, NOT within 1e-4 -- opt-in only
    assert bf16.kl == pytest.approx(f32.kl, rel=5e-2)


def test_token_nll_in_chunks_equals_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 13, 40) * 3
    ids = torch.randint(0, 40, (2, 13))
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1), reduction="none")
    got = token_nll(logits, ids, chunk_bytes=5 * 4 * 40)
    torch.testing.assert_close(got.float().reshape(-1), want, rtol=1e-5, atol=1e-6)
