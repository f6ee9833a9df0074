"""The ``wikipedia`` corpus: about a hundred English Wikipedia articles from a MediaWiki XML dump,
cleaned to plain text (templates, references, tables, files, categories and the trailing
"See also"/"References"/"External links" sections removed).
"""
from __future__ import annotations

import bz2
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable, Iterator

from layerscope.data.splits import _check_split, _in_split
from layerscope.errors import LayerscopeError
from layerscope.outputs import write_json_atomic

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
    from mwparserfromhell.nodes import (
        Argument,
        Comment,
        ExternalLink,
        Heading,
        HTMLEntity,
        Tag,
        Template,
        Text,
        Wikilink,
    )

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
    from layerscope.data.assets import asset_dir
    from layerscope.data.preparers import WIKI_DUMP

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


