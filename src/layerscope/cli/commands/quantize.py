"""`layerscope quantize`: per-layer bit widths under an average-bit budget, applied with HQQ and exported."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from layerscope.errors import LayerscopeError

BASELINES = ("uniform", "llamacpp")


def _parse_groups(text: str) -> list[int]:
    out = []
    for s in (x.strip() for x in str(text).split(",")):
        if not s:
            continue
        try:
            out.append(int(s))
        except ValueError:
            raise LayerscopeError(f"group size must be an integer, got '{s}'") from None
    if not out:
        raise LayerscopeError("no group size given")
    return sorted(set(out))


def _parse_budget(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise LayerscopeError(f"--budget must be a number of bits per weight, got '{text}'") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise LayerscopeError(f"--budget must be a finite number, got '{text}'")
    return v


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


def quantize(
    model: str | None = None,
    *,
    budget: str | float,
    bits: str = "2,3,4,8",
    group: str = "64",
    by: str = "quant_sensitivity",
    scores: Path | str | None = None,
    out: Path | str = "layerscope-quant",
    export: str | None = None,
    granularity: str = "block",
    method: str = "rtn",
    fmt: str = "hqq",
    tokens: int = 2048,
    evaluate: bool = True,
    eval_tokens: int = 16384,
    save_model: bool = True,
    force: bool = False,
    quiet: bool = True,
):
    """Choose a bit width per block (or linear layer) under a bits-per-weight budget, apply it with HQQ,
    save it and export the plan; the Python face of `layerscope quantize`. Returns the plan."""
    out = Path(out)
    scores = Path(scores) if scores is not None else None
    budget = str(budget)
    import datetime as _dt

    from layerscope import __version__
    from layerscope.actions.export.quant import parse_exports
    from layerscope.compress.quant import FORMATS, check_scheme, parse_bits

    say = (lambda m: None) if quiet else (lambda m: typer.echo(m, err=True))
    # ---- validate everything cheap first
    bud = _parse_budget(budget)
    bit_list = parse_bits(bits)
    groups = _parse_groups(group)
    for g in groups:
        check_scheme(4, g, method)
    formats = parse_exports(export)
    if granularity not in ("block", "linear"):
        raise LayerscopeError(f"--granularity must be block or linear, got '{granularity}'")
    if fmt not in FORMATS:
        raise LayerscopeError(f"--cost-format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if tokens < 1 or eval_tokens < 2:
        raise LayerscopeError("--tokens and --eval-tokens must be positive")
    if out.exists() and not force:
        raise LayerscopeError(f"output directory {out} already exists (use --force to replace it)")
    table = None
    if scores is not None:
        from layerscope.metrics.table import ScoreTable

        table = ScoreTable.from_json(scores)

    from layerscope.model.adapter import find_parts
    from layerscope.model.loading import load_model
    from layerscope.outputs import (
        atomic_directory,
        is_inside,
        write_json_atomic,
        write_text_atomic,
    )

    lm = load_model(model)
    if lm.path is not None and is_inside(out, lm.path):
        raise LayerscopeError(f"output {out} is inside the source model directory {lm.path}; choose another --out")
    if table is not None and table.provenance.weights_sha256 and lm.weights_sha256 \
            and table.provenance.weights_sha256 != lm.weights_sha256:
        raise LayerscopeError(f"{scores} was measured on other weights than {lm.model_id} (weights hash differs)")
    parts = find_parts(lm.model)
    if not parts.has_lm_head and (by == "quant_sensitivity" or evaluate):
        raise LayerscopeError(f"{lm.model_id} has no causal LM head: use --by METRIC --no-eval")
    plan, used_table = build_plan(lm, parts, budget=bud, bits=bit_list, groups=groups, by=by, method=method,
                                  fmt=fmt, granularity=granularity, scores=table, tokens=tokens,
                                  progress=not quiet, log=say)
    pre_rounded = lm.model_id == "smollm2"
    from layerscope.evaluation.quant_sweep import PRE_ROUNDED_NOTE

    plan.provenance = {
        "source_model": lm.model_id,
        "source_path": str(lm.path) if lm.path else None,
        "weights_sha256": lm.weights_sha256,
        "metric": by,
        "scores": str(scores) if scores else ("measured" if used_table is not None else None),
        "budget_bpw": bud,
        "achieved_bpw": plan.achieved_bpw,
        "cost_format": fmt,
        "bits": bit_list,
        "group_sizes": groups,
        "method": method,
        "granularity": granularity,
        "layerscope_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "covers": "the linear layers of every block; embeddings, norms and the output head are not quantized",
    }
    if pre_rounded:
        plan.notes.append(PRE_ROUNDED_NOTE)
    say(f"plan: {plan.achieved_bpw:.4f} bpw ({fmt}) for a {bud:g} bpw budget; blocks: " + " ".join(plan.block_labels()))

    evaluations = []
    if evaluate:
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
            {"name": f"plan ({by})", "bpw": plan.achieved_bpw, "perplexity": q},
        ]
        plan.provenance["evaluation"] = {"protocol": proto.model_dump(), "unquantized_perplexity": base,
                                         "plan_perplexity": q, "path": "fake-quant (bit-exact HQQ dequantized weights), fp32 compute"}
        say(f"perplexity: unquantized {base:.4f}, plan {q:.4f} ({(q / base - 1) * 100:+.2f} %)")

    with atomic_directory(out, force=force) as tmp:
        write_json_atomic(tmp / "plan.json", plan.model_dump(mode="json"))
        if used_table is not None:
            used_table.to_json(tmp / "scores.json")
        exported = {}
        if formats:
            from layerscope.actions.export.quant import write_exports

            exported = write_exports(plan, formats, tmp / "export", model=lm.model,
                                     model_type=getattr(lm.model.config, "model_type", "llama"))
            write_json_atomic(tmp / "export" / "validation.json", exported)
        if save_model:
            import torch

            from layerscope.compress.quant import (
                fake_quant,
                hqq_layers,
                quantize_model_hqq,
                save_hqq_model,
            )

            expected = {}
            for e in plan.entries:  # what the saved layers must dequantize to
                if e.bits != 16:
                    w = lm.model.get_submodule(e.name).weight.data
                    expected[e.name] = fake_quant(w, plan.assignment()[e.name])
            say("applying the plan with HQQ (HQQLinear, float16 compute) and saving")
            quantize_model_hqq(lm.model, plan.assignment())
            for name, layer in hqq_layers(lm.model):
                if not torch.equal(layer.dequantize().float(), expected[name].float()):
                    raise LayerscopeError(f"HQQ layer {name} does not reproduce the evaluated fake-quant weights")
            save_hqq_model(lm.model, tmp / "model")
            if lm.tokenizer is not None:
                lm.tokenizer.save_pretrained(str(tmp / "model"))
        write_text_atomic(tmp / "README.md", _readme(plan, evaluations, exported, save_model))
        try:
            from layerscope.evaluation.quant_sweep import attach
            from layerscope.report import render_report

            if used_table is not None:
                attach(used_table, plan=plan, evaluations=evaluations or None)
                (tmp / "report.html").write_text(render_report(used_table), encoding="utf-8")
        except ImportError:
            pass
    return plan


def register(app: typer.Typer) -> None:
    @app.command("quantize")
    def quantize_cmd(
        model: Optional[str] = typer.Argument(None, help="Local model directory, hub id, or 'smollm2'. Default: embedded SmolLM2-135M-Instruct."),
        budget: str = typer.Option(..., "--budget", help="Average bits per weight over the blocks' linear layers, scales and zeros included."),
        bits: str = typer.Option("2,3,4,8", "--bits", help="Allowed bit widths (2, 3, 4, 8; 16 = leave unquantized)."),
        group: str = typer.Option("64", "--group", help="Group size(s), comma-separated (each bit width is offered with each)."),
        by: str = typer.Option("quant_sensitivity", "--by", help="quant_sensitivity (measured KL), any per-block ScoreTable metric, or a baseline: uniform, llamacpp."),
        scores: Optional[Path] = typer.Option(None, "--scores", help="scores.json from `layerscope scan` holding the --by column."),
        out: Path = typer.Option(Path("layerscope-quant"), "--out", "-o", help="Output directory."),
        export: Optional[str] = typer.Option(None, "--export", help="Also write the plan for: gptqmodel, llm-compressor, hqq, llamacpp (comma-separated)."),
        granularity: str = typer.Option("block", "--granularity", help="block: one choice per block; linear: one per linear layer."),
        method: str = typer.Option("rtn", "--method", help="rtn (round to nearest) or hqq (HQQ's optimiser)."),
        fmt: str = typer.Option("hqq", "--cost-format", help="Storage format whose bits are counted: hqq, gptq, compressed-tensors, llamacpp."),
        tokens: int = typer.Option(2048, "--tokens", help="Calibration tokens for measured sensitivities."),
        evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Held-out perplexity of the unquantized and the planned model."),
        eval_tokens: int = typer.Option(16384, "--eval-tokens", help="Tokens of held-out Wikipedia for --eval."),
        save_model: bool = typer.Option(True, "--save-model/--no-save-model", help="Apply the plan with HQQ and save the quantized model."),
        force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
        quiet: bool = typer.Option(False, "--quiet", "-q"),
    ) -> None:
        """Choose a bit width per block (or linear layer) under a bits-per-weight budget, apply it, export it."""
        quantize(model, budget=budget, bits=bits, group=group, by=by, scores=scores, out=out, export=export,
                 granularity=granularity, method=method, fmt=fmt, tokens=tokens, evaluate=evaluate,
                 eval_tokens=eval_tokens, save_model=save_model, force=force, quiet=quiet)
        from layerscope.actions.export.quant import parse_exports

        formats = parse_exports(export)
        typer.echo(f"wrote {out}/plan.json" + (f", {out}/model (HQQ)" if save_model else "")
                   + (f", {out}/export ({', '.join(formats)})" if formats else ""))


def _readme(plan, evaluations, exported, saved: bool) -> str:
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
    if saved:
        lines += ["", "## Load the quantized model (HQQ)", "", "```python", "import torch",
                  "from hqq.models.hf.base import AutoHQQHFModel", "from transformers import AutoTokenizer", "",
                  "model = AutoHQQHFModel.from_quantized('model', compute_dtype=torch.float16, device='cpu')",
                  "tokenizer = AutoTokenizer.from_pretrained('model')", "```"]
    if exported:
        lines += ["", "## Exports", ""]
        lines += [f"- {k}: {', '.join(v['files'])} (validated by {v['validated_by']})" for k, v in exported.items()]
    return "\n".join(lines) + "\n"
