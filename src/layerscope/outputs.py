"""Where results go: atomic writes, and the one output policy every verb follows.

Output policy (`output_dir`):

* `--out DIR` is created when missing; results are written into it.
* A non-empty DIR that layerscope did not create (no marker file `.layerscope-output.json`) is
  refused, unless `--force`; even with `--force` only files layerscope wrote (listed in the
  marker) are ever replaced -- a user's file that collides with an output name is an error.
* DIR must not be a file, must not lie inside a source model, and must not contain one.
* Everything is written into a hidden staging directory first and moved into DIR only when
  complete; on any error (or Ctrl-C) the staging directory is removed and DIR is unchanged.
* Write errors (read-only folder, full disk) become one line naming the path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ordinary_permissions(directory: Path) -> None:
    """Give every file below `directory` the mode a plain write would (0666 less the umask).

    Libraries that write through private temporary files (save_pretrained's model.safetensors) leave 0600.
    """
    mode = 0o666 & ~_umask()
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


@contextmanager
def atomic_directory(final: str | os.PathLike, replace_if_marked: str | None = None) -> Iterator[Path]:
    """Yield a scratch directory that is renamed to `final` only if the block succeeds.

    An existing `final` is an error, unless it holds the file `replace_if_marked` (proof that
    layerscope wrote it, e.g. an older prepared asset): then it is replaced once the new content is
    complete. Nothing without that marker is ever moved or deleted.
    """
    from layerscope.errors import LayerscopeError

    final = Path(final)
    if final.exists() and not (replace_if_marked and final.is_dir() and (final / replace_if_marked).is_file()):
        raise LayerscopeError(f"{final} already exists and was not written by layerscope; it is left untouched "
                              "(move it away and rerun)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            final.rename(old / final.name)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)  # layerscope's own earlier version (it held the marker)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_inside(child: str | os.PathLike, parent: str | os.PathLike) -> bool:
    """True if `child` is `parent` or lies below it (after resolving links)."""
    c, p = Path(child).resolve(), Path(parent).resolve()
    return c == p or p in c.parents


MARKER = ".layerscope-output.json"


def _read_marker(directory: Path) -> dict | None:
    try:
        data = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_output(out: str | os.PathLike, *, force: bool = False, sources: tuple = ()) -> Path:
    """Apply the output policy's checks to `out` before any work is done; return it as a Path."""
    from layerscope.errors import LayerscopeError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LayerscopeError(f"--out {out} exists and is not a directory; layerscope will not replace it")
    for src in sources:
        if src is None:
            continue
        if is_inside(out, src):
            raise LayerscopeError(f"output {out} is inside the source model directory {src}; choose another --out")
        if is_inside(src, out):
            raise LayerscopeError(f"output {out} contains the source model directory {src}; choose another --out")
    if out.is_dir() and any(out.iterdir()) and _read_marker(out) is None and not force:
        raise LayerscopeError(f"--out {out} already exists and holds files layerscope did not write; choose an empty or "
                              "new folder (or --force to add layerscope's files next to them, replacing none of yours)")
    return out


def claim_output(out: str | os.PathLike, names: list[str], *, verb: str, force: bool = False,
                 sources: tuple = ()) -> Path:
    """For verbs that write as they go (checkpoints): check `out`, create it, and record `names` as
    layerscope's in its marker before writing them. A user's file with one of those names is an error."""
    from layerscope import __version__
    from layerscope.errors import LayerscopeError

    out = check_output(out, force=force, sources=sources)
    try:
        out.mkdir(parents=True, exist_ok=True)
        marker = _read_marker(out) or {}
        owned = set(marker.get("files", []))
        theirs = [n for n in names if (out / n).exists() and n not in owned]
        if theirs:
            raise LayerscopeError(f"--out {out} already has {theirs[0]}, which layerscope did not write; "
                                  "it is left untouched: choose another --out")
        write_json_atomic(out / MARKER, {"written_by": f"layerscope {verb}", "layerscope_version": __version__,
                                         "files": sorted(owned | set(names)), "complete": False})
    except OSError as exc:
        raise _write_error(exc, out) from None
    return out


def _write_error(exc: OSError, where: Path) -> Exception:
    from layerscope.errors import LayerscopeError

    reason = exc.strerror or str(exc)
    return LayerscopeError(f"cannot write {where}: {reason}")


@contextmanager
def output_dir(out: str | os.PathLike, *, verb: str, force: bool = False, sources: tuple = ()) -> Iterator[Path]:
    """Yield a staging directory; when the block succeeds its entries move into `out` (see the module
    docstring for the policy). Nothing of the user's is deleted, moved or overwritten."""
    from layerscope import __version__
    from layerscope.errors import LayerscopeError

    out = check_output(out, force=force, sources=sources)
    fresh = not out.exists()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        where = out.parent if fresh else out
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}." if fresh else ".layerscope-", suffix=".partial",
                                        dir=where))
        os.chmod(staging, 0o777 & ~_umask())
    except OSError as exc:
        raise _write_error(exc, out) from None
    try:
        try:
            yield staging
        except OSError as exc:
            if exc.errno is None:
                raise
            raise _write_error(exc, Path(exc.filename) if exc.filename else out) from None
        marker = _read_marker(out) if not fresh else None
        owned = set((marker or {}).get("files", []))
        entries = sorted(p.name for p in staging.iterdir())
        theirs = [n for n in entries if (out / n).exists() and n not in owned and not fresh]
        if theirs:
            raise LayerscopeError(f"--out {out} already has {theirs[0]}, which layerscope did not write; "
                                  "it is left untouched: choose another --out")
        record = {"written_by": f"layerscope {verb}", "layerscope_version": __version__,
                  "files": sorted(owned | set(entries))}
        try:
            ordinary_permissions(staging)
            if fresh:
                (staging / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
                staging.rename(out)
                return
            write_json_atomic(out / MARKER, {**record, "complete": False})
            for name in entries:
                target = out / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)  # a directory layerscope wrote before (listed in the marker)
                os.replace(staging / name, target)
            write_json_atomic(out / MARKER, record)
        except OSError as exc:
            raise _write_error(exc, out) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def check_output_file(path: str | os.PathLike, *, verb: str, sources: tuple = ()) -> Path:
    """The output policy for verbs whose --out is one JSON file (`eval`): it must not be a folder, must
    not lie inside a source model, and an existing file is replaced only if layerscope `verb` wrote it."""
    from layerscope.errors import LayerscopeError

    path = Path(path)
    if path.is_dir():
        raise LayerscopeError(f"--out {path} is a directory; give a file name (e.g. {path / (verb + '.json')})")
    for src in sources:
        if src is not None and is_inside(path, src):
            raise LayerscopeError(f"output {path} is inside the model directory {src}; choose another --out")
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        if not (isinstance(data, dict) and data.get("written_by") == f"layerscope {verb}"):
            raise LayerscopeError(f"--out {path} already exists and was not written by layerscope {verb}; "
                                  "it is left untouched: choose another --out")
    return path


def write_output_file(path: str | os.PathLike, obj: dict, *, verb: str, sources: tuple = ()) -> Path:
    """Write `obj` (plus a `written_by` stamp) atomically to `path` under `check_output_file`'s rules."""
    path = check_output_file(path, verb=verb, sources=sources)
    try:
        return write_json_atomic(path, {**obj, "written_by": f"layerscope {verb}"})
    except OSError as exc:
        raise _write_error(exc, path) from None
