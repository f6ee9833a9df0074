"""How built-in corpora split into calibration and evaluation documents.

Splits are by document and deterministic: a document (article title, Shakespeare work, sentence
id) belongs to ``"calibration"`` when the first 8 hex digits of ``sha256("<corpus>:<key>")``
modulo 100 is below 80, else to ``"evaluation"``.  The two splits are disjoint and never depend
on the order or number of other documents; ``"all"`` returns both.
"""
from __future__ import annotations

import hashlib

from layerscope.errors import LayerscopeError

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


