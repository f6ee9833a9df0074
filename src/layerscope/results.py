"""One result contract for every verb: JSON with a kind and a schema version, a terminal summary, a report.

A result's saved JSON is its single source of truth: `summary()` and `report_table()` are computed
from `to_dict()`, so a result read back from disk (`load_result(path)`) prints and renders exactly
like the live one. `layerscope report PATH` re-renders `report.html` from any of these files.

Kinds (this table is the registry):
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from layerscope.errors import LayerscopeError

if TYPE_CHECKING:
    from layerscope.metrics.table import ScoreTable

SCHEMA_VERSION = "1.0"

KINDS: dict[str, str] = {
    "layerscope.scores": "layerscope.metrics.table:ScoreTable",
    "layerscope.agreement": "layerscope.analysis.agreement:AgreementResult",
    "layerscope.probe": "layerscope.analysis.probes:ProbeResult",
    "layerscope.lens": "layerscope.analysis.lenses:LensResult",
    "layerscope.steer": "layerscope.actions.steer:SteerResult",
    "layerscope.sweep": "layerscope.evaluation.sweep:RemovalSweep",
    "layerscope.prune": "layerscope.actions.prune:PruneResult",
    "layerscope.quantize": "layerscope.actions.quantize:QuantizeResult",
    "layerscope.sparsify": "layerscope.actions.sparsify:SparsifyResult",
    "layerscope.lowrank": "layerscope.actions.lowrank:LowrankResult",
    "layerscope.finetune": "layerscope.actions.finetune.result:FinetuneResult",
    "layerscope.merge": "layerscope.actions.merge.apply:MergeResult",
}
__doc__ += "".join(f"\n* ``{k}`` -- `{v.replace(':', '.')}`" for k, v in KINDS.items()) + "\n"


class Result:
    """Mixin of every verb's result: implement `to_dict`, `summary_of(d)` and `table_of(d)`."""

    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def summary_of(cls, data: dict[str, Any]) -> str:
        raise NotImplementedError

    @classmethod
    def table_of(cls, data: dict[str, Any]) -> "ScoreTable":
        raise NotImplementedError

    def summary(self) -> str:
        return self.summary_of(self.to_dict())

    def report_table(self) -> "ScoreTable":
        return self.table_of(self.to_dict())

    def report_html(self, title: str | None = None) -> str:
        from layerscope.report.render import render_report

        return render_report(self.report_table(), title=title)

    def to_json(self, path: str | Path | None = None) -> str:
        """The result as JSON text (kind and schema version first); written atomically to `path` if given."""
        from layerscope import __version__

        data = {"kind": self.kind, "schema_version": SCHEMA_VERSION, "layerscope_version": __version__,
                **{k: v for k, v in self.to_dict().items() if k not in ("kind", "schema_version")}}
        text = json.dumps(data, indent=2, allow_nan=False)
        if path is not None:
            from layerscope.outputs import write_text_atomic

            write_text_atomic(path, text + "\n")
        return text

    @classmethod
    def from_json(cls, path: str | Path) -> "Result":
        res = load_result(path)
        if res.kind != cls.kind:
            raise LayerscopeError(f"{path} holds a {res.kind} result, not {cls.kind}")
        return res


class DictResult(Result):
    """A result that is built directly as its saved form (a dict): subclasses add `summary_of` and `table_of`."""

    def __init__(self, data: dict[str, Any]):
        self.data = data

    def to_dict(self) -> dict[str, Any]:
        return self.data


class SavedResult(Result):
    """A result read back from its JSON: the same summary and report as the live object."""

    def __init__(self, cls: type[Result], data: dict[str, Any]):
        self.cls, self.data = cls, data
        self.kind = cls.kind

    def to_dict(self) -> dict[str, Any]:
        return self.data

    def summary(self) -> str:
        return self.cls.summary_of(self.data)

    def report_table(self) -> "ScoreTable":
        return self.cls.table_of(self.data)


def _kind_of(data: dict[str, Any]) -> str | None:
    kind = data.get("kind")
    if isinstance(kind, str):
        return kind
    if "provenance" in data and "columns" in data:  # score tables written before kinds existed
        return "layerscope.scores"
    return None


def result_class(kind: str) -> type[Result]:
    if kind not in KINDS:
        raise LayerscopeError(f"unknown result kind '{kind}' (known: {', '.join(KINDS)})")
    module, _, attr = KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), attr)


def load_result(path: str | Path) -> Result:
    """Read any result JSON layerscope wrote (scores.json, probe.json, sweep.json, ...)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LayerscopeError(f"result file not found: {path}") from None
    except IsADirectoryError:
        raise LayerscopeError(f"{path} is a directory: give one of its .json results") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise LayerscopeError(f"{path} is not a layerscope result (not readable JSON: {exc})") from None
    kind = _kind_of(data) if isinstance(data, dict) else None
    if kind is None:
        raise LayerscopeError(f"{path} is not a layerscope result (no 'kind')")
    major = str(data.get("schema_version", SCHEMA_VERSION)).split(".")[0]
    if major != SCHEMA_VERSION.split(".")[0]:
        raise LayerscopeError(f"{path} has schema version {data.get('schema_version')}; this layerscope reads {SCHEMA_VERSION}")
    cls = result_class(kind)
    if kind == "layerscope.scores":
        return cls.from_json(path)
    return SavedResult(cls, data)
