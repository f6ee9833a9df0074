"""`layerscope steer`: add the sentiment direction at the depth that knows, and measure what it does."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from layerscope.cli.parsers import (
    Device,
    DryRun,
    Dtype,
    Force,
    PlanFile,
    Quiet,
    Seed,
    TrustRemoteCode,
)


def register(app: typer.Typer) -> None:
    @app.command("steer")
    def steer_cmd(
        model: Optional[str] = typer.Argument(None, help="Local model directory, hub id, or 'smollm2'. Default: embedded SmolLM2-135M-Instruct."),
        layer: Optional[int] = typer.Option(None, "--layer", help="Residual layer 0..L (0 = embeddings). Default: the sentiment probe's concept depth."),
        alpha: float = typer.Option(0.25, "--alpha", help="Added vector norm as a multiple of the mean residual norm at that layer."),
        data: Optional[Path] = typer.Option(None, "--data", help="Labelled data for the direction (.csv/.jsonl); default: VADER sentences."),
        text_field: str = typer.Option("text", "--text-field"),
        label_field: str = typer.Option("label", "--label-field"),
        positive: str = typer.Option("positive", "--positive", help="Label of the positive class in --data."),
        negative: str = typer.Option("negative", "--negative", help="Label of the negative class in --data."),
        n: int = typer.Option(2000, "--n", help="Sentences for the class means (balanced)."),
        seeds: int = typer.Option(5, "--seeds", help="Random vectors of equal norm to compare against."),
        compare: str = typer.Option("all", "--compare", help="Other layers to try: all, every:N, or a comma list."),
        generate: int = typer.Option(0, "--generate", help="Also generate this many tokens per prompt and score them with the probe."),
        seed: Seed = 0,
        plan: PlanFile = None,
        dry_run: DryRun = False,
        out: Path = typer.Option(Path("layerscope-steer"), "--out", "-o", help="Output directory (steer.json, report.html)."),
        force: Force = False,
        device: Device = "cpu",
        dtype: Dtype = None,
        trust_remote_code: TrustRemoteCode = False,
        quiet: Quiet = False,
    ) -> None:
        """Steering vector = mean(positive) - mean(negative) states; effect vs other layers and random vectors."""
        from layerscope.actions.steer import steer
        from layerscope.cli.commands.probe import write_outputs
        from layerscope.model.subject import load_subject
        from layerscope.plans.steer import SteerPlan

        the_plan = SteerPlan.from_file(plan) if plan is not None else SteerPlan(
            layer=layer, alpha=alpha, data=str(data) if data is not None else None, text_field=text_field,
            label_field=label_field, positive=positive, negative=negative, n=n, seeds=seeds, compare=compare,
            generate_tokens=generate, seed=seed)
        if dry_run:
            typer.echo(the_plan.to_yaml(), nl=False)
            return
        subject = load_subject(model, trust_remote_code=trust_remote_code, device=device, dtype=dtype)
        subject.require_lm_head("steering")
        from layerscope.outputs import check_output

        check_output(out, force=force, sources=(subject.model_dir,))  # before the work, not after it
        result = steer(subject, plan=the_plan, progress=not quiet)
        paths = write_outputs(out, "steer.json", result, f"layerscope steer: {subject.model_id}", subject.model_dir,
                              verb="steer", force=force)
        if not quiet:
            typer.echo(result.summary())
        typer.echo(f"wrote {paths['json']}, {paths['html']}")
