"""`layerscope finetune`: LISA, importance-weighted LISA, IST, freeze plans and layer-selected LoRA."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from layerscope.cli.parsers import Device, DryRun, Dtype, Force, ModelArg, Quiet, Seed, TrustRemoteCode


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    def finetune_cmd(
        model: ModelArg = None,
        plan: str = typer.Option("lisa-importance", "--plan", help="lisa | lisa-importance | ist | freeze | lora-selected | lora-all | full, or a plan file (YAML/JSON)."),
        data: str = typer.Option("shakespeare", "--data", help="Task: shakespeare, sentiment, or a .txt/.jsonl/.json/.csv file."),
        steps: int = typer.Option(40, "--steps"),
        lr: float = typer.Option(1e-4, "--lr"),
        batch_size: int = typer.Option(4, "--batch-size"),
        seq_len: int = typer.Option(128, "--seq-len"),
        n_layers: int = typer.Option(4, "--n-layers", help="Active blocks (LISA/IST) or chosen blocks (freeze, lora-selected)."),
        interval: int = typer.Option(5, "--interval", help="LISA/IST: steps between re-draws."),
        by: Optional[str] = typer.Option("relative_contribution", "--by", help="Metric ranking/weighting the blocks, or spectrum_snr."),
        select: str = typer.Option("top", "--select", help="freeze / lora-selected: top, bottom or random k blocks."),
        layers: Optional[str] = typer.Option(None, "--layers", help="freeze / lora-selected: explicit blocks, e.g. 3,7,12."),
        scores: Optional[Path] = typer.Option(None, "--scores", help="scores.json to take --by from (default: a quick scan of the task text)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out from its last checkpoint."),
        seed: Seed = 0,
        dry_run: DryRun = False,
        out: Path = typer.Option(Path("layerscope-finetune"), "--out", "-o", help="Output directory (model/, adapter/, finetune.json, report.html)."),
        force: Force = False, device: Device = "cpu", dtype: Dtype = None,
        trust_remote_code: TrustRemoteCode = False, quiet: Quiet = False,
    ) -> None:
        """Fine-tune only the layers that matter; write a plain model directory, finetune.json and a report."""
        from layerscope.actions.finetune.run import finetune
        from layerscope.model.subject import load_subject
        from layerscope.parsing import int_list
        from layerscope.plans.finetune import METHODS, FinetunePlan, plan_finetune

        subject = load_subject(model, trust_remote_code=trust_remote_code, device=device, dtype=dtype)
        if plan not in METHODS and Path(plan).exists():
            the_plan = FinetunePlan.from_file(plan)
        else:
            the_plan = plan_finetune(subject.model, subject.tokenizer, method=plan, by=by, select=select,
                                     scores=str(scores) if scores else None,
                                     layers=int_list(layers, "--layers") if layers else None, data=data, steps=steps,
                                     lr=lr, seed=seed, batch_size=batch_size, seq_len=seq_len, n_layers=n_layers,
                                     interval=interval)
        if dry_run:
            typer.echo(the_plan.to_yaml(), nl=False)
            return
        result = finetune(subject, the_plan, out, resume=resume,
                          progress=not quiet, force=force)
        if not quiet:
            typer.echo(result.summary())
        typer.echo(f"wrote {out / 'model'}, {out / 'finetune.json'}, {out / 'report.html'}")
