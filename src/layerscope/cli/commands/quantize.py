"""`layerscope quantize`: per-layer bit widths under an average-bit budget, applied with HQQ and exported."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from layerscope.cli.parsers import (
    Device,
    DryRun,
    Dtype,
    Force,
    ModelArg,
    Offload,
    PlanFile,
    Quiet,
    RayAddress,
    TrustRemoteCode,
)
from layerscope.errors import LayerscopeError


def register(app: typer.Typer) -> None:
    @app.command("quantize")
    def quantize_cmd(
        model: ModelArg = None,
        budget: Optional[str] = typer.Option(None, "--budget", help="Average bits per weight over the blocks' linear layers, scales and zeros included."),
        bits: str = typer.Option("2,3,4,8", "--bits", help="Allowed bit widths (2, 3, 4, 8; 16 = leave unquantized)."),
        group: str = typer.Option("64", "--group", help="Group size(s), comma-separated (each bit width is offered with each)."),
        by: str = typer.Option("measured", "--by", help="measured (every candidate's loss measured per linear layer with its own quantizer), quant_sensitivity (per-block KL), any per-block ScoreTable metric, or a baseline: uniform, llamacpp."),
        scores: Optional[Path] = typer.Option(None, "--scores", help="scores.json from `layerscope scan` holding the --by column."),
        out: Path = typer.Option(Path("layerscope-quant"), "--out", "-o", help="Output directory."),
        export: Optional[str] = typer.Option(None, "--export", help="Also write the plan for: gptqmodel, llm-compressor, hqq, llamacpp (comma-separated); hqq-pickle also saves an rtn/hqq model in HQQ's pickle-based qmodel.pt."),
        granularity: str = typer.Option("block", "--granularity", help="block: one choice per block; linear: one per linear layer."),
        method: str = typer.Option("rtn", "--method", help="rtn (round to nearest), hqq (HQQ's optimiser) or gptq (error compensation; saved as compressed-tensors)."),
        act_order: bool = typer.Option(False, "--act-order/--no-act-order", help="gptq: quantize columns in decreasing Hessian diagonal."),
        damp: float = typer.Option(0.1, "--damp", help="gptq: Hessian damping, a fraction of its mean diagonal (0.1: small calibration sets over-fit at 0.01)."),
        sequential: bool = typer.Option(False, "--sequential/--no-sequential", help="gptq: recollect each block's Hessians from the already-quantized blocks before it."),
        resume: bool = typer.Option(False, "--resume", help="Continue the measurement checkpoint in --out (same request)."),
        fmt: str = typer.Option("hqq", "--cost-format", help="Storage format whose bits are counted: hqq, gptq, compressed-tensors, llamacpp."),
        exact_loss: str = typer.Option("token_fisher", "--exact-loss", help="--by measured's loss per candidate: token_fisher (output error weighted per token and channel by the loss gradient) or fisher (per channel only); each option's estimates are checked against its measured uniform plan and rescaled."),
        search: bool = typer.Option(True, "--search/--no-search", help="--by measured: measure the uniform plan and the exact plans that change at most 1, 2, 4, ... 64 layers from it (or any number) on calibration text and keep the best; --no-search: the unconstrained exact plan."),
        search_tokens: int = typer.Option(4096, "--search-tokens", help="--search: calibration tokens each candidate plan is measured on (at most --tokens)."),
        tokens: int = typer.Option(2048, "--tokens", help="Calibration tokens for measured sensitivities."),
        evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Held-out perplexity of the unquantized and the planned model."),
        eval_tokens: int = typer.Option(16384, "--eval-tokens", help="Tokens of held-out Wikipedia for --eval."),
        save_model: bool = typer.Option(True, "--save-model/--no-save-model", help="Apply the plan with HQQ and save the quantized model."),
        plan: PlanFile = None,
        dry_run: DryRun = False,
        force: Force = False,
        device: Device = "cpu",
        dtype: Dtype = None,
        trust_remote_code: TrustRemoteCode = False,
        quiet: Quiet = False,
        ray: RayAddress = None,
        offload: Offload = None,
    ) -> None:
        """Choose a bit width per block (or linear layer) under a bits-per-weight budget, apply it, export it."""
        from layerscope.actions.quantize import plan_quantize, quantize
        from layerscope.plans.quantize import QuantPlan

        request = dict(budget=budget, bits=bits, group=group, by=by, scores=scores, granularity=granularity,
                       method=method, fmt=fmt, tokens=tokens, act_order=act_order, damp=damp, exact_loss=exact_loss,
                       search=search, search_tokens=search_tokens)
        if plan is None and budget is None:
            raise LayerscopeError("--budget is required (or --plan FILE)")
        if ray:  # the search's trials and the held-out evaluations run as Ray tasks
            from layerscope.engine.ray_pool import require_ray

            require_ray()
        if dry_run:
            the_plan = QuantPlan.from_file(plan) if plan else plan_quantize(
                model, quiet=quiet, trust_remote_code=trust_remote_code, device=device, dtype=dtype, ray=ray, offload=offload, **request)
            typer.echo(the_plan.to_yaml(), nl=False)
            return
        common = dict(out=out, export=export, evaluate=evaluate, eval_tokens=eval_tokens, save_model=save_model,
                      force=force, quiet=quiet, trust_remote_code=trust_remote_code, device=device, dtype=dtype,
                      resume=resume, sequential=sequential, ray=ray, offload=offload)
        if plan is not None:
            request = {}
        result = quantize(model, plan, **common, **request)
        from layerscope.actions.export.quant import parse_exports

        formats = parse_exports(export)
        saved = [k for k in result.exported if k in ("compressed-tensors model", "hqq-pickle")]
        typer.echo(f"wrote {out}/plan.json" + (f", {out}/model ({saved[0]})" if saved else "")
                   + (f", {out}/export ({', '.join(formats)})" if formats else ""))


