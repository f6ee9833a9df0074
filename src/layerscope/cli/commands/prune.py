"""`layerscope prune`: remove the K least important blocks / attention / MLP sublayers into a loadable model."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from layerscope.errors import LayerscopeError


def register(app: typer.Typer) -> None:
    @app.command("prune")
    def prune_cmd(
        model: Optional[str] = typer.Argument(None, help="Local model directory, hub id, or 'smollm2'/'minilm'. Default: embedded SmolLM2-135M-Instruct."),
        remove: Optional[int] = typer.Option(None, "--remove", "-k", help="Number of units to remove (the least important by --by)."),
        unit: str = typer.Option("block", "--unit", help="block, attention or mlp."),
        by: Optional[str] = typer.Option(None, "--by", help="Score column ranking the units, e.g. block_influence (see `layerscope scan`)."),
        scores: Optional[Path] = typer.Option(None, "--scores", help="scores.json from `layerscope scan` (else the metric is scanned now)."),
        units: Optional[str] = typer.Option(None, "--units", help="Explicit unit indices to remove, e.g. 3,7,9 (instead of --by)."),
        iterative: bool = typer.Option(False, "--iterative", help="Re-scan the pruned model after each removal."),
        out: Path = typer.Option(..., "--out", "-o", help="Output directory (must not exist unless --force)."),
        force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
        data: Optional[str] = typer.Option(None, "--data", help="Calibration text for scanning: 'wikipedia' (default), 'shakespeare' or a file."),
        tokens: int = typer.Option(8192, "--tokens", help="Calibration tokens for scanning."),
        seq_len: int = typer.Option(512, "--seq-len", help="Tokens per calibration sequence."),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow custom model code from the model repository."),
    ) -> None:
        """Remove K blocks, attention or MLP sublayers (least important by a metric) and write a model directory."""
        from layerscope.engine.removal import check_unit
        from layerscope.actions.prune import prune, quiet_transformers

        check_unit(unit)
        quiet_transformers()
        if tokens < 1 or seq_len < 2:
            raise LayerscopeError("--tokens and --seq-len must be positive")
        res = prune(model, out=out, remove=remove, unit=unit, by=by, scores=scores, units=units,
                    iterative=iterative, force=force, trust_remote_code=trust_remote_code,
                    scan_options={"data": data, "tokens": tokens, "seq_len": seq_len})
        sel = res.provenance["selection"]
        how = f"by {sel['by']} ({sel['method']})" if sel["by"] and sel["method"] != "explicit" else "as listed"
        noun = "blocks" if unit == "block" else f"{unit} sublayers"
        typer.echo(f"removed {noun} {', '.join(map(str, res.removed))} of {res.provenance['source']['num_layers']} {how}")
        extra = " and mergekit.yaml" if unit == "block" else "; layerscope.load(DIR) skips them"
        typer.echo(f"wrote {res.out} (layerscope_pruned.json{extra})")
