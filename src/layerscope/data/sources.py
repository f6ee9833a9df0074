"""Text sources by name: a built-in corpus (with its split) or a user's file (.txt, .jsonl, .json, .csv)."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from layerscope.data.corpora import sentiment_sentences, shakespeare_texts
from layerscope.data.splits import BUILTIN_SOURCES, _check_split, _in_split
from layerscope.data.wikipedia import wikipedia_split
from layerscope.errors import LayerscopeError

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


