"""`layerscope sparsify`: per-block sparsity (uniform, OWL, exact, metric:NAME) pruned by magnitude, Wanda or SparseGPT."""
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
    PlanFile,
    Quiet,
    RayAddress,
    TrustRemoteCode,
)
from layerscope.errors import LayerscopeError


def register(app: typer.Typer) -> None:
    @app.command("sparsify")
    def sparsify_cmd(
        model: ModelArg = None,
        sparsity: Optional[float] = typer.Option(None, "--sparsity", help="Target sparsity over all linear weights of the blocks (e.g. 0.6); N:M patterns fix it."),
        method: str = typer.Option("wanda", "--method", help="magnitude, wanda or sparsegpt."),
        pattern: str = typer.Option("unstructured", "--pattern", help="unstructured or N:M (2:4 keeps 2 of every 4 inputs)."),
        allocation: str = typer.Option("uniform", "--allocation", help="uniform, owl, exact (measured loss curves + exact allocator) or metric:NAME."),
        scores: Optional[Path] = typer.Option(None, "--scores", help="scores.json holding the metric of --allocation metric:NAME (else it is scanned)."),
        tokens: int = typer.Option(8192, "--tokens", help="Calibration tokens (Wikipedia calibration split)."),
        seq_len: int = typer.Option(256, "--seq-len", help="Calibration window length."),
        owl_lambda: float = typer.Option(0.08, "--owl-lambda", help="OWL's λ: levels spread over ±λ around the target."),
        owl_m: float = typer.Option(5.0, "--owl-m", help="OWL's M: outliers are Wanda scores above M × mean."),
        exact_loss: str = typer.Option("output_kl", "--exact-loss", help="--allocation exact's measured loss: output_kl (KL of the model's predictions, each block pruned alone) or block_error (the block's own relative output error; cheaper)."),
        out: Path = typer.Option(Path("layerscope-sparse"), "--out", "-o", help="Output directory."),
        evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Held-out perplexity of the dense and the sparse model."),
        eval_tokens: int = typer.Option(4096, "--eval-tokens", help="Tokens of held-out Wikipedia for --eval."),
        check_uniform: bool = typer.Option(True, "--check-uniform/--no-check-uniform", help="Also prune uniformly at the same sparsity and ship the better plan."),
        plan: PlanFile = None,
        dry_run: DryRun = False,
        force: Force = False,
        device: Device = "cpu",
        dtype: Dtype = None,
        trust_remote_code: TrustRemoteCode = False,
        quiet: Quiet = False,
        ray: RayAddress = None,
    ) -> None:
        """Prune the blocks' linear layers to a global sparsity with per-block levels, and save the sparse model."""
        from layerscope.actions.sparsify import plan_sparsify, sparsify
        from layerscope.plans.sparsify import SparsifyPlan

        if ray:  # loss curves, the plan's and the uniform plan's pruning and perplexities run as Ray tasks
            from layerscope.engine.ray_pool import require_ray

            require_ray()
        if plan is None and sparsity is None and pattern == "unstructured":
            raise LayerscopeError("--sparsity is required (or --plan FILE, or an N:M --pattern)")
        request = dict(sparsity=sparsity if sparsity is not None else 0.5, method=method, pattern=pattern,
                       allocation=allocation, scores=scores, tokens=tokens, seq_len=seq_len, owl_lambda=owl_lambda,
                       owl_m=owl_m, exact_loss=exact_loss)
        if dry_run:
            the_plan = SparsifyPlan.from_file(plan).check() if plan else plan_sparsify(
                model, quiet=quiet, trust_remote_code=trust_remote_code, device=device, dtype=dtype, ray=ray,
                **request)
            typer.echo(the_plan.to_yaml(), nl=False)
            return
        common = dict(out=out, evaluate=evaluate, eval_tokens=eval_tokens, check_uniform=check_uniform, force=force,
                      quiet=quiet, trust_remote_code=trust_remote_code, device=device, dtype=dtype, ray=ray)
        result = sparsify(model, plan, **common) if plan is not None else sparsify(model, **common, **request)
        if not quiet:
            typer.echo(result.summary())
        typer.echo(f"wrote {out}/model (plain HF, zeros in place), {out}/sparsify.json, {out}/report.html")
