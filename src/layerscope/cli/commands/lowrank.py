"""`layerscope lowrank`: per-layer ranks (uniform or exact) for plain or whitened (SVD-LLM) SVD under a parameter budget."""
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
    @app.command("lowrank")
    def lowrank_cmd(
        model: ModelArg = None,
        reduction: Optional[float] = typer.Option(None, "--reduction", help="Fraction of the blocks' linear parameters to remove (e.g. 0.2)."),
        method: str = typer.Option("whitened", "--method", help="whitened (SVD-LLM, activation-aware) or svd (plain)."),
        allocation: str = typer.Option("uniform", "--allocation", help="uniform ranks, or exact (measured truncation loss + exact allocator)."),
        exact_loss: str = typer.Option("fisher", "--exact-loss", help="--allocation exact's loss per layer: fisher (predicted ΔNLL: output error weighted by the loss gradient, one backward pass) or relative (relative output error; every layer alike)."),
        tokens: int = typer.Option(8192, "--tokens", help="Calibration tokens (Wikipedia calibration split)."),
        seq_len: int = typer.Option(256, "--seq-len", help="Calibration window length."),
        out: Path = typer.Option(Path("layerscope-lowrank"), "--out", "-o", help="Output directory."),
        evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Held-out perplexity of the dense and the low-rank model."),
        eval_tokens: int = typer.Option(4096, "--eval-tokens", help="Tokens of held-out Wikipedia for --eval."),
        check_uniform: bool = typer.Option(True, "--check-uniform/--no-check-uniform", help="Also factorize with uniform ranks at the same budget and ship the better plan."),
        plan: PlanFile = None,
        dry_run: DryRun = False,
        force: Force = False,
        device: Device = "cpu",
        dtype: Dtype = None,
        trust_remote_code: TrustRemoteCode = False,
        quiet: Quiet = False,
        ray: RayAddress = None,
    ) -> None:
        """Factorize the blocks' linear layers into Linear(in, r) -> Linear(r, out) pairs under a parameter budget."""
        from layerscope.actions.lowrank import lowrank, plan_lowrank
        from layerscope.plans.lowrank import LowrankPlan

        if ray:  # loss curves, the plan's and the uniform plan's factorization and perplexities run as Ray tasks
            from layerscope.engine.ray_pool import require_ray

            require_ray()
        if plan is None and reduction is None:
            raise LayerscopeError("--reduction is required (or --plan FILE)")
        request = dict(reduction=reduction, method=method, allocation=allocation, tokens=tokens, seq_len=seq_len,
                       exact_loss=exact_loss)
        if dry_run:
            the_plan = LowrankPlan.from_file(plan) if plan else plan_lowrank(
                model, quiet=quiet, trust_remote_code=trust_remote_code, device=device, dtype=dtype, ray=ray,
                **request)
            typer.echo(the_plan.to_yaml(), nl=False)
            return
        common = dict(out=out, evaluate=evaluate, eval_tokens=eval_tokens, check_uniform=check_uniform, force=force,
                      quiet=quiet, trust_remote_code=trust_remote_code, device=device, dtype=dtype, ray=ray)
        result = lowrank(model, plan, **common) if plan is not None else lowrank(model, **common, **request)
        if not quiet:
            typer.echo(result.summary())
        typer.echo(f"wrote {out}/factorized (layerscope.load), {out}/dense (plain transformers), {out}/lowrank.json")
