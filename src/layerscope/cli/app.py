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

@app.callback()
def _global_options(
    allow_missing: bool = typer.Option(
        False, "--allow-missing", help="Load a checkpoint whose tensors do not match its config (missing ones stay "
        "random) with a recorded warning instead of an error. Accepted before or after the verb."),
) -> None:
    from layerscope.model.checks import ALLOW_MISSING

    ALLOW_MISSING.set(allow_missing)


# Verb modules (the CLI's registry), in the order `--help` lists them.
COMMAND_MODULES = ("scan", "assets", "agree", "prune", "eval", "sweep", "quantize", "sparsify", "lowrank", "probe", "lens", "steer", "finetune", "merge", "report")

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


def _click_exceptions() -> tuple[tuple, tuple, tuple, tuple]:
    """(exit, abort, usage-error, no-args-help) exception classes: typer's own (it vendors click) and click's."""
    import click
    from typer import exceptions as tex

    exits, aborts, usage, no_args = [tex.Exit, click.exceptions.Exit], [tex.Abort, click.exceptions.Abort], \
        [click.ClickException], [click.exceptions.NoArgsIsHelpError]
    try:
        from typer._click import exceptions as vendored
    except ImportError:
        vendored = None
    if vendored is not None:
        usage.append(vendored.ClickException)
        no_args.append(vendored.NoArgsIsHelpError)
    return tuple(exits), tuple(aborts), tuple(usage), tuple(no_args)


def _validation_error() -> type:
    from pydantic import ValidationError

    return ValidationError


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and a non-zero exit, never a traceback.

    The command is invoked here rather than through typer's own main loop: in non-standalone mode
    that loop turns Ctrl-C (and any `typer.Exit`) into a *returned* exit code, which made an
    interrupted verb exit 0 with no message. Here Ctrl-C always exits 130 with one line, and the
    output policy's staging directories are removed on the way out (nothing partial is left).
    """
    exits, aborts, usage, no_args = _click_exceptions()
    debug = os.environ.get("LAYERSCOPE_DEBUG") == "1"
    from layerscope.cli.parsers import with_optional_values

    args = with_optional_values(sys.argv[1:] if argv is None else list(argv))  # `--ray` with no address
    if "--allow-missing" in args[1:]:  # a global option; also accepted after the verb
        args = ["--allow-missing", *[a for a in args if a != "--allow-missing"]]
    try:
        _quiet_libraries()
        command = typer.main.get_command(app)
        with command.make_context("layerscope", args) as ctx:
            command.invoke(ctx)
    except KeyboardInterrupt:
        typer.echo("layerscope: interrupted", err=True)
        sys.exit(130)
    except LayerscopeError as exc:
        if debug:
            raise
        typer.echo(f"layerscope: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except exits as exc:
        code = getattr(exc, "exit_code", 0)
        if code:
            sys.exit(code)
    except aborts:
        typer.echo("layerscope: aborted", err=True)
        sys.exit(1)
    except no_args as exc:
        typer.echo(exc.format_message())
    except _validation_error() as exc:  # a plan or request with an out-of-range or unknown field
        err = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in err.get("loc", ())) or exc.title
        typer.echo(f"layerscope: error: invalid {where}: {err.get('msg', str(exc).splitlines()[0])}", err=True)
        sys.exit(2)
    except usage as exc:  # usage errors: unknown option, bad value, ...
        typer.echo(f"layerscope: error: {exc.format_message().splitlines()[0]}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # anything unexpected: still one line (LAYERSCOPE_DEBUG=1 shows the traceback)
        if debug:
            raise
        msg = str(exc).splitlines()[0] if str(exc) else ""
        typer.echo(f"layerscope: internal error: {type(exc).__name__}: {msg} (set LAYERSCOPE_DEBUG=1 for a traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
