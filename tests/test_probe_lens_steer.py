"""Probes, CKA, lenses, neuron decoding and steering on tiny random models (+ slow real-asset checks)."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from layerscope.errors import LayerscopeError

WORDS = ("the a movie food book good great excellent wonderful amazing fantastic perfect lovely bad terrible "
         "awful horrible poor disappointing boring worst was is and it very quite alpha beta gamma delta "
         "i think today service hotel room trip phone battery weather concert").split()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]",
                                   eos_token="[EOS]", bos_token="[BOS]")


@pytest.fixture(scope="module")
def llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def bert(tok):
    from transformers import BertConfig, BertModel

    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64, pad_token_id=0)
    return BertModel(cfg).eval()


def _subject(model, tok):
    from layerscope.model.subject import load_subject

    return load_subject(model, tok)


def separable(n=160, seed=0):
    """Class 'x' sentences contain 'alpha', class 'y' sentences 'beta'; the rest is shared noise."""
    rng = random.Random(seed)
    filler = [w for w in WORDS if w not in ("alpha", "beta")]
    rows = []
    for i in range(n):
        lab = "x" if i % 2 == 0 else "y"
        words = [rng.choice(filler) for _ in range(rng.randint(3, 8))]
        words.insert(rng.randint(1, len(words)), "alpha" if lab == "x" else "beta")  # never first: skipped by mean pooling
        rows.append((" ".join(words), lab))
    return rows


def texts(n=40, seed=3, lo=20, hi=40):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


# ============================================================================ probes


@pytest.mark.parametrize("which", ["llama", "bert"])
def test_probe_separable_and_control(which, tok, request):
    from layerscope import probe as P_probe
    from layerscope.report.sections.probe import render as render_probe_section

    model = request.getfixturevalue(which)
    res = P_probe(_subject(model, tok), separable(), n=160, Cs=(0.1, 1.0), poolings=("mean", "last"), seed=0)
    c = res.concepts["label"]
    L = model.config.num_hidden_layers
    mean = c.poolings["mean"]
    assert len(mean.accuracy) == L + 1  # embeddings included
    assert mean.accuracy[0] >= 0.95 and max(mean.accuracy) >= 0.97
    assert abs(np.mean(mean.control) - 0.5) < 0.2  # shuffled labels: chance
    assert c.depth is not None and c.depth <= L
    assert all(lo <= a <= hi for a, lo, hi in zip(mean.accuracy, mean.ci_low, mean.ci_high))
    d = json.loads(res.to_json())
    assert d["concepts"]["label"]["poolings"]["last"]["accuracy"]
    html = render_probe_section(d)
    assert "Concept depth" in html and "<svg" in html


def test_python_api(tok, llama):
    import layerscope

    assert all(callable(getattr(layerscope, n)) for n in ("probe", "lens", "steer"))
    res = layerscope.probe(_subject(llama, tok), separable(64), n=64, Cs=(1.0,), control=False,
                           poolings=("mean",))
    assert res.concepts["label"].poolings["mean"].control is None


def test_padding_does_not_change_features(tok, llama):
    from layerscope.analysis.features import collect_features

    s = _subject(llama, tok)
    ts = ["the movie was good", "i think the hotel room was very very quite bad and boring"]
    both = collect_features(s, ts, batch_size=2)
    alone = collect_features(s, ts[:1], batch_size=1)
    for p in ("mean", "last"):
        np.testing.assert_allclose(both.pooled[p][:, 0], alone.pooled[p][:, 0], atol=1e-4)
    # decoder: the mean leaves out the first token (attention sink); the last pooling is the last real token
    got = {}
    ids = tok(ts[1])["input_ids"]
    from layerscope.analysis.features import pad_batch
    from reference_taps import run_base, tap_layers

    x, m = pad_batch([ids], 0)
    with tap_layers(s.parts, lambda l, h: got.__setitem__(l, h[0].detach())):
        run_base(s.parts, x, m)
    assert both.mean_skip_first
    np.testing.assert_allclose(both.pooled["mean"][2, 1], got[2][1:].mean(0).numpy(), atol=1e-4)
    np.testing.assert_allclose(both.pooled["last"][2, 1], got[2][-1].numpy(), atol=1e-4)


def test_wilson_and_depth_rule():
    from layerscope.analysis.probe_fit import concept_depth, wilson_interval

    lo, hi = wilson_interval(50, 100)
    assert lo < 0.5 < hi and abs((lo + hi) / 2 - 0.5) < 1e-9
    assert wilson_interval(100, 100)[1] == 1.0
    assert concept_depth([0.5, 0.6, 0.9, 1.0], 0.5, 0.9) == 3  # target 0.5 + 0.9 * 0.5 = 0.95
    assert concept_depth([0.5, 0.96, 0.9, 1.0], 0.5, 0.9) == 1


# ============================================================================ CKA


def _cka_reference(X, Y):
    n = X.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = X @ X.T, Y @ Y.T
    hsic = lambda A, B: np.trace(A @ H @ B @ H)  # noqa: E731
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def test_cka_against_numpy_and_invariances():
    from layerscope.analysis.similarity import cka_matrix, linear_cka

    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 12))
    Y = X @ rng.normal(size=(12, 7)) + 0.5 * rng.normal(size=(60, 7))
    Z = rng.normal(size=(60, 20))
    assert linear_cka(X, Y) == pytest.approx(_cka_reference(X, Y), abs=1e-10)
    assert linear_cka(X, Z) == pytest.approx(_cka_reference(X, Z), abs=1e-10)
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    Q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    assert linear_cka(X @ Q, Y) == pytest.approx(linear_cka(X, Y), abs=1e-10)
    assert linear_cka(3.7 * X, Y) == pytest.approx(linear_cka(X, Y), abs=1e-10)
    M = cka_matrix([X, Y, Z])
    assert M.shape == (3, 3) and np.allclose(M, M.T) and np.allclose(np.diag(M), 1)
    assert M[0, 1] == pytest.approx(_cka_reference(X, Y), abs=1e-5)
    assert M[1, 2] == pytest.approx(_cka_reference(Y, Z), abs=1e-5)


@pytest.mark.parametrize("which", ["llama", "bert"])
def test_layer_similarity_tiny(which, tok, request):
    from layerscope.analysis.similarity import layer_similarity
    from layerscope.report.sections.similarity import render as render_similarity_section

    model = request.getfixturevalue(which)
    res = layer_similarity(_subject(model, tok), data=texts(), tokens=200, seq_len=32)
    L = model.config.num_hidden_layers
    assert res.matrix.shape == (L + 1, L + 1)
    assert np.allclose(res.matrix, res.matrix.T) and np.allclose(np.diag(res.matrix), 1)
    assert res.n_tokens == 200
    assert "<svg" in render_similarity_section(res.to_dict())


# ============================================================================ neurons


def test_neuron_decoding_matches_direct(tok, llama):
    from layerscope.analysis.neurons import decode_neurons, promoting_neurons

    out = decode_neurons(llama, [1], top_k=5, tokenizer=tok)
    W_U = llama.lm_head.weight.detach()
    g = llama.model.norm.weight.detach()
    down = llama.model.layers[1].mlp.down_proj.weight.detach()  # [d, d_ff]
    direct = (W_U @ (g[:, None] * down)).T  # [d_ff, V]
    direct = direct - direct.mean(-1, keepdim=True)
    for row in out[1][:10]:
        j = row["neuron"]
        assert row["top_token_ids"] == direct[j].topk(5).indices.tolist()
        np.testing.assert_allclose(row["top_logits"], direct[j].topk(5).values.numpy(), atol=1e-4)
    tid = tok.convert_tokens_to_ids("good")
    found = promoting_neurons(llama, "good", top_k=3, tokenizer=tok)
    scores = []
    for b, layer in enumerate(llama.model.layers):
        dn = layer.mlp.down_proj.weight.detach()
        col = (W_U @ (g[:, None] * dn))  # [V, d_ff]
        col = col - col.mean(0, keepdim=True)
        scores += [(float(col[tid, j]), b, j) for j in range(col.shape[1])]
    best = sorted(scores, reverse=True)[:3]
    assert [(n["layer"], n["neuron"]) for n in found["neurons"]] == [(b, j) for _, b, j in best]
    assert found["neurons"][0]["score"] == pytest.approx(best[0][0], abs=1e-4)


# ============================================================================ lenses


def test_tuned_lens_identity_equals_logit_lens(tok, llama):
    from layerscope.analysis.tuned_lens import LensHead, Translators
    from layerscope.analysis.lenses import cache_states, evaluate_lenses, lens

    s = _subject(llama, tok)
    head = LensHead(s.parts)
    states, _ = cache_states(s, texts(), n_tokens=64, seq_len=32, split="calibration", seed=0)
    tr = Translators(3, 32)
    h = states[1]
    assert torch.equal(head.logits(tr.translate(1, h)), head.logits(h))
    ev = evaluate_lenses(head, states, tr)
    assert ev["tuned_kl"] == ev["logit_kl"] and ev["tuned_top1"] == ev["logit_top1"]
    assert ev["logit_kl"][-1] == pytest.approx(0.0, abs=1e-6) and ev["logit_top1"][-1] == 1.0
    res = lens(s, steps=0, train_data=texts(), eval_data=texts(seed=9), train_tokens=64, eval_tokens=64, seq_len=32)
    assert res.tuned_kl == res.logit_kl


def test_tuned_lens_trains_and_resumes(tok, llama, tmp_path):
    from layerscope.analysis.lenses import lens
    from layerscope.analysis.tuned_lens import load_tuned_lens

    s = _subject(llama, tok)
    kw = dict(train_data=texts(), eval_data=texts(seed=9), train_tokens=128, eval_tokens=64, seq_len=32,
              batch_tokens=16, lr=3e-3, checkpoint_every=2)
    full = lens(s, steps=12, out=tmp_path / "a", **kw)
    assert np.mean(full.tuned_kl[:-1]) < np.mean(full.logit_kl[:-1])
    part = lens(s, steps=12, out=tmp_path / "b", stop_at=3, **kw)  # an interrupted run
    assert part.steps == 3 and "resume" in part.notes[-1]
    meta = json.loads((tmp_path / "b" / "checkpoint.json").read_text())
    assert meta["step"] == 3
    resumed = lens(s, steps=12, out=tmp_path / "b", resume=True, **kw)
    assert resumed.resumed_from == 3
    a = load_tuned_lens(tmp_path / "a", s)
    b = load_tuned_lens(tmp_path / "b", s)
    assert torch.allclose(a.translators.weight, b.translators.weight, atol=1e-6)
    assert torch.allclose(a.translators.bias, b.translators.bias, atol=1e-6)
    assert resumed.tuned_kl == pytest.approx(full.tuned_kl, abs=1e-5)
    with pytest.raises(LayerscopeError, match="resume"):
        lens(s, steps=5, out=tmp_path / "b", resume=True, **dict(kw, lr=1e-2))
    with pytest.raises(LayerscopeError, match="no checkpoint"):
        lens(s, steps=5, out=tmp_path / "empty", resume=True, **kw)


# ============================================================================ steering


def test_steering_hook_changes_only_from_layer(tok, llama):
    from layerscope.analysis.features import pad_batch
    from reference_taps import run_base, tap_layers
    from layerscope.actions.steer import random_like, steering

    s = _subject(llama, tok)
    ids, mask = pad_batch([tok("the movie was very good")["input_ids"]], 0)

    def states(layer=None, vec=None):
        got = {}
        with tap_layers(s.parts, lambda l, h: got.__setitem__(l, h.clone())), steering(s.parts, layer or 0, vec):
            run_base(s.parts, ids, mask)
        return got

    base = states()
    v = torch.randn(32)
    for at in (0, 2, 3):
        st = states(at, v)
        for layer in range(4):
            same = torch.allclose(st[layer], base[layer])
            assert same == (layer < at), (at, layer)
        assert torch.allclose(st[at], base[at] + v, atol=1e-5)
    after = states()
    assert all(torch.equal(after[k], base[k]) for k in base)  # hook removed
    r = random_like(v * 3, seed=5)
    assert r.norm().item() == pytest.approx((v * 3).norm().item(), rel=1e-6)
    assert not torch.allclose(r, random_like(v * 3, seed=6))


def test_steer_api_tiny(tok, llama):
    from layerscope.report.sections.steer import render as render_steer_section
    from layerscope.actions.steer import steer

    rows = [(t, "positive" if lab == "x" else "negative") for t, lab in separable(64)]
    res = steer(_subject(llama, tok), layer=2, alpha=1.0, data=rows, n=64, seeds=3, compare="every:2")
    assert res.layer == 2 and set(res.layers) == {0, 2, 3}
    assert len(res.random["per_seed"]) == 3
    assert all(r["vector_norm"] == pytest.approx(res.vector_norm, rel=1e-5) for r in res.random["per_seed"])
    d = json.loads(res.to_json())
    assert d["chosen"]["mean"] == pytest.approx(res.chosen["mean"])
    assert "<svg" in render_steer_section(d)
    auto = steer(_subject(llama, tok), data=rows, n=64, seeds=2, compare=[1], generate_tokens=3)
    assert 0 <= auto.layer <= 3 and auto.probe is not None
    assert set(auto.generation["conditions"]) >= {"unsteered", f"+alpha@{auto.layer}"}


# ============================================================================ bad input


def test_bad_inputs(tok, llama, bert, tmp_path):
    from layerscope.analysis.lenses import lens
    from layerscope.analysis.probes import probe
    from layerscope.analysis.neurons import decode_neurons
    from layerscope.actions.steer import steer

    s = _subject(llama, tok)
    with pytest.raises(LayerscopeError, match="only one class"):
        probe(s, [(t, "x") for t, _ in separable(40)])
    csv = tmp_path / "d.csv"
    csv.write_text("text,sentiment\nthe movie,pos\n", encoding="utf-8")
    with pytest.raises(LayerscopeError, match="no column 'label'"):
        probe(s, csv)
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"text": "a movie"}) + "\n", encoding="utf-8")
    with pytest.raises(LayerscopeError, match="no 'label' field"):
        probe(s, jl)
    with pytest.raises(LayerscopeError, match="only 2 examples"):
        probe(s, separable(40) + [("alpha beta", "z"), ("beta", "z")])
    long = [(" ".join(["movie"] * 100), lab) for _, lab in separable(20)]
    with pytest.raises(LayerscopeError, match="longer than the limit"):
        probe(s, long, on_long="error")
    with pytest.warns(UserWarning, match="truncated"):
        res = probe(s, long, Cs=(1.0,), control=False, poolings=("mean",))
    assert res.options["max_length"] == 64 and "truncated" in res.notes[0]
    with pytest.raises(LayerscopeError, match="out of range"):
        steer(s, layer=4, data=separable(20))
    with pytest.raises(LayerscopeError, match="out of range"):
        decode_neurons(s, [3])
    with pytest.raises(LayerscopeError, match="out of range"):
        s.check_layer(-1)
    b = _subject(bert, tok)
    with pytest.raises(LayerscopeError, match="encoder"):
        lens(b, steps=1)
    with pytest.raises(LayerscopeError, match="encoder"):
        steer(b, data=separable(20))


def test_cli_bad_input_one_line(tok, llama, tmp_path, capsys, monkeypatch):
    from layerscope.cli import app as cli

    model_dir = tmp_path / "tiny"
    llama.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\nthe movie,pos\nthe book,pos\n", encoding="utf-8")
    monkeypatch.setattr("sys.argv", ["layerscope", "probe", str(model_dir), "--data", str(csv),
                                     "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only one class" in err[0]
    monkeypatch.setattr("sys.argv", ["layerscope", "steer", str(model_dir), "--layer", "9",
                                     "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code != 0 and len(err) == 1 and "out of range" in err[0]


def test_cli_probe_writes_outputs(tok, llama, tmp_path, monkeypatch, capsys):
    from layerscope.cli import app as cli

    model_dir = tmp_path / "tiny"
    llama.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps({"text": t, "y": lab}) + "\n" for t, lab in separable(48)), encoding="utf-8")
    out = tmp_path / "out"
    monkeypatch.setattr("sys.argv", ["layerscope", "probe", str(model_dir), "--data", str(jl), "--label-field", "y",
                                     "--out", str(out), "--quiet", "--no-control"])
    try:
        cli.main()
    except SystemExit as exc:  # success may or may not exit explicitly
        assert exc.code in (0, None), capsys.readouterr().err
    d = json.loads((out / "probe.json").read_text())
    assert d["concepts"]["y"]["poolings"]["mean"]["accuracy"]
    assert "Concept depth" in (out / "report.html").read_text()


# ============================================================================ real assets


def _ready(*names):
    from layerscope.data import assets

    return all(assets.is_ready(n) for n in names)


@pytest.mark.slow
@pytest.mark.skipif(not _ready("minilm", "sentiment"), reason="needs `layerscope assets fetch`")
def test_real_minilm_probe_small():
    from layerscope.analysis.probes import probe

    res = probe("minilm", concepts="sentiment", n=200, poolings=("mean",), Cs=(0.1,))
    acc = res.concepts["sentiment"].poolings["mean"].accuracy
    assert len(acc) == 7 and max(acc) > 0.7


@pytest.mark.slow
@pytest.mark.skipif(not _ready("smollm2", "wikipedia"), reason="needs `layerscope assets fetch`")
def test_real_smollm2_neurons_and_identity_lens():
    from layerscope.analysis.lenses import lens

    res = lens("smollm2", steps=0, train_tokens=64, eval_tokens=64, neurons=[29], promote=[" good"], top_k=5)
    assert res.tuned_kl == res.logit_kl and res.logit_kl[-1] == pytest.approx(0.0, abs=1e-5)
    assert len(res.neurons.layers[29]) == 1536
    assert res.neurons.promote[" good"]["token_id"] == 1123
