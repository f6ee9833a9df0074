"""layerscope: which layers of this transformer matter, and what to do about it.

The Python API mirrors the CLI verbs: scan, agree, prune, evaluate, sweep, quantize, probe, lens, steer.
"""
__version__ = "0.1.0"

# Functions that share their name with their module are bound eagerly, so that `layerscope.scan`
# is the function even after `layerscope.scan` (the module) has been imported elsewhere.
from .probe import probe  # noqa: E402
from .scan import scan  # noqa: E402
from .steer import steer  # noqa: E402

_LAZY = {
    "ScoreTable": ("scoretable", "ScoreTable"),
    "load_model": ("models", "load_model"),
    "find_parts": ("adapter", "find_parts"),
    "agree": ("agreement", "agree"),
    "lens": ("lenses", "lens"),
    "prune": ("actions.prune", "prune"),
    "quantize": ("commands.quantize", "quantize"),
    "load": ("fast", "load"),
    "perplexity": ("evaluation", "perplexity"),
    "render_report": ("report", "render_report"),
    "LayerscopeError": ("errors", "LayerscopeError"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'layerscope' has no attribute {name!r}")


__all__ = ["__version__", "scan", "probe", "steer", *_LAZY]
