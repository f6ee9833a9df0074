"""Loud, not silent (issue 10): what cannot be measured is None with a reason, never 0; a weaker
fallback says so; weights that do not match the config are an error naming the tensors."""
from __future__ import annotations

import pytest
import torch

import layerscope
from tiny_models import build, sample_inputs, save_tiny, tiny_text, tiny_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


def test_head_metrics_are_none_with_a_reason_without_attention_probabilities():
    t = layerscope.scan(build("llama"), sample_inputs("llama", 4, 24), ["attention_heads"], attn_seqs=0, batch_size=2)
    for name in ("sink_mass@head", "attention_entropy@head", "dormant_head@head", "sink_mass@attention",
                 "dormant_share@attention"):
        col = t.columns[name]
        flat = [v for row in col.values for v in (row if isinstance(row, list) else [row])]
        assert flat and all(v is None for v in flat), name  # never 0.0
        assert "--attn-seqs 0" in col.details["not_measured"]
    assert t.least_important("sink_mass@attention", 3) == []  # never ranked


def test_head_metrics_are_none_when_the_head_count_does_not_match():
    from layerscope.metrics.heads import AttentionHeads
    from layerscope.metrics.base import BlockObservation, ScanContext
    from layerscope.model.adapter import find_parts

    model = build("llama")
    parts = find_parts(model)

    class Runner:  # one eager batch, as the scan would have
        batches = [type("B", (), {"eager": True})()]

    m = AttentionHeads()
    m.begin(ScanContext(parts=parts, runner=Runner(), num_layers=4, num_heads=4, n_tokens=8))
    probs = torch.softmax(torch.randn(1, 2, 8, 8), -1)  # 2 heads arrive, the config says 4
    for i in range(4):
        m.observe(BlockObservation(index=i, batch_index=0, h_in=torch.zeros(1, 8, 32), h_out=torch.zeros(1, 8, 32),
                                   attn_probs=probs))
    cols = {c.name: c for c in m.finish()}
    assert all(v is None for v in cols["sink_mass@attention"].values)
    assert "4 heads" in cols["sink_mass@attention"].details["not_measured"]


def test_dormant_rule_without_head_outputs_says_it_is_the_sink_only_fallback():
    from layerscope.metrics.heads import AttentionHeads
    from layerscope.metrics.base import BlockObservation, ScanContext
    from layerscope.model.adapter import find_parts

    parts = find_parts(build("llama"))

    class Runner:
        batches = [type("B", (), {"eager": True})()]

    m = AttentionHeads()
    m.begin(ScanContext(parts=parts, runner=Runner(), num_layers=4, num_heads=4, n_tokens=8))
    probs = torch.zeros(1, 4, 8, 8)
    probs[..., 0] = 1.0  # every head is a pure sink
    for i in range(4):
        m.observe(BlockObservation(index=i, batch_index=0, h_in=torch.zeros(1, 8, 32), h_out=torch.zeros(1, 8, 32),
                                   attn_probs=probs))  # no head_out
    cols = {c.name: c for c in m.finish()}
    share = cols["dormant_share@attention"]
    assert share.values == [1.0] * 4
    assert "FALLBACK" in share.definition and "norm <=" not in share.definition.split("FALLBACK")[0]
    assert share.details["fallback"] and share.details["norm_threshold"] is None
    assert "FALLBACK" in cols["dormant_head@head"].definition


def test_check_finite_sums_fp16_in_float32_without_false_alarm():
    from layerscope.engine.runner import BlockRunner
    from layerscope.errors import NumericalError

    big = torch.full((64,), 30000.0, dtype=torch.float16)  # finite, but its fp16 sum overflows to inf
    assert not torch.isfinite(big.sum())
    BlockRunner.check_finite(big, "x")  # no alarm
    big[3] = float("nan")
    with pytest.raises(NumericalError):
        BlockRunner.check_finite(big, "x")


@pytest.fixture(scope="module")
def opt_post_ln():
    return build("opt", do_layer_norm_before=False, word_embed_proj_dim=16)


def test_opt_post_ln_splits_after_the_attention_norm_and_the_lens_uses_project_out(opt_post_ln):
    from layerscope.model.adapter import find_parts

    model = opt_post_ln
    parts = find_parts(model)
    layer = model.model.decoder.layers[1]
    assert parts.mid[1] == ("output", layer.self_attn_layer_norm)
    assert parts.head_proj is model.model.decoder.project_out
    # The residual stream between attention and MLP, computed independently: LN(h_in + attn(h_in)).
    seen = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: seen.update(h_in=(a[0] if a else k["hidden_states"])),
                                             with_kwargs=True),
             layer.self_attn.register_forward_hook(lambda m, a, o: seen.update(attn=o[0])),
             layer.fc1.register_forward_pre_hook(lambda m, a: seen.update(mlp_in=a[0])),
             model.model.decoder.layers[-1].register_forward_hook(
                 lambda m, a, o: seen.update(last=o[0] if isinstance(o, tuple) else o))]
    ids = sample_inputs("opt", 2, 12)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    for h in hooks:
        h.remove()
    expected = layer.self_attn_layer_norm(seen["h_in"] + seen["attn"]).reshape(seen["mlp_in"].shape)
    torch.testing.assert_close(seen["mlp_in"], expected)
    # The head reads project_out(h): the last block's output through head_input + head gives the logits.
    last = seen["last"]  # (HF's hidden_states[-1] is already normalised and projected)
    logits = parts.head(parts.head_input(last))
    torch.testing.assert_close(logits, out.logits, rtol=1e-4, atol=1e-4)
    t = layerscope.scan(model, ids, ["logit_lens"], batch_size=2)
    assert t.columns["logit_lens_kl"].values[-1] == pytest.approx(0.0, abs=1e-5)


def test_opt_post_ln_tuned_lens_runs(opt_post_ln):
    from layerscope.analysis.lenses import lens
    from layerscope.model.subject import load_subject

    s = load_subject(opt_post_ln, tiny_tokenizer())
    res = lens(s, steps=2, train_data=tiny_text(600).split("\n\n"), eval_data=tiny_text(600, seed=1).split("\n\n"), train_tokens=64,
               eval_tokens=64, seq_len=16)
    assert len(res.tuned_kl) == len(res.logit_kl) and res.logit_kl[-1] == pytest.approx(0.0, abs=1e-5)


def _drop_tensors(directory, pattern: str, extra: dict | None = None):
    from safetensors.torch import load_file, save_file

    f = directory / "model.safetensors"
    sd = {k: v for k, v in load_file(f).items() if pattern not in k}
    sd.update(extra or {})
    save_file(sd, f, metadata={"format": "pt"})


def test_missing_and_unexpected_tensors_are_an_error_naming_them(tmp_path):
    from layerscope.errors import LayerscopeError
    from layerscope.model.loading import load_model

    d = save_tiny("llama", tmp_path / "m")
    _drop_tensors(d, "layers.1.mlp.", {"stray.weight": torch.zeros(3)})
    with pytest.raises(LayerscopeError) as e:
        load_model(d)
    msg = str(e.value)
    assert "model.layers.1.mlp.down_proj.weight" in msg and "stray.weight" in msg and "--allow-missing" in msg
    loaded = load_model(d, allow_missing=True)
    assert len(loaded.warnings) == 1 and "model.layers.1.mlp.up_proj.weight" in loaded.warnings[0]


def test_allow_missing_is_recorded_in_the_scan_provenance(tmp_path):
    d = save_tiny("llama", tmp_path / "m")
    _drop_tensors(d, "layers.2.self_attn.o_proj")
    from layerscope.model.checks import ALLOW_MISSING

    token = ALLOW_MISSING.set(True)
    try:
        t = layerscope.scan(d, tiny_text(400).split("\n\n"), ["block_influence"], tokens=64, seq_len=16)
    finally:
        ALLOW_MISSING.reset(token)
    assert any("--allow-missing" in n and "layers.2.self_attn.o_proj.weight" in n for n in t.provenance.notes)
