"""`layerscope merge`: merge fine-tuned models into their base with per-layer coefficients."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from layerscope.cli.parsers import DryRun, Force, PlanFile, RayAddress, TrustRemoteCode
from layerscope.errors import LayerscopeError


def register(app: typer.Typer) -> None:
    @app.command("merge")
    def merge_cmd(
        models: Optional[list[str]] = typer.Argument(None, help="BASE FT1 FT2 ...: the base, then the fine-tuned models."),
        method: str = typer.Option("task_arithmetic", "--method", help="task_arithmetic, ties or dare_ties."),
        layers: str = typer.Option("uniform", "--layers", help="uniform, lines, importance or adamerging."),
        lambdas: Optional[str] = typer.Option(None, "--lambdas", help="λ per fine-tuned model, e.g. 0.8,1 (default 1)."),
        lambda_grid: Optional[str] = typer.Option(
            None, "--lambda-grid", help="scales of every λ to try, e.g. 0.3,0.5,0.7,1: each is merged and measured on "
            "held-out text of every task (--data); the least mean NLL is written."),
        density: float = typer.Option(0.5, "--density", help="ties / dare_ties: share of each task vector kept."),
        alpha: Optional[float] = typer.Option(None, "--alpha", help="lines: first-block scale (default: LiNeS's rule)."),
        beta: Optional[float] = typer.Option(None, "--beta", help="lines: added at the last block (default mean λ − α)."),
        importance: str = typer.Option("task_vectors", "--importance", help="importance source: task_vectors or scores."),
        by: str = typer.Option("taylor", "--by", help="importance from scores: the ranked metric column."),
        scores: Optional[str] = typer.Option(None, "--scores", help="importance from scores: scores.json per model, comma-separated."),
        data: Optional[str] = typer.Option(None, "--data", help="task data per model, comma-separated (corpus or file)."),
        entropy: Optional[str] = typer.Option(None, "--entropy", help="adamerging: 'all' or 'last' per model, comma-separated."),
        steps: int = typer.Option(20, "--steps", help="adamerging: optimiser steps (early stopping on held-out entropy)."),
        tokens: int = typer.Option(1024, "--tokens", help="tokens per task for scans and AdaMerging."),
        seed: int = typer.Option(0, "--seed"),
        plan: PlanFile = None,
        dry_run: DryRun = False,
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory for the merged model."),
        force: Force = False,
        trust_remote_code: TrustRemoteCode = False,
        ray: RayAddress = None,
    ) -> None:
        """Merge fine-tuned models into their base: task vectors weighted per layer (LiNeS, importance, AdaMerging)."""
        from layerscope.actions.merge.apply import merge
        from layerscope.parsing import number
        from layerscope.plans.merge import MergePlan, plan_merge

        if ray:  # the λ grid's points run as Ray tasks
            from layerscope.engine.ray_pool import require_ray

            require_ray()
            if lambda_grid is None and plan is None:
                raise LayerscopeError("--ray fans out the points of --lambda-grid, and no grid was given: "
                                      "add --lambda-grid or leave --ray out")
        if plan is not None:
            if models:
                raise LayerscopeError("--plan already names the models: drop BASE FT1 ...")
            if lambda_grid is not None:
                raise LayerscopeError("--lambda-grid goes with BASE FT1 ...; a plan file names its grid as lambda_grid")
            the_plan = MergePlan.from_file(plan)
        else:
            if not models or len(models) < 2:
                raise LayerscopeError("give the base model and at least one fine-tuned model: BASE FT1 [FT2 ...]")
            n = len(models) - 1
            per = {k: [x.strip() for x in v.split(",")] if v else [None] * n for k, v in (("data", data), ("scores", scores), ("entropy", entropy))}
            if any(len(v) != n for v in per.values()):
                raise LayerscopeError(f"--data/--scores/--entropy need one entry per fine-tuned model ({n})")
            srcs = [{"model": m, **{k: per[k][i] for k in per if per[k][i]}} for i, m in enumerate(models[1:])]
            lams = [number(x, "--lambdas") for x in lambdas.split(",")] if lambdas else None
            grid = [number(x, "--lambda-grid") for x in lambda_grid.split(",")] if lambda_grid is not None else None
            if grid is not None and any(g <= 0 for g in grid):
                raise LayerscopeError(f"--lambda-grid values must be > 0, got {lambda_grid}")
            request = dict(method=method, layers=layers, lambdas=lams, lambda_grid=grid, density=density, alpha=alpha,
                           beta=beta, importance=importance, by=by, steps=steps, tokens=tokens, seed=seed)
            the_plan = plan_merge(models[0], srcs, **request) if (dry_run or out) else None
        if dry_run:
            typer.echo(the_plan.to_yaml(), nl=False)
            return
        if out is None:
            raise LayerscopeError("--out is required (or --dry-run to print the plan)")
        res = merge(plan=the_plan, out=out, force=force, trust_remote_code=trust_remote_code, ray=ray)
        typer.echo(res.summary())
        typer.echo(f"wrote {out} (merge.json, mergekit.yaml, layerscope_plan.yaml, report.html)")
