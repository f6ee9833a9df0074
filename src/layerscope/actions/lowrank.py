"""`lowrank`: per-layer ranks (uniform or exact under a parameter budget), plain or whitened (SVD-LLM) SVD.

Runs on the one statistics pass (engine/moments.py): the exact allocation's loss curves on a
non-sequential pass over the dense model, the factorization itself on a sequential pass (block
i+1's XᵀX from the already factorized blocks). Writes `factorized/` (safetensors with the factor
pairs; `layerscope.load` builds Linear(in, r) → Linear(r, out)), `dense/` (Ŵ = BA in place; plain
transformers loads it), the plan, a result (kind layerscope.lowrank) and a report.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from layerscope.errors import LayerscopeError
from layerscope.plans.lowrank import KEEP_GRID, LowrankPlan, RankEntry
from layerscope.results import DictResult


class LowrankResult(DictResult):
    kind = "layerscope.lowrank"

    @classmethod
    def summary_of(cls, d: dict) -> str:
        p = d["plan"]
        lines = [f"{p['method']} low rank, allocation {p['allocation']}: {p['achieved_reduction']:.4f} of the linear "
                 f"parameters removed (target {p['reduction']})"]
        if d.get("predicted_loss") is not None and d.get("measured_loss") is not None:
            lines.append(f"  loss: predicted {d['predicted_loss']:.4f}, measured {d['measured_loss']:.4f} "
                         f"({d.get('measured_loss_model', 'layer-output error')})")
        if d.get("params"):
            lines.append(f"  parameters: dense {d['params']['dense']:,}, factorized {d['params']['factorized']:,}")
        lines += [f"  {e['name']}: perplexity {e['perplexity']:.4f}" for e in d.get("evaluations") or []]
        lines += [f"  note: {n}" for n in d.get("notes") or []]
        return "\n".join(lines)

    @classmethod
    def table_of(cls, d: dict):
        from layerscope.report.extras import extras_table

        p = d["plan"]
        view = {"plan": {"method": p["method"], "pattern": "low rank", "allocation": p["allocation"],
                         "sparsity": p["reduction"], "achieved_sparsity": p["achieved_reduction"],
                         "levels": d.get("block_reduction") or [], "loss_model": p.get("loss_model")},
                "predicted_loss": d.get("predicted_loss"), "measured_loss": d.get("measured_loss"),
                "evaluations": d.get("evaluations"), "notes": d.get("notes")}
        prov = {"model_id": p["provenance"].get("source_model", ""), "num_layers": p["num_layers"],
                "weights_sha256": p["provenance"].get("weights_sha256"), "created": p["provenance"].get("created", "")}
        return extras_table({"sparsify": view}, prov)


def _say(quiet: bool):
    return (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))


def _linear_only(_n, m) -> bool:
    import torch.nn as nn

    return isinstance(m, nn.Linear)


def _rank(shape, keep: float) -> int | None:
    from layerscope.compress.lowrank import rank_for_keep

    return None if keep >= 1.0 else rank_for_keep(tuple(shape), keep)


def _entry(name, block, linear, shape, rank) -> RankEntry:
    params = shape[0] * shape[1] if rank is None else rank * (shape[0] + shape[1])
    return RankEntry(name=name, block=block, linear=linear, shape=list(shape), rank=rank, params=params)


EXACT_LOSSES = ("fisher", "relative")


def check_exact_loss(loss: str) -> None:
    if loss not in EXACT_LOSSES:
        raise LayerscopeError(f"--exact-loss must be one of {', '.join(EXACT_LOSSES)}, got '{loss}'")
LOSS_MODELS = {
    "fisher": "predicted ΔNLL (nats/token) ½ Σ_j F_j (E M Eᵀ)_jj of each layer truncated alone, E = W − Ŵ, "
              "M = XᵀX/tokens, F = mean squared gradient of the NLL at the layer's outputs (one backward pass), summed",
    "relative": "relative layer-output error ‖(W−Ŵ)X‖²/‖WX‖² on the dense model's calibration XᵀX, summed",
}


def loss_curves(parts, ids, method: str, damp: float, keeps, loss: str = "fisher", log=lambda m: None,
                blocks: set[int] | None = None) -> dict[str, list[float]]:
    """{layer: [loss at each keep fraction]} on the dense model's statistics (see LOSS_MODELS).

    "relative" weighs every layer alike, so a 10 % error in a k_proj counts as much as one in a down_proj;
    "fisher" weighs each output channel by how much the model's loss reacts to it (as quantize's measured
    allocation does, compress.quant_stats), so the sum predicts the change of the model's own loss.
    blocks: measure only the layers of these blocks; every curve comes from the dense model alone, so it does
    not depend on which other blocks are measured (`lowrank_parallel.loss_curves_ray`).
    """
    from layerscope.compress.lowrank import factorize, fisher_loss, relative_output_error
    from layerscope.engine.moments import linear_moments

    check_exact_loss(loss)
    fisher = None
    if loss == "fisher":
        from layerscope.compress.quant_stats import output_fisher
        from layerscope.engine.runner import make_batches

        log(f"  output Fisher: one forward+backward pass over {ids.numel()} calibration tokens")
        fisher, _ = output_fisher(parts, make_batches(ids, 8)[0])
    curves: dict[str, list[float]] = {}

    def on_block(i, block, stats):
        if blocks is not None and i not in blocks:
            return
        for n, st in stats.items():
            name = f"{parts.blocks_path}.{i}.{n}"
            W = st.module.weight.data
            f = factorize(W, method, st.xtx, damp)
            row = []
            for k in keeps:
                if k >= 1:
                    row.append(0.0)
                elif fisher is not None:
                    row.append(fisher_loss(W, f.weight(_rank(W.shape, k)), st.xtx / st.tokens, fisher[name]))
                elif method == "whitened":  # exact from the singular values (SVD-LLM)
                    row.append(f.tail_loss(_rank(W.shape, k)))
                else:
                    row.append(relative_output_error(W, f.weight(_rank(W.shape, k)), st.xtx))
            curves[name] = row
        log(f"  block {i}: measured {len(stats)} layers at keep {list(keeps)}")

    linear_moments(parts, ids, on_block=on_block, sequential=False, select=_linear_only)
    return curves


def plan_lowrank(model=None, *, reduction: float, method: str = "whitened", allocation: str = "uniform",
                 tokens: int = 8192, seq_len: int = 256, damp: float = 1e-4, exact_loss: str = "fisher",
                 quiet: bool = True, trust_remote_code: bool = False, device=None, dtype=None, loaded=None,
                 ray: str | None = None) -> LowrankPlan:
    """Resolve a low-rank request into a LowrankPlan (measuring the loss curves for `exact`).

    ray: measure the exact allocation's loss curves block by block as Ray tasks (same numbers)."""
    return _resolve(model, reduction=reduction, method=method, allocation=allocation, tokens=tokens, seq_len=seq_len,
                    damp=damp, exact_loss=exact_loss, quiet=quiet, trust_remote_code=trust_remote_code,
                    device=device, dtype=dtype, loaded=loaded, ray=ray)[0]


def _resolve(model, *, reduction, method, allocation, tokens, seq_len, damp, quiet, trust_remote_code, device,
             dtype, loaded, exact_loss="fisher", ray=None):
    import datetime as _dt

    from layerscope import __version__
    from layerscope.compress.blockwise import calibration_windows
    from layerscope.compress.lowrank import METHODS
    from layerscope.model.adapter import find_parts
    from layerscope.model.loading import load_model
    from layerscope.plans.lowrank import ALLOCATIONS, achieved_reduction, check_reduction

    say = _say(quiet)
    reduction = check_reduction(reduction)
    if method not in METHODS:
        raise LayerscopeError(f"--method must be one of {', '.join(METHODS)}, got '{method}'")
    if allocation not in ALLOCATIONS:
        raise LayerscopeError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, got '{allocation}'")
    check_exact_loss(exact_loss)
    lm = loaded or load_model(model, trust_remote_code=trust_remote_code, device=device, dtype=dtype)
    parts = find_parts(lm.model)
    layers = [(f"{parts.blocks_path}.{i}.{n}", i, n, tuple(m.weight.shape))
              for i in range(parts.num_layers) for n, m in parts.block_linears(i).items() if _linear_only(n, m)]
    notes, predicted, loss_model = [], None, None
    if allocation == "uniform":
        entries = [_entry(nm, i, n, sh, _rank(sh, 1 - reduction)) for nm, i, n, sh in layers]
    else:
        from layerscope.plans.allocator import UnitOptions, allocate_exact, evaluate_choice

        if lm.tokenizer is None:
            raise LayerscopeError(f"{lm.model_id} has no tokenizer: cannot make calibration windows")
        ids = calibration_windows(lm.tokenizer, tokens, seq_len)
        keeps = list(KEEP_GRID) + [1.0]
        say(f"exact: measuring each layer's {method} truncation loss at keep {keeps} ({ids.numel()} tokens)")
        if ray:
            from layerscope.actions.lowrank_parallel import loss_curves_ray

            curves = loss_curves_ray(parts, ids, method, damp, keeps, loss=exact_loss, address=ray, log=say)
        else:
            curves = loss_curves(parts, ids, method, damp, keeps, loss=exact_loss, log=say)
        units = []
        for nm, i, n, sh in layers:
            costs = [sh[0] * sh[1] if k >= 1 else _rank(sh, k) * (sh[0] + sh[1]) for k in keeps]
            units.append(UnitOptions(nm, keeps, costs, curves[nm]))
        total = sum(sh[0] * sh[1] for *_, sh in layers)
        alloc = allocate_exact(units, (1 - reduction) * total)
        entries = [_entry(nm, i, n, sh, _rank(sh, k)) for (nm, i, n, sh), k in zip(layers, alloc.chosen)]
        predicted = alloc.predicted_loss
        loss_model = LOSS_MODELS[exact_loss]
        near = min(KEEP_GRID, key=lambda k: abs(k - (1 - reduction)))
        uni = evaluate_choice(units, [near] * len(units))
        notes.append(f"predicted total loss {predicted:.4f} vs {uni.predicted_loss:.4f} for uniform keep {near}")
    plan = LowrankPlan(
        method=method, reduction=reduction, allocation=allocation, achieved_reduction=achieved_reduction(entries),
        num_layers=parts.num_layers, blocks_path=parts.blocks_path, entries=entries,
        calibration={"source": "wikipedia:calibration", "tokens": tokens, "seq_len": seq_len}, damp=damp,
        predicted_loss=predicted, loss_model=loss_model, notes=notes,
        exact_loss=exact_loss if allocation != "uniform" else None,
        provenance={"source_model": lm.model_id, "source_path": str(lm.path) if lm.path else None,
                    "weights_sha256": lm.weights_sha256, "layerscope_version": __version__,
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    say(f"plan: {plan.achieved_reduction:.4f} of the linear parameters removed; per block "
        + " ".join(f"{r:.2f}" for r in plan.block_reduction()))
    return plan, lm


def factorize_model(parts, ids, plan: LowrankPlan, *, sequential: bool = True, log=lambda m: None
                    ) -> tuple[dict[str, tuple[Any, Any]], list[float]]:
    """Replace every planned layer's weight by B·A in place; returns ({name: (A, B)}, measured layer losses)."""
    from layerscope.compress.lowrank import factorize, relative_output_error
    from layerscope.engine.moments import linear_moments

    ranks = plan.ranks()
    factors: dict[str, tuple[Any, Any]] = {}
    losses: list[float] = []

    def on_block(i, block, stats):
        for n, st in stats.items():
            name = f"{parts.blocks_path}.{i}.{n}"
            r = ranks.get(name)
            if r is None:
                continue
            W = st.module.weight.data
            a, b = factorize(W, plan.method, st.xtx, plan.damp).factors(r)
            new = (b @ a).to(W.dtype)
            losses.append(relative_output_error(W, new, st.xtx))
            factors[name] = (a.to(W.dtype).contiguous(), b.to(W.dtype).contiguous())
            st.module.weight.data = new
        log(f"  block {i} factorized")

    linear_moments(parts, ids, on_block=on_block, sequential=sequential, select=_linear_only)
    return factors, losses


def lowrank(model=None, plan: LowrankPlan | str | Path | None = None, *, out: Path | str = "layerscope-lowrank",
            evaluate: bool = True, eval_tokens: int = 4096, check_uniform: bool = True, select_tokens: int = 2048,
            force: bool = False, quiet: bool = True, trust_remote_code: bool = False, device=None, dtype=None,
            ray: str | None = None, **request) -> LowrankResult:
    """Apply a LowrankPlan (or resolve `request` first), evaluate, and write factorized and dense exports.

    ray: run the independent work (the exact allocation's loss curves block by block, factorizing the plan and
    the uniform plan, each one's selection perplexity, the dense and the shipped model's held-out perplexity)
    as Ray tasks (actions/lowrank_parallel.py), on a local cluster ("local") or the cluster at this address;
    the result is the local run's, number for number.
    """
    from layerscope.actions.compress_jobs import Shared, eval_texts, held_out_perplexities, job_runner
    from layerscope.compress.blockwise import calibration_windows
    from layerscope.model.adapter import find_parts
    from layerscope.model.loading import load_model, resolve
    from layerscope.outputs import check_output

    say = _say(quiet)
    _, source_dir = resolve(model)
    out = check_output(out, force=force, sources=(source_dir,))
    if isinstance(plan, (str, Path)):
        plan = LowrankPlan.from_file(plan)
    if plan is None:
        plan, lm = _resolve(model, quiet=quiet, trust_remote_code=trust_remote_code, device=device, dtype=dtype,
                            loaded=None, ray=ray, **_request_defaults(request))
    else:
        if request:
            raise LayerscopeError(f"give either a plan or a request, not both ({', '.join(request)})")
        lm = load_model(model, trust_remote_code=trust_remote_code, device=device, dtype=dtype)
    parts = find_parts(lm.model)
    if plan.num_layers != parts.num_layers:
        raise LayerscopeError(f"the plan covers {plan.num_layers} blocks, the model has {parts.num_layers}")
    if evaluate and not parts.has_lm_head:
        raise LayerscopeError(f"{lm.model_id} has no causal LM head: use --no-eval")
    ids = calibration_windows(lm.tokenizer, int(plan.calibration.get("tokens", 8192)),
                              int(plan.calibration.get("seq_len", 256)))
    compare = check_uniform and parts.has_lm_head and plan.allocation != "uniform"
    shared = Shared(dense=lm.model, tokenizer=lm.tokenizer, ids=ids,
                    texts=eval_texts(lm.tokenizer, compare=compare, evaluate=evaluate, select_tokens=select_tokens,
                                     eval_tokens=eval_tokens))
    notes = list(plan.notes)
    with job_runner(shared, ray) as run:
        plan, factors, losses, selection = _factorize_and_select(lm, plan, shared, run, compare, notes, say)
        base_got = held_out_perplexities(run, lm.model) if evaluate else None
    del shared
    data = _result_data(plan, losses, notes, selection, base_got, evaluate, eval_tokens, say)
    from layerscope.model.factorized import write_lowrank

    data["plan"] = plan.model_dump(mode="json")
    data["files"], data["params"] = write_lowrank(lm, plan, factors, out, data, force=force, source_dir=source_dir)
    return LowrankResult(data)


def _request_defaults(request: dict) -> dict:
    defaults = dict(reduction=0.2, method="whitened", allocation="uniform", tokens=8192, seq_len=256, damp=1e-4,
                    exact_loss="fisher")
    unknown = set(request) - set(defaults)
    if unknown:
        raise LayerscopeError(f"unknown lowrank options: {', '.join(sorted(unknown))}")
    return {**defaults, **request}


def _factorize_and_select(lm, plan: LowrankPlan, shared, run, compare: bool, notes: list, say):
    """Factorize the plan (and, with `compare`, uniform ranks at the same budget) on copies of the dense model,
    put the better model into `lm.model`; returns (plan shipped, its factors, the plan's measured layer losses,
    the selection record or None)."""
    from layerscope.actions.compress_jobs import SELECT, compress_both
    from layerscope.actions.lowrank_parallel import factorize_job

    uniform = _uniform_plan(plan)
    say(f"factorizing ({plan.method}), sequential statistics on {shared.ids.numel()} tokens"
        + (" (and with uniform ranks at the same budget, for comparison)" if compare else ""))
    done = compress_both(run, factorize_job, plan, uniform, compare=compare)
    losses, shipped, selection = done[0]["losses"], plan, None
    if compare:
        shipped, selection = _choose(plan, uniform, done[0][SELECT], done[1][SELECT], shared, notes, say)
    job = done[0 if shipped is plan else 1]
    lm.model = job["model"]
    return shipped, job["factors"], losses, selection


def _result_data(plan: LowrankPlan, losses, notes, selection, base_got, evaluate: bool, eval_tokens: int,
                 say) -> dict[str, Any]:
    """lowrank.json's numbers: predicted vs measured loss (for the fisher loss, the held-out ΔNLL) and evaluations."""
    fisher = plan.exact_loss == "fisher"
    data: dict[str, Any] = {"kind": LowrankResult.kind, "notes": notes, "evaluations": [], "selection": selection,
                            "predicted_loss": plan.predicted_loss,
                            "measured_loss": None if fisher else float(sum(losses)),
                            "measured_loss_model": "held-out ΔNLL ln(ppl/ppl_dense)" if fisher else
                            "sum of each layer's relative output error, inputs from the factorized prefix",
                            "measured_layer_loss": losses, "block_reduction": plan.block_reduction()}
    if fisher and not evaluate:
        data["measured_loss_missing"] = "the predicted ΔNLL is checked against held-out perplexity: not run (--no-eval)"
    if evaluate:
        from layerscope.evaluation.perplexity import PerplexityProtocol

        proto = PerplexityProtocol(max_tokens=eval_tokens)
        base, got = base_got
        data["evaluations"] = [{"name": "dense", "perplexity": base},
                               {"name": f"{plan.method} {plan.allocation}", "perplexity": got}]
        data["protocol"] = proto.model_dump()
        say(f"perplexity ({proto.describe()}): dense {base:.4f}, low rank {got:.4f}")
        if fisher:
            data["measured_loss"] = math.log(got / base)
    if plan.predicted_loss is not None and data["measured_loss"] is not None:
        say(f"loss: predicted {plan.predicted_loss:.4f}, measured {data['measured_loss']:.4f} "
            f"({data['measured_loss_model']})")
    return data


def _uniform_plan(plan: LowrankPlan) -> LowrankPlan:
    """Uniform ranks at the plan's budget (what an exact plan has to beat)."""
    from layerscope.plans.lowrank import achieved_reduction

    entries = [_entry(e.name, e.block, e.linear, e.shape, _rank(e.shape, 1 - plan.reduction)) for e in plan.entries]
    return plan.model_copy(update={"allocation": "uniform", "entries": entries, "predicted_loss": None,
                                   "achieved_reduction": achieved_reduction(entries), "notes": []})


def _choose(plan: LowrankPlan, uniform: LowrankPlan, ours: float, uni: float, shared, notes: list, say):
    """Keep whichever plan has the lower selection perplexity (calibration split, the text the statistics came
    from -- never the held-out evaluation text); returns (plan shipped, selection record)."""
    from layerscope.actions.compress_jobs import SELECT

    selection = {"protocol": shared.texts[SELECT][0].model_dump(), "plan_perplexity": ours, "uniform_perplexity": uni}
    if uni < ours:
        msg = (f"the {plan.allocation} ranks measure worse than uniform ranks at the same budget ({ours:.4f} vs "
               f"{uni:.4f} selection perplexity): shipping the uniform plan")
        say(msg)
        notes.append(msg)
        uniform.notes.append(msg)
        return uniform, {**selection, "shipped": "uniform"}
    notes.append(f"{plan.allocation} ranks {ours:.4f} vs uniform {uni:.4f} selection perplexity: shipping the "
                 f"{plan.allocation} plan")
    return plan, {**selection, "shipped": plan.allocation}
