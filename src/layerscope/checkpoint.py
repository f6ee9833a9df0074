"""Checkpoints for the long verbs: finished units of work saved as they complete, so that
`--resume` continues an interrupted run and gives the same numbers as an uninterrupted one.

A checkpoint is one JSON file in the verb's --out folder (claimed through the output policy,
`outputs.claim_output`, before anything is written). It holds a *fingerprint* of everything the
numbers depend on (weights sha256, data, token counts, seeds, options) and a map of finished
units (sums, curves, whole score tables), each value exactly as computed (JSON round-trips Python
floats exactly). `--resume` refuses a checkpoint made with other inputs and says which differ.
When the verb has written its results the checkpoint is removed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from layerscope.errors import LayerscopeError


def _normal(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


class Checkpoint:
    """Finished units of work keyed by name; `put` saves the file atomically after every unit."""

    def __init__(self, path: str | Path | None, fingerprint: dict[str, Any], resume: bool = False,
                 claim: Any = None):
        """`claim` (e.g. `outputs.claim_output`) runs before the first write, so a run that fails
        before it has anything to save leaves no folder behind."""
        self.path = Path(path) if path is not None else None
        self._claim = claim
        self.fingerprint = _normal(fingerprint)
        self.done: dict[str, Any] = {}
        self.resumed = 0
        if resume:
            if self.path is None or not self.path.is_file():
                raise LayerscopeError(f"--resume: no checkpoint at {self.path}; run once without --resume")
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise LayerscopeError(f"--resume: checkpoint {self.path} is unreadable ({exc})") from None
            old = data.get("fingerprint", {}) if isinstance(data, dict) else {}
            differ = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
            if differ:
                raise LayerscopeError(f"--resume: the checkpoint in {self.path.parent} was made with other inputs "
                                      f"({', '.join(differ)} differ); rerun without --resume or with the same options")
            self.done = dict(data.get("done", {}))
            self.resumed = len(self.done)

    def get(self, key: str, default: Any = None) -> Any:
        return self.done.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.done

    def put(self, key: str, value: Any) -> None:
        from layerscope.outputs import write_json_atomic

        self.done[key] = _normal(value)
        if self.path is not None:
            if self._claim is not None:
                self._claim()
                self._claim = None
            write_json_atomic(self.path, {"fingerprint": self.fingerprint, "done": self.done})

    def require_same(self, key: str, value: Any) -> None:
        """Record `value` (e.g. the exact data a stage uses); on resume, refuse a different one."""
        value = _normal(value)
        old = self.get(key)
        if old is not None and old != value:
            differ = sorted(k for k in set(old) | set(value) if old.get(k) != value.get(k)) \
                if isinstance(old, dict) and isinstance(value, dict) else [key]
            raise LayerscopeError(f"--resume: the checkpoint was made with other inputs ({', '.join(differ)} differ); "
                                  "rerun without --resume")
        if old is None:
            self.put(key, value)

    def scoped(self, prefix: str) -> "Checkpoint":
        """A view whose keys live under `prefix/` in the same file."""
        return _Scoped(self, prefix)

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class _Scoped(Checkpoint):
    def __init__(self, parent: Checkpoint, prefix: str):  # noqa: D107 -- a view, no file of its own
        self.parent, self.prefix = parent, prefix.rstrip("/") + "/"

    def get(self, key: str, default: Any = None) -> Any:
        return self.parent.get(self.prefix + key, default)

    def __contains__(self, key: str) -> bool:
        return self.prefix + key in self.parent

    def put(self, key: str, value: Any) -> None:
        self.parent.put(self.prefix + key, value)

    def scoped(self, prefix: str) -> "Checkpoint":
        return _Scoped(self.parent, self.prefix + prefix)

    def remove(self) -> None:
        raise LayerscopeError("remove the checkpoint through its owner")


def ids_digest(batches) -> str:
    """sha256 of the token ids of a runner's batches (what a stage was computed on)."""
    import hashlib

    h = hashlib.sha256()
    for b in batches:
        ids = b.inputs["input_ids"]
        h.update(str(tuple(ids.shape)).encode())
        h.update(ids.cpu().numpy().tobytes())
    return h.hexdigest()


def checkpoint_name(verb: str) -> str:
    """The checkpoint's file name in a verb's --out folder."""
    return f"{verb}.checkpoint.json"
