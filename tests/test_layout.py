"""The package layout stays readable: no import circles, every module imports on its own, small files."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import layerscope

ROOT = Path(layerscope.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        parts = ["layerscope", *f.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _import_time_targets(mod: str, path: Path, known: set[str]) -> set[str]:
    """Modules that importing `mod` imports at once (module-level statements, not inside functions)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()

    def visit(stmts):
        for node in stmts:
            if isinstance(node, ast.If) and _is_type_checking(node):
                continue
            if isinstance(node, (ast.If, ast.Try, ast.With)):
                for block in ("body", "orelse", "finalbody"):
                    visit(getattr(node, block, []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([node.module] if node.module else []))
                out.add(base)
                out.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known)

    visit(ast.parse(path.read_text()).body)
    # importing a.b.c runs a/__init__ and a/b/__init__ first
    closed = set()
    for t in out:
        bits = t.split(".")
        closed.update(".".join(bits[:i]) for i in range(1, len(bits) + 1))
    return {t for t in closed if t in known and t != mod}


def _cycles() -> list[list[str]]:
    mods = _modules()
    known = set(mods)
    graph = {m: _import_time_targets(m, p, known) for m, p in mods.items()}
    # a package's own __init__ is always run before its submodules: not a cycle of ours
    for m in graph:
        graph[m] = {t for t in graph[m] if not m.startswith(t + ".")}
    found, state, stack = [], {}, []

    def dfs(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                found.append(stack[stack.index(t):] + [t])
            elif t not in state:
                dfs(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)
    return found


def test_no_import_cycles_among_modules():
    assert _cycles() == []


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(m for m in _modules() if not m.endswith("__main__"))  # __main__ runs the CLI
    code = ("import importlib, sys\nbad = []\nfor n in sys.argv[1:]:\n"
            "    try:\n        importlib.import_module(n)\n"
            "    except Exception as exc:\n        bad.append(f'{n}: {type(exc).__name__}: {exc}')\n"
            "print('\\n'.join(bad)); sys.exit(1 if bad else 0)\n")
    # reversed order: deep modules first, so no package __init__ has primed the others
    proc = subprocess.run([sys.executable, "-c", code, *reversed(names)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_source_files_stay_readable_in_one_sitting():
    too_long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
                if (n := len(p.read_text().splitlines())) > 450}
    assert too_long == {}


def test_registries_name_real_units():
    from layerscope.metrics.registry import METRICS
    from layerscope.report.registry import sections
    from layerscope.results import KINDS, result_class

    assert all(METRICS[name].name == name for name in METRICS)
    assert [s.key for s in sections()][0] == "summary"
    assert all(k == "layerscope.scores" or result_class(k).kind == k for k in KINDS)
