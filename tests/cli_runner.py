"""Run the `layerscope` command line in-process, as a user's shell would, and return (exit code, stdout, stderr)."""
from __future__ import annotations

import sys

from layerscope.cli import app as cli


def run(args, monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["layerscope", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err
