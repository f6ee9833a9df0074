"""`sparsify`: per-block sparsity (uniform, OWL, exact, metric:NAME), pruned by magnitude, Wanda or SparseGPT.

Everything runs on the one statistics pass (engine/moments.py): OWL's outlier ratios and the exact
allocator's loss curves on a non-sequential pass over the dense model, the pruning itself on a
sequential pass (block i+1's statistics from the already pruned blocks 0..i, as SparseGPT and
Wanda do). Writes a plain HF directory with the zeros in place, an llm-compressor recipe with the
per-block sparsity list, the plan, a result (kind layerscope.sparsify) and a report.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from layerscope.errors import LayerscopeError
from layerscope.plans.sparsify import SparsifyPlan
from layerscope.results import DictResult


class SparsifyResult(DictResult):
    """What `sparsify` did (sparsify.json): the plan, predicted vs measured loss, evaluations, files."""

    kind = "layerscope.sparsify"

    @classmethod
    def summary_of(cls, d: dict) -> str:
        p = d["plan"]
        lines = [f"{p['method']} {p['pattern']} at {p['achieved_sparsity']:.4f} sparsity, allocation {p['allocation']}"]
        if d.get("predicted_loss") is not None:
            lines.append(f"  block-output loss: predicted {d['predicted_loss']:.5f}, measured {d['measured_loss']:.5f}")
        lines += [f"  {e['name']}: perplexity {e['perplexity']:.4f}" for e in d.get("evaluations") or []]
        lines += [f"  note: {n}" for n in d.get("notes") or []]
        return "\n".join(lines)

    @classmethod
    def table_of(cls, d: dict):
        from layerscope.report.extras import extras_table

        p = d["plan"]
        prov = {"model_id": p["provenance"].get("source_model", ""), "num_layers": p["num_layers"],
                "weights_sha256": p["provenance"].get("weights_sha256"), "created": p["provenance"].get("created", "")}
        return extras_table({"sparsify": d}, prov)


def _say(quiet: bool):
    return (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))


def _block_params(parts, select) -> list[int]:
    return [sum(m.weight.numel() for n, m in parts.block_linears(i).items() if select(n, m))
            for i in range(parts.num_layers)]


def _linear_only(_name, m) -> bool:
    import torch.nn as nn

    return isinstance(m, nn.Linear)


# ------------------------------------------------------------------------------------------ passes
def owl_ratios(parts, ids, m: float, batch_size: int = 8) -> list[float]:
    """OWL's outlier ratio (LOD, %) of every block from Wanda scores on the dense model."""
    from layerscope.compress.sparse import wanda_score
    from layerscope.engine.moments import linear_moments
    from layerscope.plans.sparsify import outlier_ratio

    out: list[float] = []

    def on_block(i, block, stats):
        out.append(outlier_ratio([wanda_score(st.module.weight, st.col_norms()) for st in stats.values()], m))

    linear_moments(parts, ids, on_block=on_block, sequential=False, select=_linear_only, batch_size=batch_size)
    return out


def loss_curves(parts, ids, method: str, pattern: str, levels: list[float], *, damp: float = 0.01,
                batch_size: int = 8, tap_batches: int = 2, loss: str = "output_kl", loss_tokens: int = 1024,
                log=lambda m: None, blocks: set[int] | None = None) -> list[list[float] | None]:
    """[block][level] loss of the block pruned alone at each level, every other block dense.

    loss "output_kl": KL(dense ‖ pruned) of the model's next-token distributions, nats/token, on the first
    `loss_tokens` calibration tokens (compress.blockwise.OutputTap); "block_error": the block's own relative
    output error on `tap_batches` batches (BlockTap). Statistics from a non-sequential pass over the dense model.
    blocks: measure only these blocks (the others' rows are None); every block's statistics come from the
    dense model, so a block's row does not depend on which other blocks are measured
    (`sparsify_parallel.loss_curves_ray`).
    """
    from layerscope.compress.blockwise import BlockTap, OutputTap, swapped_weights
    from layerscope.compress.sparse import prune_weight
    from layerscope.engine.moments import linear_moments

    check_exact_loss(loss)
    curves: list[list[float] | None] = []
    tap = BlockTap(parts.blocks, tap_batches if loss == "block_error" else 0)
    out = None
    if loss == "output_kl":
        out = OutputTap(parts, ids[:_loss_rows(ids, loss_tokens)])

    def on_block(i, block, stats):
        if blocks is not None and i not in blocks:
            tap.release(i)
            curves.append(None)
            return
        mods = {n: st.module for n, st in stats.items()}
        row = []
        for s in levels:
            new = {n: prune_weight(method, st.module.weight.data, s, pattern, st, damp) for n, st in stats.items()}
            with swapped_weights(mods, new):
                row.append(out.kl(i) if out is not None else tap.error(i))
        tap.release(i)
        curves.append(row)
        log(f"  block {i}: loss " + " ".join(f"{s:.2f}:{e:.4g}" for s, e in zip(levels, row)))

    with tap.attached():
        linear_moments(parts, ids, on_block=on_block, sequential=False, select=_linear_only, batch_size=batch_size)
    return curves


def _loss_rows(ids, loss_tokens: int) -> int:
    """Calibration windows holding the first `loss_tokens` tokens (at least one)."""
    return max(1, min(ids.shape[0], -(-loss_tokens // ids.shape[1])))


EXACT_LOSSES = ("output_kl", "block_error")


def check_exact_loss(loss: str) -> None:
    if loss not in EXACT_LOSSES:
        raise LayerscopeError(f"--exact-loss must be one of {', '.join(EXACT_LOSSES)}, got '{loss}'")
LOSS_MODELS = {
    "output_kl": "KL(dense ‖ block i pruned alone by {method}) of the next-token distributions, nats/token on {n} "
                 "calibration tokens through the rest of the model, made non-decreasing in sparsity, summed over blocks",
    "block_error": "relative block-output error Σ‖B̂(h)−B(h)‖²/Σ‖B(h)‖² of each block pruned alone by {method} "
                   "(dense inputs), made non-decreasing in sparsity, summed over blocks",
}


def prune_model(parts, ids, method: str, pattern: str, levels: list[float], *, damp: float = 0.01,
                batch_size: int = 8, tap_batches: int = 2, sequential: bool = True) -> list[float]:
    """Prune every block in place at its level (sequential statistics); returns each block's measured loss."""
    from layerscope.compress.blockwise import BlockTap
    from layerscope.compress.sparse import prune_weight
    from layerscope.engine.moments import linear_moments

    measured: list[float] = []
    tap = BlockTap(parts.blocks, tap_batches)
    select = _linear_only if method != "magnitude" else (lambda n, m: False)

    def on_block(i, block, stats):
        linears = {n: m for n, m in parts.block_linears(i).items() if _linear_only(n, m)}
        for n, mod in linears.items():
            mod.weight.data = prune_weight(method, mod.weight.data, levels[i], pattern, stats.get(n), damp)
        measured.append(tap.error(i))
        tap.release(i)

    with tap.attached():
        linear_moments(parts, ids, on_block=on_block, sequential=sequential, select=select, batch_size=batch_size)
    return measured


# ------------------------------------------------------------------------------------------ plan
def plan_sparsify(model=None, *, sparsity: float, method: str = "wanda", pattern: str = "unstructured",
                  allocation: str = "uniform", tokens: int = 8192, seq_len: int = 256, owl_lambda: float = 0.08,
                  owl_m: float = 5.0, damp: float = 0.01, scores=None, level_step: float = 0.05, level_span: int = 3,
                  exact_loss: str = "output_kl", exact_loss_tokens: int = 1024, quiet: bool = True,
                  trust_remote_code: bool = False, device=None, dtype=None, loaded=None,
                  ray: str | None = None) -> SparsifyPlan:
    """Resolve a sparsify request into a SparsifyPlan (measuring what the allocation needs).

    ray: measure the exact allocation's loss curves block by block as Ray tasks (same numbers)."""
    return _resolve(model, sparsity=sparsity, method=method, pattern=pattern, allocation=allocation, tokens=tokens,
                    seq_len=seq_len, owl_lambda=owl_lambda, owl_m=owl_m, damp=damp, scores=scores,
                    level_step=level_step, level_span=level_span, exact_loss=exact_loss,
                    exact_loss_tokens=exact_loss_tokens, quiet=quiet, trust_remote_code=trust_remote_code,
                    device=device, dtype=dtype, loaded=loaded, ray=ray)[0]


def _resolve(model, *, sparsity, method, pattern, allocation, tokens, seq_len, owl_lambda, owl_m, damp, scores,
             level_step, level_span, exact_loss, exact_loss_tokens, quiet, trust_remote_code, device, dtype, loaded,
             ray=None):
    import datetime as _dt

    from layerscope import __version__
    from layerscope.compress.blockwise import calibration_windows
    from layerscope.compress.sparse import METHODS, check_sparsity, parse_pattern
    from layerscope.model.adapter import find_parts
    from layerscope.model.loading import load_model
    from layerscope.plans import sparsify as sp

    say = _say(quiet)
    if method not in METHODS:
        raise LayerscopeError(f"--method must be one of {', '.join(METHODS)}, got '{method}'")
    n, m = parse_pattern(pattern)
    kind, metric = sp.parse_allocation(allocation)
    check_exact_loss(exact_loss)
    sparsity = (1 - n / m) if m else check_sparsity(sparsity, "--sparsity")
    if tokens < seq_len or seq_len < 2:
        raise LayerscopeError("--tokens must be at least --seq-len (and --seq-len at least 2)")
    lm = loaded or load_model(model, trust_remote_code=trust_remote_code, device=device, dtype=dtype)
    parts = find_parts(lm.model)
    L = parts.num_layers
    bp = _block_params(parts, _linear_only)
    if lm.tokenizer is None:
        raise LayerscopeError(f"{lm.model_id} has no tokenizer: cannot make calibration windows")
    notes: list[str] = []
    ids = None
    if kind != "uniform" and not m:
        ids = calibration_windows(lm.tokenizer, tokens, seq_len)
    score_row, predicted, loss_model = None, None, None
    if m:
        levels = [sparsity] * L
        if kind != "uniform":
            notes.append(f"pattern {pattern}: every block is at {sparsity:g} sparsity, allocation '{allocation}' "
                         "has nothing to choose (uniform)")
    elif kind == "uniform":
        levels = [sparsity] * L
    elif kind == "owl":
        say(f"OWL: outlier ratios (M={owl_m:g}) from Wanda scores on {ids.numel()} calibration tokens")
        score_row = owl_ratios(parts, ids, owl_m)
        levels = sp.spread_levels(score_row, sparsity, owl_lambda, block_params=bp)
    elif kind == "metric":
        values, direction = _metric_column(lm, metric, scores, tokens, seq_len, L)
        score_row = [None if v != v else float(v) for v in values]
        from layerscope.plans.allocate import orient

        imp = orient(values, direction)
        levels = sp.spread_levels(list(imp), sparsity, owl_lambda, block_params=bp)
    else:  # exact
        from layerscope.plans.allocator import UnitOptions, allocate_exact, evaluate_choice

        grid = sp.candidate_levels(sparsity, level_step, level_span)
        say(f"exact: measuring each block's loss at sparsity {grid} with {method} ({ids.numel()} calibration tokens)")
        options = dict(damp=damp, loss=exact_loss, loss_tokens=exact_loss_tokens)
        if ray:
            from layerscope.actions.sparsify_parallel import loss_curves_ray

            curves = loss_curves_ray(parts, ids, method, pattern, grid, address=ray, log=say, **options)
        else:
            curves = loss_curves(parts, ids, method, pattern, grid, log=say, **options)
        # pruning more never helps: the measured curve is made non-decreasing in sparsity (a dip at a higher level
        # is measurement noise on a few batches and would pull the plan past the budget's sparsity)
        curves = [[float(x) for x in np.maximum.accumulate(np.asarray(c, dtype=float))] for c in curves]
        units = [sp_unit(UnitOptions, i, grid, curves[i], bp[i]) for i in range(L)]
        cap = (1 - sparsity) * sum(bp)
        alloc = allocate_exact(units, cap * (1 + 1e-9))
        levels = [float(x) for x in alloc.chosen]
        predicted = alloc.predicted_loss
        uni = evaluate_choice(units, [min(grid, key=lambda g: abs(g - sparsity))] * L)
        loss_model = LOSS_MODELS[exact_loss].format(method=method, n=_loss_rows(ids, exact_loss_tokens) * ids.shape[1])
        notes.append(f"predicted total loss {predicted:.5f} vs {uni.predicted_loss:.5f} for uniform on the same model")
        score_row = [float(c[grid.index(s)]) for c, s in zip(curves, levels)]
    plan = sp.SparsifyPlan(
        method=method, pattern=pattern, sparsity=sparsity, allocation=allocation, levels=levels, block_params=bp,
        achieved_sparsity=sp.achieved(levels, bp), num_layers=L, blocks_path=parts.blocks_path,
        calibration={"source": "wikipedia:calibration", "tokens": tokens, "seq_len": seq_len}, damp=damp,
        owl_lambda=owl_lambda, owl_m=owl_m, scores=score_row, predicted_loss=predicted, loss_model=loss_model,
        exact_loss=exact_loss, exact_loss_tokens=exact_loss_tokens, notes=notes,
        provenance={"source_model": lm.model_id, "source_path": str(lm.path) if lm.path else None,
                    "weights_sha256": lm.weights_sha256, "layerscope_version": __version__,
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "covers": "the nn.Linear layers of every block; embeddings, norms and the head stay dense"})
    say("plan: sparsity per block " + " ".join(f"{s:.2f}" for s in levels))
    return plan.check(), lm, ids


def sp_unit(cls, i: int, grid: list[float], curve: list[float], params: int):
    return cls(name=f"block {i}", options=list(grid), cost=[params * (1 - s) for s in grid], loss=list(curve))


def _metric_column(lm, metric: str, scores, tokens: int, seq_len: int, num_layers: int):
    """(per-block values, direction) of a ScoreTable metric, from --scores or a scan of the model."""
    from layerscope.metrics.table import ScoreTable

    if scores is not None:
        table = scores if isinstance(scores, ScoreTable) else ScoreTable.from_json(scores)
        table.check_same_model(lm.weights_sha256, num_layers, where=scores)
    else:
        from layerscope.metrics.scan import scan

        table = scan(lm.model, metrics=[metric], tokenizer=lm.tokenizer, tokens=tokens, seq_len=seq_len)
    col = table.column(metric)
    if col.direction is None:
        raise LayerscopeError(f"metric '{metric}' is descriptive (no direction): it cannot rank blocks")
    return list(table.values(metric)), col.direction


# ------------------------------------------------------------------------------------------ apply
def sparsify(model=None, plan: SparsifyPlan | str | Path | None = None, *, out: Path | str = "layerscope-sparse",
             evaluate: bool = True, eval_tokens: int = 4096, check_uniform: bool = True, select_tokens: int = 2048,
             force: bool = False, quiet: bool = True, trust_remote_code: bool = False, device=None, dtype=None,
             ray: str | None = None, **request) -> SparsifyResult:
    """Apply a SparsifyPlan (or resolve `request` with `plan_sparsify` first) and write the sparse model.

    A non-uniform plan is checked against the uniform plan at the same sparsity (perplexity on the
    first `select_tokens` calibration tokens, not the held-out text): the better one is shipped and
    the comparison recorded.

    ray: run the independent evaluations (the exact allocation's loss curves block by block, pruning the plan
    and the uniform plan, each one's selection perplexity, the dense and the shipped model's held-out
    perplexity) as Ray tasks (actions/sparsify_parallel.py), on a local cluster ("local") or the cluster at
    this address; the result is the local run's, number for number.
    """
    from layerscope.actions.compress_jobs import job_runner
    from layerscope.actions.sparsify_parallel import shared_inputs
    from layerscope.compress.blockwise import calibration_windows
    from layerscope.model.adapter import find_parts
    from layerscope.model.loading import load_model, resolve
    from layerscope.outputs import check_output

    say = _say(quiet)
    if eval_tokens < 2:
        raise LayerscopeError("--eval-tokens must be at least 2")
    _, source_dir = resolve(model)
    out = check_output(out, force=force, sources=(source_dir,))
    if isinstance(plan, (str, Path)):
        plan = SparsifyPlan.from_file(plan).check()
    if plan is None:
        plan, lm, _ = _resolve(model, quiet=quiet, trust_remote_code=trust_remote_code, device=device, dtype=dtype,
                               loaded=None, ray=ray, **_request_defaults(request))
    else:
        if request:
            raise LayerscopeError(f"give either a plan or a request, not both ({', '.join(request)})")
        lm = load_model(model, trust_remote_code=trust_remote_code, device=device, dtype=dtype)
        sha = plan.provenance.get("weights_sha256")
        if sha and lm.weights_sha256 and sha != lm.weights_sha256:
            raise LayerscopeError(f"the plan was made for other weights (sha256 {sha[:12]}… vs {lm.weights_sha256[:12]}…)")
    parts = find_parts(lm.model)
    if plan.num_layers != parts.num_layers:
        raise LayerscopeError(f"the plan covers {plan.num_layers} blocks, the model has {parts.num_layers}")
    has_head = parts.has_lm_head
    if evaluate and not has_head:
        raise LayerscopeError(f"{lm.model_id} has no causal LM head: use --no-eval")
    cal = plan.calibration
    ids = calibration_windows(lm.tokenizer, int(cal.get("tokens", 8192)), int(cal.get("seq_len", 256)))
    compare = check_uniform and has_head and plan.levels != [plan.sparsity] * plan.num_layers
    data: dict[str, Any] = {"kind": SparsifyResult.kind, "notes": list(plan.notes), "evaluations": []}
    shared = shared_inputs(lm, plan, ids, evaluate=evaluate, compare=compare, eval_tokens=eval_tokens,
                           select_tokens=select_tokens)
    with job_runner(shared, ray) as run:
        shipped = _prune_and_select(lm, plan, ids, shared, run, compare, data, say)
        if evaluate:
            _evaluate_held_out(lm, shipped, shared, run, data, say)
    del shared
    from layerscope.actions.export.sparse import write_sparse

    data["plan"] = shipped.model_dump(mode="json")
    data["files"] = write_sparse(lm, shipped, out, data, force=force, source_dir=source_dir)
    result = SparsifyResult(data)
    return result


def _request_defaults(request: dict) -> dict:
    defaults = dict(sparsity=0.5, method="wanda", pattern="unstructured", allocation="uniform", tokens=8192,
                    seq_len=256, owl_lambda=0.08, owl_m=5.0, damp=0.01, scores=None, level_step=0.05, level_span=3,
                    exact_loss="output_kl", exact_loss_tokens=1024)
    unknown = set(request) - set(defaults)
    if unknown:
        raise LayerscopeError(f"unknown sparsify options: {', '.join(sorted(unknown))}")
    return {**defaults, **request}


def _prune_and_select(lm, plan: SparsifyPlan, ids, shared, run, compare: bool, data: dict, say) -> SparsifyPlan:
    """Prune the plan (and, with `compare`, the uniform plan) on copies of the dense model, record the
    measured loss, put the better model into `lm.model`; returns the plan shipped."""
    from layerscope.actions.compress_jobs import compress_both
    from layerscope.actions.sparsify_parallel import prune_job

    uniform = _uniform_plan(plan)
    say(f"pruning with {plan.method} ({plan.pattern}), sequential statistics on {ids.numel()} tokens"
        + (" (and the uniform plan at the same sparsity, for comparison)" if compare else ""))
    pruned = compress_both(run, prune_job, (plan.levels, shared.options["kl_rows"] is not None),
                           (uniform.levels, False), compare=compare)
    data["measured_block_loss"] = pruned[0]["measured"]
    data["predicted_loss"] = plan.predicted_loss
    _record_measured_loss(data, pruned[0])
    if plan.predicted_loss is not None:
        say(f"loss: predicted {plan.predicted_loss:.5f}, measured {data['measured_loss']:.5f} "
            f"({data['measured_loss_model']})")
    shipped = _choose(plan, uniform, pruned[0]["select"], pruned[1]["select"], shared, data, say) if compare else plan
    lm.model = pruned[0 if shipped is plan else 1]["model"]
    return shipped


def _evaluate_held_out(lm, shipped: SparsifyPlan, shared, run, data: dict, say) -> None:
    """Held-out perplexity of the dense and the shipped model (two independent jobs)."""
    from layerscope.actions.compress_jobs import held_out_perplexities

    base, got = held_out_perplexities(run, lm.model)
    data["evaluations"] = [{"name": "dense", "sparsity": 0.0, "perplexity": base},
                           {"name": f"{shipped.method} {shipped.allocation}", "sparsity": shipped.achieved_sparsity,
                            "perplexity": got}]
    proto = shared.texts["held_out"][0]
    data["protocol"] = proto.model_dump()
    say(f"perplexity ({proto.describe()}): dense {base:.4f}, sparse {got:.4f}")


def _record_measured_loss(data: dict, plan_job: dict) -> None:
    """The plan's measured loss: the curves' output KL with every block pruned at once (so interactions
    show) when it was measured, else the sum of the blocks' own output errors."""
    if "kl" in plan_job:
        data["measured_loss"] = plan_job["kl"]
        data["measured_loss_model"] = "KL(dense ‖ pruned model), nats/token, same calibration tokens as the curves"
    else:
        data["measured_loss"] = float(sum(plan_job["measured"]))
        data["measured_loss_model"] = "sum of each block's relative output error, inputs from the pruned prefix"


def _uniform_plan(plan: SparsifyPlan) -> SparsifyPlan:
    """The uniform plan at the plan's sparsity (what a non-uniform plan has to beat)."""
    return plan.model_copy(update={"allocation": "uniform", "levels": [plan.sparsity] * plan.num_layers,
                                   "achieved_sparsity": plan.sparsity, "predicted_loss": None, "scores": None,
                                   "notes": []})


def _choose(plan: SparsifyPlan, uniform: SparsifyPlan, ours: float, uni: float, shared, data: dict,
            say) -> SparsifyPlan:
    """Keep whichever plan has the lower selection perplexity; record the comparison in `data`."""
    data["selection"] = {"protocol": shared.texts["select"][0].model_dump(), "plan_perplexity": ours,
                         "uniform_perplexity": uni,
                         "text": "calibration split (what the pruners saw), not the held-out evaluation text"}
    if uni < ours:
        msg = (f"the {plan.allocation} plan measures worse than uniform at the same sparsity ({ours:.4f} vs "
               f"{uni:.4f} selection perplexity): shipping the uniform plan")
        say(msg)
        data["notes"].append(msg)
        data["shipped"] = "uniform"
        uniform.notes.append(msg)
        return uniform
    data["shipped"] = plan.allocation
    data["notes"].append(f"{plan.allocation} plan {ours:.4f} vs uniform {uni:.4f} selection perplexity: shipping "
                         f"the {plan.allocation} plan")
    return plan
