"""The few parsers every verb shares: index lists, ranges, name lists and KEY=VALUE options.

Each raises a one-line `LayerscopeError` that names what it was parsing (`what`), so the CLI and
the Python API report bad input the same way.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from layerscope.errors import LayerscopeError


def names(text: str | Iterable[str] | None) -> list[str]:
    """'a, b,,c' (or a list of such strings) -> ['a', 'b', 'c'], order kept, duplicates dropped."""
    if text is None:
        return []
    items = [text] if isinstance(text, str) else list(text)
    out: list[str] = []
    for item in items:
        for n in (x.strip() for x in str(item).split(",")):
            if n and n not in out:
                out.append(n)
    return out


def _int(s: str, what: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise LayerscopeError(f"{what}: '{s}' is not an integer") from None


def int_list(spec: str | int | Sequence[int], what: str = "indices", *, lo: int | None = None,
             hi: int | None = None, allow_all: bool = False) -> list[int]:
    """'3,7,9', ranges '4-6' or '4..6', an int or a list -> [ints], duplicates dropped, order kept.

    With `allow_all`, 'all' means lo..hi. Values must lie in [lo, hi] when given.
    """
    if isinstance(spec, bool):
        raise LayerscopeError(f"{what} must be integers, got {spec!r}")
    if isinstance(spec, int):
        items = [spec]
    elif isinstance(spec, str):
        if allow_all and spec.strip().lower() == "all":
            if lo is None or hi is None:
                raise LayerscopeError(f"{what}: 'all' needs known bounds")
            return list(range(lo, hi + 1))
        items = []
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            sep = ".." if ".." in part else ("-" if "-" in part[1:] else None)
            if sep is None:
                items.append(_int(part, what))
                continue
            a, b = part.split(sep, 1) if sep == ".." else (part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1])
            a_i, b_i = _int(a.strip(), what), _int(b.strip(), what)
            if b_i < a_i:
                raise LayerscopeError(f"{what}: range '{part}' is empty")
            items.extend(range(a_i, b_i + 1))
    else:
        items = []
        for x in spec:
            if isinstance(x, bool) or not isinstance(x, int):
                try:
                    x = int(x)
                except (TypeError, ValueError):
                    raise LayerscopeError(f"{what} must be integers, got {x!r}") from None
            items.append(int(x))
    out: list[int] = []
    for x in items:
        if (lo is not None and x < lo) or (hi is not None and x > hi):
            raise LayerscopeError(f"{what}: {x} is out of range {lo}..{hi}")
        if x not in out:
            out.append(x)
    if not out:
        raise LayerscopeError(f"{what}: none given")
    return out


def count_range(spec: str | int, what: str = "--remove") -> list[int]:
    """'7' -> [0..7]; 'A..B' -> [A..B] (numbers of removed units, for sweeps)."""
    s = str(spec).strip()
    if ".." in s:
        a, b = (_int(x.strip(), what) for x in s.split("..", 1))
    else:
        a, b = 0, _int(s, what)
    if a < 0 or b < a:
        raise LayerscopeError(f"{what} range '{s}' is empty or negative")
    return list(range(a, b + 1))


def number(text: str | float, what: str) -> float:
    """A finite float."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise LayerscopeError(f"{what} must be a number, got '{text}'") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise LayerscopeError(f"{what} must be a finite number, got '{text}'")
    return v


def key_values(items: Iterable[str] | None, what: str = "--option") -> dict[str, Any]:
    """['k=1', 'x=0.5', 'name=abc', 'flag=true'] -> {'k': 1, 'x': 0.5, 'name': 'abc', 'flag': True}."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise LayerscopeError(f"{what} expects KEY=VALUE, got '{item}'")
        v: Any = value.strip()
        if v.lower() in ("true", "false"):
            v = v.lower() == "true"
        else:
            for cast in (int, float):
                try:
                    v = cast(v)
                    break
                except ValueError:
                    continue
        out[key.strip()] = v
    return out
