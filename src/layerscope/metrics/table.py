"""ScoreTable: layers x metrics, each with its direction and definition. Every action reads it."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from layerscope.errors import LayerscopeError
from layerscope.metrics.order import importance_order
from layerscope.outputs import write_json_atomic, write_text_atomic

SCHEMA_VERSION = "1.0"
UNITS = ("block", "attention", "mlp", "head")


class ScoreColumn(BaseModel):
    name: str
    metric: str
    unit: Literal["block", "attention", "mlp", "head"]
    direction: Literal["higher", "lower"] | None = Field(
        description="which values mean 'more important'; null for descriptive metrics"
    )
    definition: str
    reference: str = ""
    values: list[Any]  # [L] or [L][H]; null where undefined
    details: dict[str, Any] = Field(default_factory=dict)


class Provenance(BaseModel):
    model_id: str
    model_family: str
    weights_sha256: str | None = None
    num_layers: int
    num_heads: int | None = None
    calibration_source: str | None = None
    calibration_tokens: int = 0
    seq_len: int | None = None
    seed: int = 0
    layerscope_version: str
    torch_version: str = ""
    transformers_version: str = ""
    created: str = ""
    wall_time_s: float | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    skipped: dict[str, str] = Field(default_factory=dict, description="metric -> why it was not computed")


class ScoreTable(BaseModel):
    """The scores of every layer by every metric: `layerscope scan`'s result (kind layerscope.scores)."""

    kind: Literal["layerscope.scores"] = "layerscope.scores"
    schema_version: str = SCHEMA_VERSION
    provenance: Provenance
    columns: dict[str, ScoreColumn] = Field(default_factory=dict)
    extras: dict[str, Any] = Field(default_factory=dict, description="analyses attached by other commands")

    # ------------------------------------------------------------------ access
    @property
    def num_layers(self) -> int:
        return self.provenance.num_layers

    def names(self, unit: str | None = None) -> list[str]:
        return [n for n, c in self.columns.items() if unit is None or c.unit == unit]

    def column(self, name: str, unit: str | None = None) -> ScoreColumn:
        key = name if unit in (None, "block") or "@" in name else f"{name}@{unit}"
        col = self.columns.get(key)
        if col is None:
            known = ", ".join(self.names(unit)) or "none"
            raise LayerscopeError(f"unknown metric '{key}' in this score table (known: {known})")
        return col

    def values(self, name: str, unit: str | None = None) -> np.ndarray:
        col = self.column(name, unit)
        return np.array([[np.nan if v is None else v for v in row] if isinstance(row, list)
                         else (np.nan if row is None else row) for row in col.values], dtype=float)

    def ranking(self, name: str, unit: str | None = None) -> list[int]:
        """Layer indices from least to most important under the metric's direction (`importance_order`:
        undefined layers left out; a column without variation ranks nothing)."""
        col = self.column(name, unit)
        if col.direction is None:
            raise LayerscopeError(f"metric '{col.name}' is descriptive: it has no importance direction")
        if col.unit == "head":
            raise LayerscopeError(f"metric '{col.name}' is per head; rank layers with a per-layer metric")
        return importance_order(col.values, col.direction)

    def least_important(self, name: str, k: int, unit: str | None = None) -> list[int]:
        return self.ranking(name, unit)[:k]

    def check_same_model(self, weights_sha256: str | None, num_layers: int, where: Any = None) -> None:
        """Refuse a table computed on another model: other layer count, or other weights (sha256)."""
        p = self.provenance
        label = str(where) if isinstance(where, (str, Path)) else "the score table"
        if p.num_layers != num_layers:
            raise LayerscopeError(f"{label} was computed on a model with {p.num_layers} layers, "
                                  f"but this model has {num_layers}: it comes from another model")
        for col in self.columns.values():
            if col.unit != "head" and len(col.values) != num_layers:
                raise LayerscopeError(f"column '{col.name}' of {label} has {len(col.values)} values for {num_layers} layers")
        if weights_sha256 and p.weights_sha256 and weights_sha256 != p.weights_sha256:
            raise LayerscopeError(f"{label} was computed on other weights (sha256 {p.weights_sha256[:12]}… "
                                  f"vs {weights_sha256[:12]}…)")

    def add(self, column: ScoreColumn, replace: bool = True) -> None:
        if column.name in self.columns and not replace:
            raise LayerscopeError(f"column '{column.name}' already present")
        self.columns[column.name] = column

    # ------------------------------------------------------------------ the result contract
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def report_table(self) -> "ScoreTable":
        return self

    def report_html(self, title: str | None = None) -> str:
        from layerscope.report.render import render_report

        return render_report(self, title=title)

    def summary(self, k: int = 5) -> str:
        """The model and data, then the k least important units by every ranking metric."""
        p = self.provenance
        wall = f", {p.wall_time_s:.1f} s" if p.wall_time_s is not None else ""
        lines = [f"{p.model_id} ({p.model_family}, {p.num_layers} blocks) on {p.calibration_source}, "
                 f"{p.calibration_tokens} tokens{wall}"]
        for name, col in self.columns.items():
            if col.direction is None or col.unit == "head":
                continue
            least = self.least_important(name, k)
            lines.append(f"  {name:<36} ({col.direction}): " + (f"least important {', '.join(map(str, least))}"
                                                              if least else "no ranking (not measured or no variation)"))
        lines += [f"  skipped {m}: {why}" for m, why in p.skipped.items()]
        return "\n".join(lines)

    # ------------------------------------------------------------------ files
    def to_json(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.model_dump(mode="json"))

    @classmethod
    def from_json(cls, path: str | Path) -> "ScoreTable":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LayerscopeError(f"score table not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LayerscopeError(f"{path} is not a layerscope score table (invalid JSON: {exc})") from None
        if not isinstance(data, dict) or "schema_version" not in data:
            raise LayerscopeError(f"{path} is not a layerscope score table (no schema_version)")
        major = str(data["schema_version"]).split(".")[0]
        if major != SCHEMA_VERSION.split(".")[0]:
            raise LayerscopeError(f"{path} has schema version {data['schema_version']}; this layerscope reads {SCHEMA_VERSION}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:  # pydantic's message is long; keep the first line
            raise LayerscopeError(f"{path} is not a valid score table: {str(exc).splitlines()[0]}") from None

    def to_csv_text(self) -> str:
        """One row per (layer, unit); one column per metric. Head metrics are expanded per head."""
        metrics = sorted({c.metric for c in self.columns.values()})
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["layer", "unit", "head", *metrics])
        for unit in UNITS:
            cols = {c.metric: c for c in self.columns.values() if c.unit == unit}
            if not cols:
                continue
            for layer in range(self.num_layers):
                heads = [None]
                if unit == "head":
                    heads = list(range(max(len(c.values[layer]) for c in cols.values())))
                for h in heads:
                    row = [layer, unit, "" if h is None else h]
                    for m in metrics:
                        c = cols.get(m)
                        v = None if c is None else (c.values[layer] if h is None else c.values[layer][h])
                        row.append("" if v is None else f"{v:.8g}")
                    w.writerow(row)
        return buf.getvalue()

    def to_csv(self, path: str | Path) -> Path:
        return write_text_atomic(path, self.to_csv_text())
