"""Remove blocks, attention or MLP sublayers, chosen by a ScoreTable metric, into a loadable model.

Block removal writes a standard Hugging Face directory: the kept blocks renumbered, the config's
layer count and every per-layer setting (``layer_types``, ...) subset to match, tokenizer and
generation config copied. Plain ``AutoModelForCausalLM.from_pretrained(DIR)`` loads it.

Attention/MLP removal cannot change the architecture that plain transformers builds, so the
written directory computes the pruned network with the sublayers' output projections (weight and
bias) set to zero; ``layerscope_pruned.json`` lists the skipped sublayers and
``layerscope.load(DIR)`` returns a model that does not compute them at all.

Both write ``layerscope_pruned.json`` (provenance: source model and weights hash, what was
removed, by which metric, the scores, the layerscope version); block removal also writes a
mergekit passthrough recipe (``mergekit.yaml``) that rebuilds the same model from the source.
"""
from __future__ import annotations

import datetime as _dt
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from layerscope.engine.removal import (
    apply_block_removal,
    check_count,
    check_removal,
    check_unit,
    num_units,
    removed_in_memory,
    zero_sublayers,
)
from layerscope.errors import LayerscopeError

PRUNED_JSON = "layerscope_pruned.json"
MERGEKIT_YAML = "mergekit.yaml"

# Files of a model directory that describe the tokenizer / sentence-transformers pipeline.
_SIDE_FILE_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                       "*.model", "chat_template.*", "preprocessor_config.json", "modules.json",
                       "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling")


# ============================================================================ input checks


def parse_units(text: str | Sequence[int]) -> list[int]:
    """'3,7,9' (ranges like '4-6' allowed) -> [3, 7, 9]."""
    if not isinstance(text, str):
        return [int(i) for i in text]
    out: list[int] = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        try:
            if "-" in item[1:]:
                a, b = item[0] + item[1:].split("-", 1)[0], item[1:].split("-", 1)[1]
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(item))
        except ValueError:
            raise LayerscopeError(f"--units expects unit indices like 3,7,9 (got '{item}')") from None
    if not out:
        raise LayerscopeError("--units is empty")
    return out


def check_output(out: Path, source_dir: Path | None, force: bool) -> None:
    """Refuse an existing output (without force) and any output that overlaps the source model."""
    from layerscope.outputs import is_inside

    if source_dir is not None:
        if is_inside(out, source_dir):
            raise LayerscopeError(f"output {out} is inside the source model directory {source_dir}; choose another --out")
        if is_inside(source_dir, out):
            raise LayerscopeError(f"output {out} contains the source model directory {source_dir}; choose another --out")
    if out.exists() and not force:
        raise LayerscopeError(f"output directory {out} already exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise LayerscopeError(f"output {out} exists and is not a directory")


# ============================================================================ config surgery


# ============================================================================ sublayers


# ============================================================================ selection

def source_metric(column: str) -> str | None:
    """The registered metric that produces score column `column` (None if unknown)."""
    from layerscope.metrics import METRICS

    base = column.split("@", 1)[0]
    if base in METRICS:
        return base
    cands = [m for m in METRICS if base.startswith(m)]
    return max(cands, key=len) if cands else None


def _scan(model: nn.Module, tokenizer: Any, by: str, scan_options: dict[str, Any], base_table=None):
    from layerscope.metrics.scan import scan

    metric = source_metric(by)
    if metric is not None:
        metrics: Any = [metric]
    elif base_table is not None:
        metrics = base_table.provenance.options.get("metrics") or None
    else:
        metrics = None
    opts = dict(scan_options)
    data = opts.pop("data", None)
    return scan(model, data, metrics, tokenizer=tokenizer, **opts)


def _column_key(table, by: str, unit: str) -> str:
    return table.column(by, unit).name


@dataclass
class Selection:
    removed: list[int]
    by: str | None  # score column name; None for an explicit --units list
    iterative: bool = False
    scores: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    scores_source: str | None = None
    scan_provenance: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"method": "explicit" if self.by is None else ("iterative" if self.iterative else "one-shot"),
                "by": self.by, "scores_source": self.scores_source, "scores": self.scores,
                "rounds": self.rounds, "scan": self.scan_provenance}


def select_units(model: nn.Module, tokenizer: Any, unit: str, k: int, by: str, table=None,
                 iterative: bool = False, scan_options: dict[str, Any] | None = None,
                 scores_source: str | None = None, progress: Any = None) -> Selection:
    """The k least important units by score column `by` (re-scanning after each removal if iterative)."""
    check_unit(unit)
    scan_options = dict(scan_options or {})
    n = num_units(model, unit)
    check_count(k, n, unit)
    if table is None:
        table = _scan(model, tokenizer, by, scan_options)
        scores_source = scores_source or "scan"
    key = _column_key(table, by, unit)
    col = table.column(key)
    if col.direction is None:
        raise LayerscopeError(f"metric '{col.name}' is descriptive: it has no importance direction")
    if table.num_layers != n:
        raise LayerscopeError(f"the score table has {table.num_layers} layers but the model has {n}")
    sel = Selection(removed=[], by=key, iterative=iterative, scores_source=scores_source,
                    scores={"values": col.values, "direction": col.direction, "definition": col.definition},
                    scan_provenance=_prov_summary(table))
    if not iterative:
        ranking = table.ranking(key)
        if len(ranking) < k:
            raise LayerscopeError(f"metric '{key}' is defined for only {len(ranking)} units; cannot pick {k}")
        sel.removed = sorted(ranking[:k])
        return sel
    # iterative: remove one unit, re-score the pruned model, repeat
    current = list(range(n))  # current index -> original index
    removed: list[int] = []
    for r in range(k):
        if r > 0:
            with removed_in_memory(model, unit, removed):
                table = _scan(model, tokenizer, key, scan_options, base_table=table)
        ranking = [current[i] if unit == "block" else i for i in table.ranking(key)]
        vals = table.values(key)
        choice = next((i for i in ranking if i not in removed), None)
        if choice is None:
            raise LayerscopeError(f"metric '{key}' ranks no remaining unit in round {r + 1}")
        cur_i = current.index(choice) if unit == "block" else choice
        sel.rounds.append({"round": r + 1, "removed": choice, "score": _f(vals[cur_i]),
                           "ranking": [i for i in ranking if i not in removed]})
        removed.append(choice)
        if unit == "block":
            current.remove(choice)
        if progress:
            progress(r + 1, choice)
    sel.removed = sorted(removed)
    return sel


def _f(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if x == x else None


def _prov_summary(table) -> dict[str, Any]:
    p = table.provenance
    return {"model_id": p.model_id, "calibration_source": p.calibration_source,
            "calibration_tokens": p.calibration_tokens, "seq_len": p.seq_len, "seed": p.seed,
            "layerscope_version": p.layerscope_version, "created": p.created}


# ============================================================================ writing

def mergekit_yaml(source: str, keep: Sequence[int], dtype: str, removed: Sequence[int]) -> str:
    """A mergekit passthrough recipe that rebuilds the block-pruned model from the source."""
    ranges: list[list[int]] = []
    for i in keep:
        if ranges and ranges[-1][1] == i:
            ranges[-1][1] = i + 1
        else:
            ranges.append([i, i + 1])
    src = json.dumps(str(source))
    lines = [f"# layerscope: source model without blocks {', '.join(map(str, removed))}",
             "# layer_range is [start, end) as in mergekit", "slices:"]
    for a, b in ranges:
        lines += ["  - sources:", f"      - model: {src}", f"        layer_range: [{a}, {b}]"]
    lines += ["merge_method: passthrough", f"dtype: {dtype}", ""]
    return "\n".join(lines)


def _copy_side_files(source_dir: Path | None, tokenizer: Any, dest: Path) -> list[str]:
    copied: list[str] = []
    if source_dir is not None:
        for pattern in _SIDE_FILE_PATTERNS:
            for f in sorted(source_dir.glob(pattern)):
                target = dest / f.name
                if target.exists():
                    continue
                if f.is_dir():
                    shutil.copytree(f, target)
                else:
                    shutil.copy2(f, target)
                copied.append(f.name)
    if not copied and tokenizer is not None:
        tokenizer.save_pretrained(str(dest))
        copied.append("tokenizer (saved)")
    return copied


def _dtype_name(model: nn.Module) -> str:
    return str(next(model.parameters()).dtype).replace("torch.", "")


def _local_config(path: Path | None) -> dict | None:
    """config.json of a local model directory as a dict (None if absent or unreadable)."""
    if path is None:
        return None
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def source_dtype(path: Path | None) -> torch.dtype | None:
    """The dtype a local model directory stores (config 'dtype'/'torch_dtype'), else None."""
    cfg = _local_config(path)
    if cfg is None:
        return None
    name = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype")
    dt = getattr(torch, str(name), None) if name else None
    return dt if isinstance(dt, torch.dtype) else None


def config_layers(path: Path | None) -> int | None:
    """Number of blocks a local model directory's config declares (None if it cannot tell)."""
    cfg = _local_config(path)
    if cfg is None:
        return None
    for c in (cfg, cfg.get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(c.get(key), int):
                return int(c[key])
    return None


def quiet_transformers() -> None:
    """No per-file progress bars from transformers in the command line's output."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


@dataclass
class PruneResult:
    out: Path
    unit: str
    removed: list[int]
    kept: list[int]
    provenance: dict[str, Any]


def write_pruned(model: nn.Module, tokenizer: Any, unit: str, selection: Selection, out: str | Path, *,
                 source_id: str, source_dir: Path | None, weights_sha256: str | None,
                 force: bool = False) -> PruneResult:
    """Remove `selection.removed` from `model` (in place: the model is changed) and write `out`."""
    from layerscope import __version__
    from layerscope.model.adapter import find_parts
    from layerscope.outputs import atomic_directory, write_json_atomic

    check_unit(unit)
    out = Path(out)
    check_output(out, source_dir, force)
    parts = find_parts(model)
    n = parts.num_layers
    removed = check_removal(selection.removed, n, unit)
    keep = [i for i in range(n) if i not in set(removed)]
    prov: dict[str, Any] = {
        "layerscope_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"model_id": source_id, "path": str(source_dir) if source_dir else None,
                   "weights_sha256": weights_sha256, "family": parts.family, "num_layers": n,
                   "dtype": _dtype_name(model)},
        "unit": unit,
        "removed": removed,
        "kept": keep,
        "selection": selection.to_json(),
    }
    with atomic_directory(out, force=force) as tmp:
        if unit == "block":
            changes = apply_block_removal(model, removed)
            prov["config_changes"] = changes
            prov["skipped_sublayers"] = {}
            prov["block_map"] = {str(j): i for j, i in enumerate(keep)}  # new index -> source index
            prov["load"] = "transformers.AutoModelForCausalLM.from_pretrained(DIR) (a standard model)"
        else:
            zeroed = zero_sublayers(model, unit, removed)
            prov["skipped_sublayers"] = {unit: removed}
            prov["zeroed_parameters"] = zeroed
            prov["load"] = ("plain transformers computes the pruned network with zeroed output projections; "
                            "layerscope.load(DIR) skips the sublayers' computation")
        model.save_pretrained(str(tmp), safe_serialization=True)
        prov["side_files"] = _copy_side_files(source_dir, tokenizer, tmp)
        if unit == "block":
            (tmp / MERGEKIT_YAML).write_text(
                mergekit_yaml(str(source_dir or source_id), keep, _dtype_name(model), removed), encoding="utf-8")
            prov["mergekit"] = MERGEKIT_YAML
        write_json_atomic(tmp / PRUNED_JSON, prov)
    return PruneResult(out=out, unit=unit, removed=removed, kept=keep, provenance=prov)


def prune(model: str | None = None, *, out: str | Path, remove: int | None = None, unit: str = "block",
          by: str | None = None, scores: str | Path | None = None, units: str | Sequence[int] | None = None,
          iterative: bool = False, force: bool = False, scan_options: dict[str, Any] | None = None,
          trust_remote_code: bool = False) -> PruneResult:
    """Remove K units (the least important by `by`, or the explicit `units`) and write a model to `out`."""
    from layerscope.metrics.table import ScoreTable
    from layerscope.model.loading import load_model, resolve

    check_unit(unit)
    if units is None and remove is None:
        raise LayerscopeError("say what to remove: --remove K (with --by METRIC) or --units 3,7,9")
    if units is not None and remove is not None and len(parse_units(units)) != remove:
        raise LayerscopeError("--remove and --units disagree on the number of units")
    if units is None and by is None:
        raise LayerscopeError("--remove K needs --by METRIC (a score column, e.g. block_influence)")
    if units is None and by is not None and scores is None and source_metric(by) is None:
        from layerscope.metrics import METRICS

        raise LayerscopeError(f"unknown metric '{by}' (known: {', '.join(sorted(METRICS))}; or pass --scores)")
    if remove is not None and remove < 1:
        raise LayerscopeError("--remove must be at least 1")
    out = Path(out)
    _, source_dir = resolve(model)
    check_output(out, source_dir, force)
    table = ScoreTable.from_json(scores) if scores is not None else None
    if table is not None and by is not None:
        table.column(by, unit)  # unknown metric: fail before loading the model
    n_cfg = config_layers(source_dir)  # bad counts and indices: fail before loading the model
    if n_cfg is not None:
        if units is not None:
            check_removal(parse_units(units), n_cfg, unit)
        else:
            check_count(int(remove), n_cfg, unit)
    loaded = load_model(model, trust_remote_code=trust_remote_code, dtype=source_dtype(source_dir))
    n = num_units(loaded.model, unit)
    if units is not None:
        idx = check_removal(parse_units(units), n, unit)
        sel = Selection(removed=idx, by=None)
        if by is not None and table is not None:
            sel.by, sel.scores = table.column(by, unit).name, {"values": table.column(by, unit).values}
    else:
        check_count(int(remove), n, unit)
        sel = select_units(loaded.model, loaded.tokenizer, unit, int(remove), by, table=table,
                           iterative=iterative, scan_options=scan_options,
                           scores_source=str(scores) if scores is not None else None)
    return write_pruned(loaded.model, loaded.tokenizer, unit, sel, out, source_id=loaded.model_id,
                        source_dir=source_dir, weights_sha256=loaded.weights_sha256, force=force)
