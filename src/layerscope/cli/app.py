"""`layerscope` command line. Each verb lives in layerscope/cli/commands/<verb>.py and registers itself."""
from __future__ import annotations

import importlib
import os
import sys

import typer

from layerscope.errors import LayerscopeError

app = typer.Typer(
    name="layerscope",
    help="Which layers of this transformer matter, and what should I do about it?",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Verb modules (the CLI's registry), in the order `--help` lists them.
COMMAND_MODULES = ("scan", "assets", "agree", "prune", "eval", "sweep", "quantize", "probe", "lens", "steer", "merge", "report")

for _name in COMMAND_MODULES:
    importlib.import_module(f"layerscope.cli.commands.{_name}").register(app)


def fail(message: str, code: int = 2) -> "typer.Exit":
    typer.echo(f"layerscope: error: {message}", err=True)
    return typer.Exit(code)


def _quiet_libraries() -> None:
    """transformers' own progress bars and warnings would bury our one-line messages."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def main() -> None:
    """Entry point: user errors become one line on stderr and a non-zero exit, never a traceback."""
    debug = os.environ.get("LAYERSCOPE_DEBUG") == "1"
    _quiet_libraries()
    try:
        app(standalone_mode=False)
    except LayerscopeError as exc:
        if debug:
            raise
        typer.echo(f"layerscope: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("layerscope: interrupted", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("layerscope: aborted", err=True)
        sys.exit(1)
    except Exception as exc:  # click usage errors and anything unexpected: still one line
        import click

        if isinstance(exc, click.ClickException):
            typer.echo(f"layerscope: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        if debug:
            raise
        msg = str(exc).splitlines()[0] if str(exc) else ""
        typer.echo(f"layerscope: internal error: {type(exc).__name__}: {msg} (set LAYERSCOPE_DEBUG=1 for a traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
