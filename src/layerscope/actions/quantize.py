"""Apply a QuantPlan: evaluate it, save the quantized model, export the plan to other tools."""
from __future__ import annotations

from pathlib import Path

from layerscope.errors import LayerscopeError
from layerscope.plans.quantize import QuantPlan, build_plan
from layerscope.results import Result


class QuantizeResult(Result):
    """What `quantize` did (quantize.json, kind layerscope.quantize): the plan, its evaluation, the exports."""

    kind = "layerscope.quantize"

    def __init__(self, plan: QuantPlan, evaluations: list[dict], exported: dict, out: Path):
        self.plan, self.evaluations, self.exported, self.out = plan, evaluations, exported, out

    def to_dict(self) -> dict:
        return {"plan": self.plan.model_dump(mode="json"), "evaluations": self.evaluations,
                "exported": self.exported, "out": str(self.out)}

    @classmethod
    def summary_of(cls, d: dict) -> str:
        p = d["plan"]
        lines = [f"plan {p['by']} ({p['strategy']}): {p['achieved_bpw']:.4f} bpw in the {p['fmt']} format "
                 f"for a {p['budget_bpw']} bpw budget"]
        lines += [f"  {e['name']}: perplexity {e['perplexity']:.4f}" for e in d.get("evaluations") or []]
        return "\n".join(lines)

    @classmethod
    def table_of(cls, d: dict):
        from layerscope.evaluation.quant_sweep import PRE_ROUNDED_NOTE
        from layerscope.report.extras import extras_table

        p = d["plan"]
        prov = {"model_id": p["provenance"].get("source_model", ""), "num_layers": p["num_layers"],
                "weights_sha256": p["provenance"].get("weights_sha256"), "created": p["provenance"].get("created", "")}
        q = {"plan": p, "evaluations": d.get("evaluations") or None, "notes": [PRE_ROUNDED_NOTE]}
        return extras_table({"quantization": q}, prov)


def plan_quantize(model=None, *, budget: str | float, bits: str | list[int] = "2,3,4,8", group: str | list[int] = "64",
                  by: str = "measured", scores=None, granularity: str = "block", method: str = "rtn",
                  fmt: str = "hqq", tokens: int = 2048, quiet: bool = True, trust_remote_code: bool = False,
                  device: str | None = None, dtype=None, loaded=None, act_order: bool = False,
                  damp: float = 0.1, exact_loss: str = "token_fisher", search: bool = True,
                  search_tokens: int = 4096, ray: str | None = None, offload: bool | None = None) -> QuantPlan:
    """Resolve a quantization request (budget, allowed bits and groups, what ranks the layers) into a QuantPlan.
    `ray`: the search's plan measurements as Ray tasks ("local" cluster or an address; same numbers)."""
    return resolve_quant_plan(model, budget=budget, bits=bits, group=group, by=by, scores=scores,
                              granularity=granularity, method=method, fmt=fmt, tokens=tokens, quiet=quiet,
                              trust_remote_code=trust_remote_code, device=device, dtype=dtype, loaded=loaded,
                              act_order=act_order, damp=damp, exact_loss=exact_loss, search=search,
                              search_tokens=search_tokens, ray=ray, offload=offload)[0]


def resolve_quant_plan(model=None, *, budget, bits="2,3,4,8", group="64", by="measured", scores=None,
                       granularity="block", method="rtn", fmt="hqq", tokens=2048, quiet=True,
                       trust_remote_code=False, device=None, dtype=None, loaded=None, act_order=False, damp=0.1,
                       out=None, force=False, resume=False, state=None, exact_loss="token_fisher", search=True,
                       search_tokens=4096, ray=None, offload=None):
    """`plan_quantize`, also returning (score table used or None, the loaded model)."""
    import datetime as _dt
    import math

    from layerscope import __version__
    from layerscope.compress.quant import FORMATS, check_scheme, parse_bits
    from layerscope.metrics.table import ScoreTable
    from layerscope.model.adapter import find_parts
    from layerscope.model.loading import load_model
    from layerscope.parsing import int_list, number

    say = _logger(quiet)
    bud = number(budget, "--budget")
    bit_list = parse_bits(bits)
    groups = sorted(int_list(group, "--group"))
    for g in groups:
        check_scheme(4, g, method)
    if granularity not in ("block", "linear"):
        raise LayerscopeError(f"--granularity must be block or linear, got '{granularity}'")
    if fmt not in FORMATS:
        raise LayerscopeError(f"--cost-format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if tokens < 1:
        raise LayerscopeError("--tokens must be positive")
    from layerscope.compress.quant_stats import LOSS_MODELS

    if exact_loss not in LOSS_MODELS:
        raise LayerscopeError(f"--exact-loss must be one of {', '.join(LOSS_MODELS)}, got '{exact_loss}'")
    table = None
    if scores is not None:
        table = scores if isinstance(scores, ScoreTable) else ScoreTable.from_json(scores)
    lm = loaded or load_model(model, trust_remote_code=trust_remote_code, device=device, dtype=dtype, offload=offload)
    parts = find_parts(lm.model)
    from layerscope.model.offload import from_disk

    if by == "measured" and from_disk(lm.model):
        from layerscope.actions.quantize_streamed import NOT_OUT_OF_CORE

        raise LayerscopeError(NOT_OUT_OF_CORE)
    if table is not None:
        table.check_same_model(lm.weights_sha256, parts.num_layers, where=scores)
    if not parts.has_lm_head and by == "quant_sensitivity":
        raise LayerscopeError(f"{lm.model_id} has no causal LM head: use --by METRIC")
    if by == "measured" or method == "gptq":  # per-linear losses measured for every candidate (plans.quant_measured)
        from layerscope.actions.quantize_measured import plan_measured
        from layerscope.plans.allocate import check_budget, cost_matrix, make_units, model_layers, parse_options, total_params

        if damp < 0 or not math.isfinite(damp):
            raise LayerscopeError(f"--damp must be a non-negative number, got {damp}")
        options = parse_options(bit_list, groups, method)
        layers = model_layers(parts)
        check_budget(bud, cost_matrix(layers, make_units(layers, "block"), options, fmt), total_params(layers),
                     options, fmt)
        plan, st = plan_measured(lm, parts, budget=bud, options=options, by=by, fmt=fmt, tokens=tokens, damp=damp,
                                 act_order=act_order, out=out, force=force, resume=resume,
                                 sources=(lm.path,) if lm.path else (), log=say, loss_model=exact_loss,
                                 search=search, search_tokens=search_tokens, ray=ray)
        if state is not None:
            state.update(st)
        measured_losses, search_trials = st.get("losses"), st.get("search")
        used_table = None
    else:
        if resume:
            raise LayerscopeError("--resume continues the measured allocation (--by measured or --method gptq)")
        measured_losses = search_trials = None
        plan, used_table = build_plan(lm, parts, budget=bud, bits=bit_list, groups=groups, by=by, method=method,
                                      fmt=fmt, granularity=granularity, scores=table, tokens=tokens,
                                      progress=not quiet, log=say)
    plan.provenance = {
        "source_model": lm.model_id,
        "source_path": str(lm.path) if lm.path else None,
        "weights_sha256": lm.weights_sha256,
        "metric": by,
        "scores": str(scores) if scores is not None and not isinstance(scores, ScoreTable)
        else ("measured" if used_table is not None else None),
        "budget_bpw": bud,
        "achieved_bpw": plan.achieved_bpw,
        "cost_format": fmt,
        "bits": bit_list,
        "group_sizes": groups,
        "method": method,
        "granularity": "linear" if by == "measured" else granularity,
        "act_order": act_order if method == "gptq" else None,
        "damp": damp if method == "gptq" else None,
        "exact_loss": measured_losses.loss_model if measured_losses is not None else None,
        "joint_uniform_plans": measured_losses.joint if measured_losses is not None else None,
        "search": search_trials,
        "layerscope_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "covers": "the linear layers of every block; embeddings, norms and the output head are not quantized",
    }
    if lm.model_id == "smollm2":
        from layerscope.evaluation.quant_sweep import PRE_ROUNDED_NOTE

        plan.notes.append(PRE_ROUNDED_NOTE)
    say(f"plan: {plan.achieved_bpw:.4f} bpw ({fmt}) for a {bud:g} bpw budget; blocks: " + " ".join(plan.block_labels()))
    return plan, used_table, lm


def _logger(quiet: bool):
    import sys

    return (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr))


def quantize(model=None, plan: QuantPlan | str | Path | None = None, *, out: Path | str = "layerscope-quant",
             export: str | None = None, evaluate: bool = True, eval_tokens: int = 16384, save_model: bool = True,
             force: bool = False, quiet: bool = True, trust_remote_code: bool = False, device: str | None = None,
             dtype=None, resume: bool = False, sequential: bool = False, ray: str | None = None,
             offload: bool | None = None, **request):
    """Apply a QuantPlan (or resolve `request` into one with `plan_quantize` first): evaluate it on
    held-out text, save the quantized model, export the plan. Returns the QuantizeResult.

    Saved model: GPTQ plans as compressed-tensors pack-quantized safetensors (plain transformers
    loads them); rtn/hqq plans (HQQ's grid) only as HQQ's pickle-based qmodel.pt with
    export='hqq-pickle'. `resume` continues the measurement checkpoint in `out`. `ray`: the plan
    measurements (search trials, held-out evaluations) as Ray tasks, with the local run's numbers.
    `offload`: stream the blocks from the shards (out-of-core; None: when the weights do not fit) --
    the model is then quantized, written and evaluated one block at a time (actions.quantize_streamed)."""
    from layerscope.actions.export.quant import parse_exports
    from layerscope.model.adapter import find_parts
    from layerscope.model.loading import load_model, resolve
    from layerscope.outputs import check_output, output_dir, write_json_atomic, write_text_atomic

    say = _logger(quiet)
    formats = parse_exports(export)
    pickle_model = "hqq-pickle" in formats
    formats = [f for f in formats if f != "hqq-pickle"]
    if eval_tokens < 2:
        raise LayerscopeError("--eval-tokens must be at least 2")
    _, source_dir = resolve(model)
    out = check_output(out, force=force, sources=(source_dir,))
    used_table = None
    state: dict = {}
    if isinstance(plan, (str, Path)):
        plan = QuantPlan.from_file(plan)
    if plan is None:
        plan, used_table, lm = resolve_quant_plan(model, quiet=quiet, trust_remote_code=trust_remote_code,
                                                  device=device, dtype=dtype, out=out, force=force, resume=resume,
                                                  state=state, ray=ray, offload=offload, **request)
    else:
        if request:
            raise LayerscopeError(f"give either a plan or a request, not both ({', '.join(request)})")
        lm = load_model(model, trust_remote_code=trust_remote_code, device=device, dtype=dtype, offload=offload)
        sha = plan.provenance.get("weights_sha256")
        if sha and lm.weights_sha256 and sha != lm.weights_sha256:
            raise LayerscopeError(f"the plan was made for other weights (sha256 {sha[:12]}… vs {lm.weights_sha256[:12]}…)")
        if plan.method == "gptq":
            state = {"options": [], "damp": plan.provenance.get("damp") or 0.1,
                     "act_order": bool(plan.provenance.get("act_order")), "tokens": 2048, "seq_len": 512}
    parts = find_parts(lm.model)
    if (evaluate or plan.method == "gptq") and not parts.has_lm_head:
        raise LayerscopeError(f"{lm.model_id} has no causal LM head: use --no-eval")
    if plan.method == "gptq" and not state.get("tokens"):
        state.update(tokens=2048, seq_len=512, damp=0.1, act_order=False, options=[])
    pre_rounded = lm.model_id == "smollm2"
    from layerscope.model.offload import from_disk

    streamed = from_disk(lm.model)
    if streamed and pickle_model:
        raise LayerscopeError("--export hqq-pickle holds the whole model in memory; it is not available out of core")
    evaluations, weights, qweights = [], None, {}
    if evaluate and not streamed and (state or plan.method == "gptq"):  # streamed: inside the output directory
        from layerscope.actions.quantize_measured import evaluate_against_uniform

        ev = evaluate_against_uniform(lm, parts, plan, state, eval_tokens=eval_tokens, sequential=sequential, say=say,
                                      ray=ray)
        evaluations, plan = ev["rows"], ev["plan"]
        (weights, qweights), eval_ids = ev["weights"], ev["ids"]
        if pre_rounded:
            evaluations[0]["name"] += " (dequantized Q4_1 fp32)"
    elif evaluate and not streamed:
        from layerscope.evaluation.perplexity import PerplexityProtocol
        from layerscope.evaluation.quant_sweep import Evaluator

        proto = PerplexityProtocol(max_tokens=eval_tokens)
        ev = Evaluator(lm.model, lm.tokenizer, proto)
        say(f"evaluating held-out perplexity ({proto.describe()})")
        base = ev.perplexity(None)
        q = ev.perplexity(plan.assignment())
        evaluations = [
            {"name": "unquantized" + (" (dequantized Q4_1 fp32)" if pre_rounded else ""), "bpw": 32.0,
             "perplexity": base},
            {"name": f"plan ({plan.by})", "bpw": plan.achieved_bpw, "perplexity": q},
        ]
        plan.provenance["evaluation"] = {"protocol": proto.model_dump(), "unquantized_perplexity": base,
                                         "plan_perplexity": q, "path": "fake-quant (bit-exact HQQ dequantized weights), fp32 compute"}
        say(f"perplexity: unquantized {base:.4f}, plan {q:.4f} ({(q / base - 1) * 100:+.2f} %)")
    if plan.method == "gptq" and save_model and weights is None and not streamed:
        from layerscope.actions.quantize_measured import planned_weights

        weights, qweights = planned_weights(lm, parts, plan, state, sequential=sequential, log=say)
    with output_dir(out, verb="quantize", force=force, sources=(source_dir,)) as tmp:
        streamed_export = None
        if streamed:
            evaluations, streamed_export = _quantize_streamed(lm, parts, plan, state, tmp / "model", evaluate=evaluate,
                                                              eval_tokens=eval_tokens, save_model=save_model,
                                                              sequential=sequential, say=say)
        plan.save(tmp / "plan.json")
        if used_table is not None:
            used_table.to_json(tmp / "scores.json")
        exported = {}
        if formats:
            from layerscope.actions.export.quant import write_exports

            exported = write_exports(plan, formats, tmp / "export", model=lm.model,
                                     model_type=getattr(lm.model.config, "model_type", "llama"))
            write_json_atomic(tmp / "export" / "validation.json", exported)
        saved = None
        if streamed_export is not None:
            exported["compressed-tensors model"] = streamed_export
            saved = "compressed-tensors"
        elif save_model and plan.method == "gptq" and not streamed:
            saved = _save_compressed(lm, weights, qweights, tmp / "model", exported, say,
                                     eval_ids if evaluate else None)
        elif save_model and pickle_model:
            _save_hqq_pickle(lm, plan, tmp / "model", say)
            saved = "hqq-pickle"
            exported["hqq-pickle"] = {"files": ["model/qmodel.pt", "model/config.json"],
                                      "validated_by": "HQQLinear.dequantize() == the evaluated fake-quant weights"}
        elif save_model:
            note = (f"no model saved: the {plan.method} plan uses HQQ's grid (float zero points, groups across rows), "
                    "which compressed-tensors cannot hold; use --method gptq for a compressed-tensors model, or "
                    "--export hqq-pickle for HQQ's pickle-based qmodel.pt")
            say(note)
            plan.notes.append(note)
        write_text_atomic(tmp / "README.md", _readme(plan, evaluations, exported, saved))
        result = QuantizeResult(plan, evaluations, exported, out)
        result.to_json(tmp / "quantize.json")
        from layerscope.report import render_report

        if used_table is not None:  # the measured scores with the plan on top
            from layerscope.evaluation.quant_sweep import attach

            attach(used_table, plan=plan, evaluations=evaluations or None)
            write_text_atomic(tmp / "report.html", render_report(used_table))
        else:
            write_text_atomic(tmp / "report.html", result.report_html())
    return result


def _quantize_streamed(lm, parts, plan, state, directory, *, evaluate, eval_tokens, save_model, sequential, say):
    """Out of core: GPTQ plans quantized and written block by block, then evaluated from the written
    files; other plans evaluated with each block rounded as it loads. Returns (evaluations, export
    record or None)."""
    from layerscope.actions import quantize_streamed as qs

    if plan.method == "gptq" and not state.get("tokens"):
        state.update(tokens=2048, seq_len=512, damp=0.1, act_order=False, options=[])
    export = None
    if plan.method == "gptq" and save_model:
        say("out of core: quantizing and writing the compressed-tensors model one block at a time")
        written = qs.write_quantized(lm, parts, plan, state, directory, sequential=sequential, log=say)
        files = sorted(p.name for p in directory.iterdir())
        export = {"files": [f"model/{f}" for f in files], "bytes": written["bytes"],
                  "roundtrip_max_abs_diff": written["roundtrip_max_abs_diff"],
                  "validated_by": "each packed weight read back from its shard and decompressed with "
                                  "compressed-tensors equals the quantized weight; the evaluation streams the "
                                  "saved files (the whole model is not reloaded: it does not fit in memory)"}
        loaders = qs.saved_loaders(directory, written, plan)
    elif plan.method == "gptq":
        raise LayerscopeError("out of core, a gptq plan is applied while its model is written: drop --no-save-model")
    else:
        if save_model:
            note = (f"no model saved: the {plan.method} plan uses HQQ's grid, which compressed-tensors cannot hold "
                    "(out of core, use --method gptq for a saved model)")
            say(note)
            plan.notes.append(note)
        loaders = qs.rounded_loaders(plan)
    evaluations = qs.evaluate_streamed(lm, plan, loaders, eval_tokens=eval_tokens, say=say) if evaluate else []
    return evaluations, export


def _save_compressed(lm, weights, qweights, directory, exported, say, ids=None) -> str:
    """The GPTQ model as compressed-tensors pack-quantized; reloaded with plain transformers and compared."""
    from layerscope.actions.export.compressed import save_compressed, validate_reload

    say("saving the model as compressed-tensors pack-quantized safetensors")
    modules = dict(lm.model.named_modules())
    original = {n: modules[n].weight.data for n in weights}
    try:
        for n, w in weights.items():
            modules[n].weight.data = w
        files = save_compressed(lm.model, qweights, directory, lm.tokenizer)
        check = ids[: min(len(ids), 256)][None, :] if ids is not None else torch_randint(lm)
        diff = validate_reload(directory, lm.model, check)
    finally:
        for n, w in original.items():
            modules[n].weight.data = w
    say(f"reloaded with transformers.AutoModelForCausalLM: max |logit difference| {diff:.3g}")
    exported["compressed-tensors model"] = {
        "files": [f"model/{f}" for f in files], "max_abs_logit_diff": diff,
        "validated_by": "transformers.AutoModelForCausalLM.from_pretrained (compressed-tensors), logits compared"}
    return "compressed-tensors"


def torch_randint(lm):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, int(lm.model.config.vocab_size), (1, 64), generator=g)


def _save_hqq_pickle(lm, plan, directory, say) -> None:
    import torch

    from layerscope.compress.quant import fake_quant, hqq_layers, quantize_model_hqq, save_hqq_model

    expected = {}
    for e in plan.entries:  # what the saved layers must dequantize to
        if e.bits != 16:
            expected[e.name] = fake_quant(lm.model.get_submodule(e.name).weight.data, plan.assignment()[e.name])
    say("applying the plan with HQQ (HQQLinear, float16 compute) and saving HQQ's pickle format (--export hqq-pickle)")
    quantize_model_hqq(lm.model, plan.assignment())
    for name, layer in hqq_layers(lm.model):
        if not torch.equal(layer.dequantize().float(), expected[name].float()):
            raise LayerscopeError(f"HQQ layer {name} does not reproduce the evaluated fake-quant weights")
    save_hqq_model(lm.model, directory)
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(str(directory))


def _readme(plan, evaluations, exported, saved: str | None) -> str:
    lines = [f"# Mixed-precision plan ({plan.by})", "",
             f"Budget {plan.budget_bpw} bpw, achieved {plan.achieved_bpw:.4f} bpw counted in the {plan.fmt} format "
             f"(scales and zeros included; nominal {plan.nominal_bits:.3f} bits). Source: "
             f"{plan.provenance.get('source_model')} (sha256 {plan.provenance.get('weights_sha256')}).", ""]
    lines += [f"- {n}" for n in plan.notes]
    lines += ["", "| block | scheme |", "|---|---|"]
    lines += [f"| {i} | {lab} |" for i, lab in enumerate(plan.block_labels())]
    if evaluations:
        lines += ["", "| model | bpw | perplexity |", "|---|---|---|"]
        lines += [f"| {e['name']} | {e['bpw']:.4f} | {e['perplexity']:.4f} |" for e in evaluations]
    if saved == "compressed-tensors":
        lines += ["", "## Load the quantized model (compressed-tensors pack-quantized)", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  "model = AutoModelForCausalLM.from_pretrained('model')  # needs compressed-tensors",
                  "tokenizer = AutoTokenizer.from_pretrained('model')", "```"]
    if saved == "hqq-pickle":
        lines += ["", "## Load the quantized model (HQQ)", "", "```python", "import torch",
                  "from hqq.models.hf.base import AutoHQQHFModel", "from transformers import AutoTokenizer", "",
                  "model = AutoHQQHFModel.from_quantized('model', compute_dtype=torch.float16, device='cpu')",
                  "tokenizer = AutoTokenizer.from_pretrained('model')", "```"]
    if exported:
        lines += ["", "## Exports", ""]
        lines += [f"- {k}: {', '.join(v['files'])} (validated by {v['validated_by']})" for k, v in exported.items()]
    return "\n".join(lines) + "\n"
