"""PrunePlan: which blocks / attention / MLP sublayers to remove, and why -- and how it is chosen.

`plan_prune(...)` turns a request ("the 7 least important blocks by block_influence", or an
explicit list) into a resolved plan: the unit indices, the scores that chose them and the scan
they came from. `layerscope prune --dry-run` prints that plan as YAML; `--plan FILE` applies it
without scoring again, so the same plan always gives the same model.
"""
from __future__ import annotations

from typing import Any, Literal, Sequence

from pydantic import Field

from layerscope.engine.removal import (
    check_count,
    check_removal,
    check_unit,
    num_units,
    removed_in_memory,
)
from layerscope.errors import LayerscopeError
from layerscope.plans.base import Plan


class PrunePlan(Plan):
    kind = "prune"

    unit: Literal["block", "attention", "mlp"] = "block"
    remove: list[int] = Field(description="indices of the units to remove (source model numbering)")
    method: Literal["explicit", "one-shot", "iterative"] = "explicit"
    by: str | None = Field(None, description="score column that ranked the units")
    model: str | None = Field(None, description="the model the plan was made for, as given")
    weights_sha256: str | None = Field(None, description="its weights; a plan is refused on other weights")
    num_units: int | None = None
    scores: dict[str, Any] = Field(default_factory=dict, description="values, direction, definition of `by`")
    scores_source: str | None = None
    rounds: list[dict[str, Any]] = Field(default_factory=list, description="iterative: one entry per removal")
    scan: dict[str, Any] | None = Field(None, description="provenance of the scan that produced the scores")

    def describe(self) -> str:
        noun = "blocks" if self.unit == "block" else f"{self.unit} sublayers"
        how = f"by {self.by} ({self.method})" if self.by and self.method != "explicit" else "as listed"
        return f"remove {noun} {', '.join(map(str, self.remove))} {how}"


def metric_for_column(column: str) -> str | None:
    """The registered metric that produces score column `column` (None if unknown)."""
    from layerscope.metrics import METRICS

    base = column.split("@", 1)[0]
    if base in METRICS:
        return base
    cands = [m for m in METRICS if base.startswith(m)]
    return max(cands, key=len) if cands else None


def _scan(model, tokenizer, by: str, scan_options: dict[str, Any], base_table=None):
    from layerscope.metrics.scan import scan

    metric = metric_for_column(by)
    if metric is not None:
        metrics: Any = [metric]
    elif base_table is not None:
        metrics = base_table.provenance.options.get("metrics") or None
    else:
        metrics = None
    opts = dict(scan_options)
    data = opts.pop("data", None)
    return scan(model, data, metrics, tokenizer=tokenizer, **opts)


def _f(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if x == x else None


def _scan_summary(table) -> dict[str, Any]:
    p = table.provenance
    return {"model_id": p.model_id, "calibration_source": p.calibration_source,
            "calibration_tokens": p.calibration_tokens, "seq_len": p.seq_len, "seed": p.seed,
            "layerscope_version": p.layerscope_version, "created": p.created}


def plan_from_table(table, unit: str, k: int, by: str, scores_source: str | None = None,
                    method: str = "one-shot") -> PrunePlan:
    """The plan removing the k units that score column `by` of `table` ranks least important."""
    col = table.column(table.column(by, unit).name)
    if col.direction is None:
        raise LayerscopeError(f"metric '{col.name}' is descriptive: it has no importance direction")
    n = table.num_layers
    check_count(k, n, unit)
    plan = PrunePlan(unit=unit, remove=[], by=col.name, method=method, num_units=n, scores_source=scores_source,
                     scan=_scan_summary(table),
                     scores={"values": col.values, "direction": col.direction, "definition": col.definition})
    if method == "one-shot":
        ranking = table.ranking(col.name)
        if len(ranking) < k:
            raise LayerscopeError(f"metric '{col.name}' is defined for only {len(ranking)} units; cannot pick {k}")
        plan.remove = sorted(ranking[:k])
    return plan


def select_units(model, tokenizer, unit: str, k: int, by: str, table=None, iterative: bool = False,
                 scan_options: dict[str, Any] | None = None, scores_source: str | None = None,
                 progress: Any = None) -> PrunePlan:
    """The plan removing the k least important units of `model` by score column `by` (re-scanning
    the pruned model after each removal if `iterative`). `table` is used when given, else a scan
    runs now."""
    check_unit(unit)
    scan_options = dict(scan_options or {})
    n = num_units(model, unit)
    check_count(k, n, unit)
    if table is None:
        table = _scan(model, tokenizer, by, scan_options)
        scores_source = scores_source or "scan"
    if table.num_layers != n:
        raise LayerscopeError(f"the score table has {table.num_layers} layers but the model has {n}")
    plan = plan_from_table(table, unit, k, by, scores_source, "iterative" if iterative else "one-shot")
    if not iterative:
        return plan
    key = plan.by
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
        plan.rounds.append({"round": r + 1, "removed": choice, "score": _f(vals[cur_i]),
                            "ranking": [i for i in ranking if i not in removed]})
        removed.append(choice)
        if unit == "block":
            current.remove(choice)
        if progress:
            progress(r + 1, choice)
    plan.remove = sorted(removed)
    return plan


def plan_prune(model: Any = None, **request: Any) -> PrunePlan:
    """Resolve a pruning request into a PrunePlan.

    model: a model spec (path, hub id, alias, None = the embedded default) or a ScoreTable (then
    no model is loaded: the plan is the table's ranking). Request: remove=K with by=METRIC, or
    units=[...]; unit ('block', 'attention', 'mlp'); scores (a ScoreTable or scores.json path to rank
    with, else the metric is scanned now); iterative; scan_options; trust_remote_code.
    """
    return resolve_plan(model, **request)[0]


def resolve_plan(model: Any = None, *, remove: int | None = None, unit: str = "block", by: str | None = None,
                 scores: Any = None, units: str | Sequence[int] | None = None, iterative: bool = False,
                 scan_options: dict[str, Any] | None = None, trust_remote_code: bool = False,
                 loaded: Any = None, device: str | None = None, dtype: Any = None,
                 offload: bool | None = None) -> tuple[PrunePlan, Any]:
    """`plan_prune`, also returning the loaded model (None when the plan came from a table alone)."""
    from layerscope.metrics.table import ScoreTable
    from layerscope.model.loading import (
        config_layers,
        load_model,
        resolve,
        source_dtype,
    )

    check_unit(unit)
    if units is None and remove is None:
        raise LayerscopeError("say what to remove: --remove K (with --by METRIC) or --units 3,7,9")
    if remove is not None and remove < 1:
        raise LayerscopeError("--remove must be at least 1")
    if units is not None:
        from layerscope.parsing import int_list

        units = int_list(units, "--units")
        if remove is not None and len(units) != remove:
            raise LayerscopeError("--remove and --units disagree on the number of units")
    if units is None and by is None:
        raise LayerscopeError("--remove K needs --by METRIC (a score column, e.g. block_influence)")
    if isinstance(model, ScoreTable):
        scores, model = model, None
        if iterative:
            raise LayerscopeError("an iterative plan re-scans the pruned model: pass the model, not a table")
    table = scores if isinstance(scores, ScoreTable) or scores is None else ScoreTable.from_json(scores)
    if units is None and table is None and metric_for_column(by) is None:
        from layerscope.metrics import METRICS

        raise LayerscopeError(f"unknown metric '{by}' (known: {', '.join(sorted(METRICS))}; or pass --scores)")
    if table is not None and by is not None:
        table.column(by, unit)  # unknown metric: fail before loading the model
    source_src = str(scores) if scores is not None and not isinstance(scores, ScoreTable) else None
    if model is None and table is not None and loaded is None and not iterative:
        # rank from the table alone: no model needed
        n = table.num_layers
        if units is not None:
            return PrunePlan(unit=unit, remove=check_removal(units, n, unit), num_units=n,
                             model=table.provenance.model_id, weights_sha256=table.provenance.weights_sha256), None
        plan = plan_from_table(table, unit, int(remove), by, scores_source=source_src)
        plan.model, plan.weights_sha256 = table.provenance.model_id, table.provenance.weights_sha256
        return plan, None
    _, source_dir = resolve(model) if loaded is None else (None, loaded.path)
    n_cfg = config_layers(source_dir)  # bad counts and indices: fail before loading the model
    if n_cfg is not None:
        if units is not None:
            check_removal(units, n_cfg, unit)
        else:
            check_count(int(remove), n_cfg, unit)
    if loaded is None:
        loaded = load_model(model, trust_remote_code=trust_remote_code, dtype=dtype or source_dtype(source_dir),
                            device=device, offload=offload)
    if table is not None:
        table.check_same_model(loaded.weights_sha256, num_units(loaded.model, unit), where=source_src)
    n = num_units(loaded.model, unit)
    if units is not None:
        plan = PrunePlan(unit=unit, remove=check_removal(units, n, unit), num_units=n)
        if by is not None and table is not None:
            col = table.column(by, unit)
            plan.by, plan.scores = col.name, {"values": col.values}
    else:
        plan = select_units(loaded.model, loaded.tokenizer, unit, int(remove), by, table=table, iterative=iterative,
                            scan_options=scan_options, scores_source=source_src)
    plan.model, plan.weights_sha256 = loaded.model_id, loaded.weights_sha256
    return plan, loaded
