"""`layerscope report`: re-render report.html from any saved result JSON."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from layerscope.cli.parsers import Force


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report_cmd(
        path: Path = typer.Argument(..., help="A result JSON: scores.json, agreement.json, probe.json, lens.json, "
                                              "steer.json, sweep.json, layerscope_pruned.json, quantize.json."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for report.html (default: the JSON's folder)."),
        force: Force = False,
    ) -> None:
        """Re-render report.html (and print the summary) from a saved result."""
        from layerscope.outputs import output_dir
        from layerscope.results import load_result

        result = load_result(path)
        html = result.report_html()
        target = out if out is not None else path.parent
        with output_dir(target, verb="report", force=force) as tmp:
            (tmp / "report.html").write_text(html, encoding="utf-8")
        typer.echo(result.summary())
        typer.echo(f"wrote {target / 'report.html'}")
