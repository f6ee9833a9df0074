"""QuantPlan: a bit width and group size for every linear layer of every block, and how it is chosen.

`build_plan` measures what the allocator needs (quant_sensitivity, or any ScoreTable metric times
the measured weight distortion), then solves the exact allocation under the bits-per-weight budget
(`plans.allocate`); the baselines are uniform and llama.cpp's layer rule. `layerscope quantize
--dry-run` prints the plan; `--plan FILE` applies it as written.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from layerscope.compress.quant import Scheme
from layerscope.errors import LayerscopeError
from layerscope.plans.base import Plan


class PlanEntry(BaseModel):
    name: str  # full module name, e.g. model.layers.3.self_attn.q_proj
    block: int
    linear: str  # name inside the block
    sublayer: str  # attention | mlp
    shape: list[int]  # [out, in]
    bits: int
    group_size: int
    bpw: float  # storage bits per weight of this layer in `fmt`


class QuantPlan(Plan):
    kind = "quantize"

    strategy: str = Field(description="milp | uniform | llamacpp | random")
    by: str | None = Field(None, description="what ranked the layers (metric name, quant_sensitivity, ...)")
    granularity: str = "block"
    method: str = "rtn"
    fmt: str = "hqq"
    budget_bpw: float | None = None
    achieved_bpw: float
    nominal_bits: float = Field(description="parameter-weighted mean bit width, without scales/zeros")
    objective: float | None = None
    options: list[dict] = Field(default_factory=list)
    num_layers: int
    blocks_path: str = ""
    entries: list[PlanEntry]
    notes: list[str] = Field(default_factory=list)
    provenance: dict[str, Any] = Field(default_factory=dict)

    def assignment(self) -> dict[str, Scheme]:
        return {e.name: Scheme(e.bits, e.group_size, self.method) for e in self.entries}

    def block_labels(self) -> list[str]:
        """Per block: '4b/g64' when uniform inside the block, else 'mixed'."""
        out = []
        for i in range(self.num_layers):
            labels = {Scheme(e.bits, e.group_size).label for e in self.entries if e.block == i}
            out.append(labels.pop() if len(labels) == 1 else ("mixed" if labels else "-"))
        return out

    def block_bits(self) -> list[float]:
        """Parameter-weighted mean nominal bits per block."""
        out = []
        for i in range(self.num_layers):
            es = [e for e in self.entries if e.block == i]
            n = sum(e.shape[0] * e.shape[1] for e in es)
            out.append(sum(e.bits * e.shape[0] * e.shape[1] for e in es) / n if n else float("nan"))
        return out


def build_plan(lm, parts, *, budget: float, bits: list[int], groups: list[int], by: str, method: str, fmt: str,
               granularity: str, scores=None, tokens: int = 2048, seq_len: int = 512, progress: bool = False,
               log=lambda m: None):
    """(plan, score table used or None). Raises LayerscopeError on bad input before any long work."""
    from layerscope.compress.quant import check_linear
    from layerscope.metrics.ground_truth.quant_sensitivity import (
        kl_from_details,
        measure_scores,
    )
    from layerscope.plans.allocate import (
        allocate,
        check_budget,
        cost_matrix,
        errors_from_importance,
        errors_from_kl,
        llamacpp_plan,
        make_units,
        model_layers,
        orient,
        parse_options,
        relative_mse_table,
        total_params,
        uniform_for_budget,
    )

    layers = model_layers(parts)
    options = parse_options(bits, groups, method)
    modules = dict(parts.model.named_modules())
    for l in layers:  # a layer the library cannot quantize -> one clear line, before any long work
        for s in options:
            check_linear(l.name, modules[l.name], s)
    n = total_params(layers)
    check_budget(budget, cost_matrix(layers, make_units(layers, "block"), options, fmt), n, options, fmt)
    L = parts.num_layers
    common = dict(num_layers=L, blocks_path=parts.blocks_path)
    if by == "uniform":
        plans = uniform_for_budget(layers, options, budget, fmt=fmt, **common)
        if not plans or plans[0].achieved_bpw > budget + 1e-12:
            raise LayerscopeError(f"no uniform option fits {budget:g} bpw")
        return plans[0], None
    if by == "llamacpp":
        return llamacpp_plan(layers, options, budget, fmt=fmt, **common), None

    weights = {l.name: modules[l.name].weight.data for l in layers}
    mse = relative_mse_table(layers, options, weights)
    table = scores
    if by == "quant_sensitivity":
        kl = None
        if table is not None and "quant_sensitivity" in table.columns:
            kl = kl_from_details(table.column("quant_sensitivity").details)
        if not kl:
            qbits = sorted({s.bits for s in options if s.quantized})
            log(f"measuring quant_sensitivity at {qbits} bits, group {groups[0]} on {tokens} calibration tokens")
            table = measure_scores(lm.model, lm.tokenizer, bits=qbits, group_size=groups[0], method=method,
                                   tokens=tokens, seq_len=seq_len, progress=progress)
            table.provenance.model_id = lm.model_id
            table.provenance.weights_sha256 = lm.weights_sha256
            kl = kl_from_details(table.column("quant_sensitivity").details)
        plan = allocate(layers, options, budget, lambda units: errors_from_kl(kl, layers, units, options, mse),
                        fmt=fmt, granularity=granularity, by="quant_sensitivity (measured KL)", **common)
        return plan, table
    # any other ScoreTable metric: importance x measured weight distortion
    if table is None:
        from layerscope.metrics.scan import scan

        base = by.split("@")[0]
        log(f"scoring the layers with '{base}' on {tokens} calibration tokens")
        try:
            table = scan(lm.model, None, [base], tokenizer=lm.tokenizer, tokens=tokens, seq_len=seq_len,
                         progress=progress)
        except LayerscopeError as exc:
            if "unknown metric" in str(exc) and by not in ("",):
                raise LayerscopeError(f"--by '{by}': {exc}") from None
            raise
    col = table.column(by)
    if col.unit not in ("block",):
        raise LayerscopeError(f"--by '{by}' is a per-{col.unit} column; use a per-block metric")
    imp = orient(table.values(by), col.direction)
    per_layer = None
    if granularity == "linear":  # use the sublayer columns when the table has them
        sub = {}
        for unit in ("attention", "mlp"):
            key = f"{col.metric}@{unit}"
            if key in table.columns and table.columns[key].direction == col.direction:
                sub[unit] = orient(table.values(key), col.direction)
        if sub:
            per_layer = [float(sub.get(l.sublayer, imp)[l.block]) for l in layers]
    plan = allocate(layers, options, budget,
                    lambda units: errors_from_importance(imp, layers, units, mse, per_layer),
                    fmt=fmt, granularity=granularity, by=by, **common)
    return plan, table
