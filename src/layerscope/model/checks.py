"""Checks on what `from_pretrained` actually loaded: every tensor the model needs came from the
checkpoint, and every tensor in the checkpoint found a place in the model.

transformers initialises missing tensors at random and drops unexpected ones with a log line
(which layerscope silences); a model scored that way would be scored as if it were real. So a
mismatch is an error naming the tensors, unless the user passes ``--allow-missing``, which turns
it into a warning recorded in the result's provenance.
"""
from __future__ import annotations

import contextvars
import sys
from typing import Any, Iterable

from layerscope.errors import LayerscopeError

# Set by the CLI's --allow-missing; load_model(allow_missing=...) overrides it for API callers.
ALLOW_MISSING: contextvars.ContextVar[bool] = contextvars.ContextVar("layerscope_allow_missing", default=False)


class WeightsMismatch(LayerscopeError):
    """The checkpoint's tensors do not match the model its config describes."""


def _names(keys: list[str], show: int = 5) -> str:
    more = f" and {len(keys) - show} more" if len(keys) > show else ""
    return ", ".join(keys[:show]) + more


def _key(item: Any) -> str:
    return str(item[0]) if isinstance(item, (tuple, list)) and item else str(item)


def weight_problems(info: dict[str, Iterable[Any]] | None) -> list[str]:
    """Human-readable problems in a `from_pretrained(..., output_loading_info=True)` report."""
    info = info or {}
    missing = sorted(map(_key, info.get("missing_keys") or ()))
    unexpected = sorted(map(_key, info.get("unexpected_keys") or ()))
    mismatched = sorted(map(_key, info.get("mismatched_keys") or ()))
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing from the checkpoint (would be random): {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) in the checkpoint (would be dropped): "
                        f"{_names(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} tensor(s) with the wrong shape: {_names(mismatched)}")
    return problems


def check_loading_info(info: dict | None, model_id: str, allow_missing: bool | None = None) -> list[str]:
    """Raise `WeightsMismatch` naming the tensors, or (allowed) return the warnings to record."""
    problems = weight_problems(info)
    if not problems:
        return []
    message = f"the weights of {model_id} do not match its config: " + "; ".join(problems)
    allowed = ALLOW_MISSING.get() if allow_missing is None else allow_missing
    if not allowed:
        raise WeightsMismatch(message + " (--allow-missing loads it anyway, recorded as a warning)")
    warning = f"loaded with --allow-missing: {message}"
    print(f"layerscope: warning: {warning}", file=sys.stderr)
    return [warning]
