"""`layerscope prune`: remove the K least important blocks / attention / MLP sublayers into a loadable model."""
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
    TrustRemoteCode,
)
from layerscope.errors import LayerscopeError


def register(app: typer.Typer) -> None:
    @app.command("prune")
    def prune_cmd(
        model: ModelArg = None,
        remove: Optional[int] = typer.Option(None, "--remove", "-k", help="Number of units to remove (the least important by --by)."),
        unit: str = typer.Option("block", "--unit", help="block, attention or mlp."),
        by: Optional[str] = typer.Option(None, "--by", help="Score column ranking the units, e.g. block_influence (see `layerscope scan`)."),
        scores: Optional[Path] = typer.Option(None, "--scores", help="scores.json from `layerscope scan` (else the metric is scanned now)."),
        units: Optional[str] = typer.Option(None, "--units", help="Explicit unit indices to remove, e.g. 3,7,9 (instead of --by)."),
        iterative: bool = typer.Option(False, "--iterative", help="Re-scan the pruned model after each removal."),
        plan: PlanFile = None,
        dry_run: DryRun = False,
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory for the pruned model."),
        force: Force = False,
        data: Optional[str] = typer.Option(None, "--data", help="Calibration text for scanning: 'wikipedia' (default), 'shakespeare' or a file."),
        tokens: int = typer.Option(8192, "--tokens", help="Calibration tokens for scanning."),
        seq_len: int = typer.Option(512, "--seq-len", help="Tokens per calibration sequence."),
        device: Device = "cpu",
        dtype: Dtype = None,
        offload: Offload = None,
        trust_remote_code: TrustRemoteCode = False,
    ) -> None:
        """Remove K blocks, attention or MLP sublayers (least important by a metric) and write a model directory."""
        from layerscope.actions.prune import prune
        from layerscope.plans.prune import PrunePlan, plan_prune

        if tokens < 1 or seq_len < 2:
            raise LayerscopeError("--tokens and --seq-len must be positive")
        request = dict(remove=remove, unit=unit, by=by, scores=scores, units=units, iterative=iterative,
                       scan_options={"data": data, "tokens": tokens, "seq_len": seq_len})
        if plan is not None:
            if any(v is not None for v in (remove, by, scores, units)) or iterative:
                raise LayerscopeError("--plan already says what to remove: drop --remove/--by/--units/--scores")
            the_plan = PrunePlan.from_file(plan)
        else:
            the_plan = None
        if dry_run:
            the_plan = the_plan or plan_prune(model, trust_remote_code=trust_remote_code, **request)
            typer.echo(the_plan.to_yaml(), nl=False)
            return
        if out is None:
            raise LayerscopeError("--out is required (or --dry-run to print the plan)")
        if the_plan is not None:
            res = prune(model, the_plan, out=out, force=force, trust_remote_code=trust_remote_code,
                        device=device, dtype=dtype, offload=offload)
        else:
            res = prune(model, out=out, force=force, trust_remote_code=trust_remote_code, device=device,
                        dtype=dtype, offload=offload, **request)
        sel = res.provenance["selection"]
        how = f"by {sel['by']} ({sel['method']})" if sel["by"] and sel["method"] != "explicit" else "as listed"
        noun = "blocks" if res.unit == "block" else f"{res.unit} sublayers"
        typer.echo(f"removed {noun} {', '.join(map(str, res.removed))} of {res.provenance['source']['num_layers']} {how}")
        extra = " and mergekit.yaml" if res.unit == "block" else "; layerscope.load(DIR) skips them"
        typer.echo(f"wrote {res.out} (layerscope_pruned.json, layerscope_plan.yaml{extra})")
