"""prune / eval / sweep on tiny random models of several families (and, marked slow, on SmolLM2).

Tiny models are built from configs, randomised (biases and norms included, so zeroing is really
tested) and saved with save_pretrained to tmp dirs together with a word-level tokenizer.
"""
from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from layerscope.actions import prune as P
from layerscope.engine import removal as R
from layerscope.errors import LayerscopeError
from layerscope.evaluation.perplexity import PerplexityProtocol, perplexity, stream_nll, windows

WORDS = ("the of and to in is was for on as with by at from his her an which or be are this that were "
         "city river king war music art science law house north south old new first year great small").split()
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
VOCAB = 64
DECODERS = ("llama", "qwen2", "gemma3_text", "gpt2", "gpt_neox")


pytestmark = pytest.mark.usefixtures("one_thread")


def make_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tk = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", pad_token="<pad>")


def make_config(family: str, layers: int = 6):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, max_position_embeddings=128)
    if family == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, **common)
    if family == "qwen2":  # sliding window on the later layers: layer_types mixes both kinds
        return transformers.Qwen2Config(num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                                        max_window_layers=3, **common)
    if family == "gemma3_text":
        return transformers.Gemma3TextConfig(num_key_value_heads=2, head_dim=8, sliding_window=8,
                                             sliding_window_pattern=3, **common)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=128)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(**common)
    if family == "bert":
        return transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=128)
    raise ValueError(family)


def build(family: str, root: Path) -> Path:
    torch.manual_seed(0)
    cfg = make_config(family)
    cls = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    model = cls.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and p.dim() == 1 and "bias" not in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    path = root / family
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def dir_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(path)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {f: build(f, root) for f in DECODERS + ("bert",)}


@pytest.fixture(scope="module")
def textfile(tmp_path_factory):
    rng = random.Random(1)
    docs = ["\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(8)) for _ in range(12)]
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(docs), encoding="utf-8")
    return path


def load_plain(path: Path):
    cfg = json.loads((path / "config.json").read_text())
    cls = transformers.AutoModel if cfg["model_type"] == "bert" else transformers.AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def out_of(model, x):
    with torch.no_grad():
        o = model(input_ids=x, use_cache=False)
    return o.logits if hasattr(o, "logits") and o.logits is not None else o.last_hidden_state


IDS = torch.randint(4, VOCAB - 4, (2, 24), generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------------- blocks

@pytest.mark.parametrize("family", DECODERS + ("bert",))
def test_block_prune_reloads_with_plain_transformers(models, family, tmp_path):
    src = models[family]
    before = dir_hash(src)
    remove = [1, 3] if family != "bert" else [1]
    out = tmp_path / "pruned"
    res = P.prune(str(src), units=",".join(map(str, remove)), unit="block", out=out)
    assert dir_hash(src) == before  # the source directory is never written to

    original = load_plain(src)
    n = original.config.num_hidden_layers
    keep = [i for i in range(n) if i not in remove]
    reference_full = out_of(original, IDS)
    with R.blocks_removed(original, remove):
        expected = out_of(original, IDS)
    assert torch.equal(out_of(original, IDS), reference_full)  # restored afterwards
    pruned = load_plain(out)
    assert torch.allclose(out_of(pruned, IDS), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(expected, reference_full, atol=1e-3)

    cfg = json.loads((out / "config.json").read_text())
    src_cfg = json.loads((src / "config.json").read_text())
    assert pruned.config.num_hidden_layers == len(keep)
    if "layer_types" in src_cfg:
        assert cfg["layer_types"] == [src_cfg["layer_types"][i] for i in keep]
        assert len(set(src_cfg["layer_types"])) > 1 or family == "llama"
    idx = [m.layer_idx for m in pruned.modules() if isinstance(getattr(m, "layer_idx", None), int)
           and "Attention" in type(m).__name__ and "Self" not in type(m).__name__ or type(m).__name__ == "BertSelfAttention"]
    assert sorted(set(idx)) == list(range(len(keep)))
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()

    prov = json.loads((out / P.PRUNED_JSON).read_text())
    assert prov["removed"] == remove and prov["kept"] == keep and prov["unit"] == "block"
    assert prov["source"]["weights_sha256"] and prov["layerscope_version"]
    recipe = yaml.safe_load((out / P.MERGEKIT_YAML).read_text())
    assert recipe["merge_method"] == "passthrough" and recipe["dtype"] == "float32"
    ranges = [s["sources"][0]["layer_range"] for s in recipe["slices"]]
    assert [i for a, b in ranges for i in range(a, b)] == keep
    assert res.kept == keep


def test_per_layer_config_lists_are_subset():
    cfg = {"num_hidden_layers": 6, "layer_types": list("abcdef"), "no_rope_layers": [1, 0, 1, 0, 1, 0],
           "mlp_only_layers": [0, 3, 5], "max_window_layers": 3, "architectures": ["X"] * 6, "other": [1] * 6}
    ch = R.plan_config(cfg, [0, 2, 3, 5], 6)
    assert ch == {"num_hidden_layers": 4, "layer_types": list("acdf"), "no_rope_layers": [1, 1, 0, 0],
                  "mlp_only_layers": [0, 2, 3], "max_window_layers": 2}


# ------------------------------------------------------------------------------------- sublayers

@pytest.mark.parametrize("family", DECODERS + ("bert",))
@pytest.mark.parametrize("unit", ["attention", "mlp"])
def test_sublayer_prune_zeroed_equals_fast_equals_hooks(models, family, unit, tmp_path):
    from layerscope.model import fast

    src = models[family]
    remove = [0, 2]
    out = tmp_path / "pruned"
    P.prune(str(src), units=remove, unit=unit, out=out)
    original = load_plain(src)
    full = out_of(original, IDS)
    with R.sublayers_zeroed(original, unit, remove):
        hooked = out_of(original, IDS)
    plain = out_of(load_plain(out), IDS)
    fast_model = fast.load(out)
    skipped = [m for m in fast_model.modules() if isinstance(m, (fast.SkippedAttention, fast.SkippedMLP))]
    assert len(skipped) >= len(remove)
    quick = out_of(fast_model, IDS)
    assert torch.allclose(plain, hooked, atol=1e-5, rtol=0)
    assert torch.allclose(quick, hooked, atol=1e-5, rtol=0)
    assert not torch.allclose(full, hooked, atol=1e-3)
    prov = json.loads((out / P.PRUNED_JSON).read_text())
    assert prov["skipped_sublayers"] == {unit: remove}
    assert fast_model.config.num_hidden_layers == original.config.num_hidden_layers


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_fast_path_generation_matches_with_kv_cache(models, family, tmp_path):
    from layerscope.model import fast

    out = tmp_path / "pruned"
    P.prune(str(models[family]), units=[0, 3], unit="attention", out=out)
    prompt = IDS[:1, :6]
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=3)
    a = load_plain(out).generate(prompt, **kw)
    b = fast.load(out).generate(prompt, **kw)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------- perplexity

def test_windows_score_every_target_once():
    for n, ctx, stride in [(10, 4, 4), (10, 4, 2), (11, 4, 3), (9, 9, 9), (50, 8, 1)]:
        wins = windows(n, ctx, stride)
        scored = []
        for b, e, s in wins:
            assert e - b <= ctx and 0 < s <= e - b - 1  # a target always has context in its window
            scored += list(range(e - s, e))
        assert len(scored) == len(set(scored))  # no target counted twice
        if stride < ctx:  # overlapping windows score every target but the very first token
            assert sorted(scored) == list(range(1, n))
        else:  # disjoint windows: every token but each window's first
            assert sorted(scored) == [i for i in range(1, n) if i % ctx]
    assert windows(10, 4, 4) == [(0, 4, 3), (4, 8, 3), (8, 10, 1)]
    assert windows(10, 4, 2) == [(0, 4, 3), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    with pytest.raises(LayerscopeError):
        windows(10, 4, 5)


def test_stream_nll_matches_direct_computation(models):
    import torch.nn.functional as F

    model = load_plain(models["llama"])
    ids = torch.randint(4, VOCAB, (70,), generator=torch.Generator().manual_seed(5))
    total, count = stream_nll(model, ids, context_length=16, stride=8, batch_size=3)
    assert count == 69
    want = 0.0
    for b, e, s in windows(70, 16, 8):
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=ids[None, b:e]).logits[0, :-1].double(), -1)
        want += float(-logp.gather(-1, ids[b + 1:e, None]).squeeze(-1)[-s:].sum())
    assert abs(total - want) < 1e-6 * abs(want)


# ------------------------------------------------------------------------------------- CLI

def run_cli(args, monkeypatch, capsys):
    from layerscope.cli import app as cli

    monkeypatch.setattr(sys, "argv", ["layerscope", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
        raise SystemExit(0)
    cap = capsys.readouterr()
    return exc.value.code or 0, cap.out, cap.err


@pytest.fixture(scope="module")
def scores(models, tmp_path_factory):
    from layerscope.metrics.scan import scan

    model = load_plain(models["llama"])
    ids = torch.randint(4, VOCAB, (4, 32), generator=torch.Generator().manual_seed(7))
    table = scan(model, ids, ["block_influence", "relative_contribution"])
    path = tmp_path_factory.mktemp("scores") / "scores.json"
    table.to_json(path)
    return path


def bad_cases(src, scores, out):
    common = ["--scores", scores, "--out", out]
    return {
        "K >= units": ["prune", src, "--remove", 6, "--by", "block_influence", *common],
        "all blocks": ["prune", src, "--units", "0,1,2,3,4,5", "--out", out],
        "unknown metric": ["prune", src, "--remove", 2, "--by", "nonsense", *common],
        "unknown metric, no scores": ["prune", src, "--remove", 2, "--by", "nonsense", "--out", out],
        "unknown unit": ["prune", src, "--remove", 2, "--unit", "head", "--by", "block_influence", *common],
        "index out of range": ["prune", src, "--units", "2,9", "--out", out],
        "no --by": ["prune", src, "--remove", 2, "--out", out],
        "sweep K >= units": ["sweep", src, "--remove", "0..6", "--orders", "random:1", "--out", out],
        "sweep unknown metric": ["sweep", src, "--remove", "0..2", "--orders", "nonsense", "--out", out],
        "sweep unknown unit": ["sweep", src, "--unit", "layer", "--out", out],
    }


def test_bad_input_one_line_no_traceback(models, scores, tmp_path, monkeypatch, capsys):
    src = models["llama"]
    before = dir_hash(src)
    out = tmp_path / "out"
    for name, args in bad_cases(src, scores, out).items():
        code, _, err = run_cli(args, monkeypatch, capsys)
        lines = err.strip().splitlines()
        assert code != 0, name
        assert len(lines) == 1 and lines[0].startswith("layerscope: error:"), (name, err)
        assert "Traceback" not in err
        assert not out.exists(), name
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")], name
    # existing output: refused without --force, left untouched
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(["prune", src, "--units", "1", "--out", out], monkeypatch, capsys)
    assert code != 0 and "already exists" in err and len(err.strip().splitlines()) == 1
    assert (out / "keep.txt").read_text() == "mine"
    # output inside the source directory
    code, _, err = run_cli(["prune", src, "--units", "1", "--out", src / "sub"], monkeypatch, capsys)
    assert code != 0 and "inside the source" in err and not (src / "sub").exists()
    code, _, err = run_cli(["prune", src, "--units", "1", "--out", src.parent, "--force"], monkeypatch, capsys)
    assert code != 0 and "contains the source" in err
    assert dir_hash(src) == before


def test_prune_cli_by_metric_and_iterative(models, scores, textfile, tmp_path, monkeypatch, capsys):
    from layerscope.metrics.table import ScoreTable

    src = models["llama"]
    table = ScoreTable.from_json(scores)
    out = tmp_path / "a"
    code, stdout, err = run_cli(["prune", src, "--remove", 2, "--by", "block_influence", "--scores", scores,
                                 "--out", out], monkeypatch, capsys)
    assert code == 0, err
    prov = json.loads((out / P.PRUNED_JSON).read_text())
    assert prov["removed"] == sorted(table.least_important("block_influence", 2))
    assert prov["selection"]["by"] == "block_influence" and prov["selection"]["scores"]["values"]
    out2 = tmp_path / "b"
    code, _, err = run_cli(["prune", src, "--remove", 2, "--unit", "mlp", "--by", "relative_contribution",
                            "--iterative", "--data", textfile, "--tokens", 64, "--seq-len", 16, "--out", out2],
                           monkeypatch, capsys)
    assert code == 0, err
    prov = json.loads((out2 / P.PRUNED_JSON).read_text())
    assert prov["selection"]["method"] == "iterative" and len(prov["selection"]["rounds"]) == 2
    assert prov["skipped_sublayers"] == {"mlp": prov["removed"]}
    # --force replaces an existing output
    code, _, err = run_cli(["prune", src, "--units", "4", "--out", out, "--force"], monkeypatch, capsys)
    assert code == 0 and json.loads((out / P.PRUNED_JSON).read_text())["removed"] == [4]


def test_sweep_cli_and_in_memory_equals_written_dir(models, scores, textfile, tmp_path, monkeypatch, capsys):
    src = models["llama"]
    out = tmp_path / "sweep"
    args = ["sweep", src, "--remove", "0..2", "--orders", "block_influence,relative_contribution,random:3,reverse",
            "--scores", scores, "--dataset", textfile, "--tokens", 300, "--context", 32, "--stride", 16,
            "--greedy-data", textfile, "--greedy-tokens", 64, "--out", out, "-q"]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    res = json.loads((out / "sweep.json").read_text())
    assert res["ks"] == [0, 1, 2] and res["protocol"]["stride"] == 16 and res["protocol"]["context_length"] == 32
    labels = [c["label"] for c in res["curves"]]
    assert labels[:2] == ["block_influence", "relative_contribution"] and labels[2].startswith("reverse:")
    r = res["random"]
    assert r["n"] == 3 and all(lo <= m <= hi for lo, m, hi in zip(r["min"], r["median"], r["max"]))
    assert res["greedy"]["source"].startswith("computed") and len(res["greedy"]["order"]) == 2
    for c in res["curves"]:
        assert c["perplexity"][0] == pytest.approx(res["baseline"])
    assert (out / "sweep.png").stat().st_size > 1000
    assert "sweep" in json.loads((out / "scores.json").read_text())["extras"]
    assert 'data-chart="sweep"' in (out / "report.html").read_text()
    # the in-memory curve point equals the perplexity of the directory prune writes
    order = res["greedy"]["order"]
    pdir = tmp_path / "pdir"
    P.prune(str(src), units=order, out=pdir)
    tok = transformers.AutoTokenizer.from_pretrained(pdir)
    proto = PerplexityProtocol(**res["protocol"])
    ppl = perplexity(load_plain(pdir), tok, proto).perplexity
    assert ppl == pytest.approx(res["greedy"]["perplexity"][2], rel=1e-5)


def test_greedy_order_picks_the_cheapest_removal(models):
    import torch.nn.functional as F

    from layerscope.evaluation.sweep import greedy_order

    model = load_plain(models["gpt2"])
    ids = torch.randint(4, VOCAB, (2, 16), generator=torch.Generator().manual_seed(9))

    def nll(removed):
        with R.blocks_removed(model, removed), torch.no_grad():
            logits = model(input_ids=ids).logits
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)))

    g = greedy_order(model, "block", ids, 2)
    first = min(range(6), key=lambda i: nll([i]))
    assert g["order"][0] == first
    assert g["selection_nll"][0] == pytest.approx(nll([first]), rel=1e-5)
    assert g["selection_nll"][1] == pytest.approx(nll(g["order"]), rel=1e-5)


def test_eval_cli_records_protocol(models, textfile, tmp_path, monkeypatch, capsys):
    src = models["llama"]
    out = tmp_path / "eval.json"
    code, stdout, err = run_cli(["eval", src, "--dataset", textfile, "--tokens", 200, "--context", 32,
                                 "--stride", 16, "--out", out], monkeypatch, capsys)
    assert code == 0, err
    res = json.loads(out.read_text())
    r = res["perplexity"][0]
    assert r["protocol"] == {"dataset": str(textfile), "split": "evaluation", "context_length": 32, "stride": 16,
                             "max_tokens": 200, "batch_size": 4, "bos_each_window": False}  # this tokenizer adds no BOS
    assert r["tokens_scored"] == 199
    tok = transformers.AutoTokenizer.from_pretrained(src)
    assert r["perplexity"] == pytest.approx(perplexity(load_plain(src), tok, PerplexityProtocol(**r["protocol"])).perplexity)
    code, _, err = run_cli(["eval", src, "--lm-eval", "hellaswag"], monkeypatch, capsys)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        assert code != 0 and "pip install lm-eval" in err and len(err.strip().splitlines()) == 1


def test_encoder_eval_embedding_fidelity(models, textfile, tmp_path, monkeypatch, capsys):
    src = models["bert"]
    pruned = tmp_path / "bert-pruned"
    P.prune(str(src), units=[2], out=pruned)
    out = tmp_path / "fid.json"
    code, _, err = run_cli(["eval", pruned, "--dataset", textfile, "--sentences", 40, "--out", out],
                           monkeypatch, capsys)
    assert code == 0, err
    fid = json.loads(out.read_text())["embedding_fidelity"][0]
    assert fid["sentences"] == 40 and -1 <= fid["mean_cosine"] < 0.99999
    assert 0 <= fid["recall_at_1"] <= 1 and fid["reference_id"] == str(src)
    code, _, err = run_cli(["eval", src, "--reference", src, "--dataset", textfile, "--sentences", 40, "--out", out],
                           monkeypatch, capsys)
    fid = json.loads(out.read_text())["embedding_fidelity"][0]
    assert fid["mean_cosine"] == pytest.approx(1.0, abs=1e-5) and fid["recall_at_1"] == 1.0
    assert fid["similarity_spearman"] == pytest.approx(1.0, abs=1e-6)
    code, _, err = run_cli(["eval", src, "--dataset", textfile], monkeypatch, capsys)
    assert code != 0 and "--reference" in err


# ------------------------------------------------------------------------------------- real model

def _ready(name: str) -> bool:
    from layerscope.data import assets

    return assets.is_ready(name) and assets.is_ready("wikipedia")


@pytest.mark.slow
@pytest.mark.skipif(not _ready("smollm2"), reason="SmolLM2 asset not prepared")
def test_smollm2_pruned_dir_reproduces_in_memory_perplexity(tmp_path):
    from layerscope.model.loading import load_model

    loaded = load_model(None)
    proto = PerplexityProtocol(max_tokens=1024, context_length=256, stride=256)
    remove = [10, 20]
    with R.blocks_removed(loaded.model, remove):
        mem = perplexity(loaded.model, loaded.tokenizer, proto).perplexity
    out = tmp_path / "smol"
    P.prune(None, units=remove, out=out)
    plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert plain.config.num_hidden_layers == 28
    assert perplexity(plain, tok, proto).perplexity == pytest.approx(mem, rel=1e-4)


def test_sweep_uses_ground_truth_greedy_order_when_present():
    from layerscope.evaluation.sweep import ground_truth_order, parse_orders, parse_range
    from layerscope.metrics.table import Provenance, ScoreColumn, ScoreTable

    table = ScoreTable(provenance=Provenance(model_id="m", model_family="llama", num_layers=6, layerscope_version="x"))
    assert ground_truth_order(table, "block") is None
    table.add(ScoreColumn(name="ablation_kl", metric="ablation_kl", unit="block", direction="higher", definition="",
                          values=[1, 2, 3, 4, 5, 6], details={"greedy": {"order": [4, 1, 2], "by": "kl"}}))
    order, where = ground_truth_order(table, "block")
    assert order == [4, 1, 2] and "ablation_kl" in where
    assert ground_truth_order(table, "attention") is None
    assert [o.label for o in parse_orders("a,random:3,reverse,greedy")] == ["a", "random:3", "reverse", "greedy"]
    assert parse_range("0..3", 6, "block") == [0, 1, 2, 3] and parse_range("2", 6, "block") == [0, 1, 2]
    with pytest.raises(LayerscopeError):
        parse_range("0..6", 6, "block")


@pytest.mark.slow
@pytest.mark.skipif(not (_ready("minilm") and __import__("layerscope.data.assets").data.assets.is_ready("sentiment")),
                    reason="MiniLM / sentiment assets not prepared")
def test_minilm_block_pruned_embedding_fidelity(tmp_path):
    from layerscope.evaluation.perplexity import EmbeddingProtocol, embedding_fidelity
    from layerscope.model.loading import load_model

    out = tmp_path / "minilm"
    P.prune("minilm", units=[2], out=out)
    ref = load_model("minilm")
    pruned = load_plain(out)
    assert pruned.config.num_hidden_layers == 5 and (out / "modules.json").is_file()
    fid = embedding_fidelity(pruned, ref.model, ref.tokenizer, EmbeddingProtocol(sentences=64))
    assert 0.5 < fid.mean_cosine < 1 and fid.recall_at_1 > 0.9
