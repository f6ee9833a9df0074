"""`layerscope scan`: score every layer in one pass and write scores.json, scores.csv, report.html."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from layerscope.cli.parsers import (
    Device,
    Dtype,
    Force,
    ModelArg,
    Offload,
    Options,
    Quiet,
    RayAddress,
    Seed,
    TrustRemoteCode,
)
from layerscope.errors import LayerscopeError


def write_scan_outputs(table, out: Path, model_dir: Path | None = None, force: bool = False) -> dict[str, Path]:
    """Write the score table (JSON, CSV) and the HTML report into `out` (the output policy of `outputs`)."""
    from layerscope.outputs import output_dir
    from layerscope.report import render_report

    with output_dir(out, verb="scan", force=force, sources=(model_dir,)) as tmp:
        table.to_json(tmp / "scores.json")
        table.to_csv(tmp / "scores.csv")
        (tmp / "report.html").write_text(render_report(table), encoding="utf-8")
    return {k: out / f for k, f in (("json", "scores.json"), ("csv", "scores.csv"), ("html", "report.html"))}


def register(app: typer.Typer) -> None:
    @app.command("scan")
    def scan_cmd(
        model: ModelArg = None,
        data: Optional[str] = typer.Option(None, "--data", help="Calibration text: 'wikipedia' (default), 'shakespeare', or a .txt/.jsonl/.csv file."),
        metrics: Optional[list[str]] = typer.Option(None, "--metrics", "-m", help="Metric names (comma-separated or repeated); 'default' or 'all'."),
        tokens: int = typer.Option(8192, "--tokens", help="Calibration tokens."),
        seq_len: int = typer.Option(512, "--seq-len", help="Tokens per sequence."),
        batch_size: int = typer.Option(4, "--batch-size", help="Sequences per batch."),
        attn_seqs: int = typer.Option(2, "--attn-seqs", help="Sequences run with eager attention for per-head statistics."),
        lens_tokens: Optional[int] = typer.Option(None, "--lens-tokens", help="Token positions sampled for the logit lens (default: 1/32 of the tokens, 64..1024)."),
        option: Options = None,
        seed: Seed = 0,
        out: Path = typer.Option(Path("layerscope-out"), "--out", "-o", help="Output directory (created if missing)."),
        force: Force = False,
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted scan with ground-truth metrics "
                                    "(ablation) from the checkpoint in --out; same numbers as an uninterrupted run."),
        device: Device = "cpu",
        dtype: Dtype = None,
        offload: Offload = None,
        ray: RayAddress = None,
        trust_remote_code: TrustRemoteCode = False,
        quiet: Quiet = False,
    ) -> None:
        """Score every block, attention/MLP sublayer and head in one block-sequential pass."""
        from rich.console import Console

        from layerscope.metrics.scan import resolve_metrics, scan
        from layerscope.model.loading import resolve
        from layerscope.outputs import check_output
        from layerscope.parsing import key_values

        if tokens < 1 or seq_len < 2 or batch_size < 1 or attn_seqs < 0 or (lens_tokens is not None and lens_tokens < 1):
            raise LayerscopeError("--tokens, --seq-len, --batch-size and --lens-tokens must be positive")
        names = resolve_metrics(metrics)
        options = key_values(option)
        if ray:  # ablation units run as Ray tasks
            from layerscope.engine.ray_pool import require_ray

            require_ray()
            options["ray"] = ray
        _, model_dir = resolve(model)
        check_output(out, force=force, sources=(model_dir,))  # before the work, not after it
        checkpoint = None
        if "ablation" in names:  # the long one: checkpointed after every batch
            from layerscope.checkpoint import Checkpoint, checkpoint_name
            from layerscope.outputs import claim_output

            checkpoint = Checkpoint(out / checkpoint_name("scan"), claim=lambda: claim_output(
                out, [checkpoint_name("scan")], verb="scan", force=force, sources=(model_dir,)), fingerprint={
                "verb": "scan", "model": str(model), "data": str(data), "metrics": names, "tokens": tokens,
                "seq_len": seq_len, "batch_size": batch_size, "attn_seqs": attn_seqs, "lens_tokens": lens_tokens,
                "options": options, "seed": seed, "dtype": str(dtype)}, resume=resume)
            options["checkpoint"] = checkpoint
        elif resume:
            raise LayerscopeError("--resume continues a scan with --metrics ablation; this scan has nothing to resume")
        table = scan(model, data, names, tokens=tokens, seq_len=seq_len, batch_size=batch_size,
                     attn_seqs=attn_seqs, lens_tokens=lens_tokens, seed=seed, options=options,
                     trust_remote_code=trust_remote_code, progress=not quiet, device=device, dtype=dtype,
                     offload=offload)
        paths = write_scan_outputs(table, out, model_dir, force=force)
        if checkpoint is not None:
            checkpoint.remove()
        if not quiet:
            print_summary(Console(stderr=False), table)
        typer.echo(f"wrote {paths['json']}, {paths['csv']}, {paths['html']}")


def print_summary(console, table, k: int = 5) -> None:
    """The k least important blocks by every ranking metric."""
    from rich.table import Table

    p = table.provenance
    console.print(f"[bold]{p.model_id}[/] ({p.model_family}, {p.num_layers} blocks) on {p.calibration_source}, "
                  f"{p.calibration_tokens} tokens, {p.wall_time_s:.1f} s")
    t = Table(title=f"{k} least important units per metric (least first)")
    t.add_column("metric")
    t.add_column("unit")
    t.add_column("direction")
    t.add_column("least important")
    for name, col in table.columns.items():
        if col.direction is None or col.unit == "head":
            continue
        least = table.least_important(name, k)
        t.add_row(col.metric, col.unit, col.direction,
                  ", ".join(map(str, least)) if least else "— (not measured or no variation: no ranking)")
    console.print(t)
    for m, why in p.skipped.items():
        console.print(f"skipped {m}: {why}")
