"""layerscope: which layers of this transformer matter, and what to do about it.

The Python API has the CLI's shape: scan, agree, plan_prune/prune, plan_quantize/quantize, plan_sparsify/sparsify,
plan_lowrank/lowrank, sweep, probe, lens,
steer, perplexity, load, render_report, load_result.
"""
__version__ = "0.1.0"

# The API is bound lazily: `import layerscope` stays cheap and imports no torch until a verb is used.
_LAZY = {
    "scan": ("metrics.scan", "scan"),
    "ScoreTable": ("metrics.table", "ScoreTable"),
    "load_model": ("model.loading", "load_model"),
    "find_parts": ("model.adapter", "find_parts"),
    "agree": ("analysis.agreement", "agree"),
    "probe": ("analysis.probes", "probe"),
    "lens": ("analysis.lenses", "lens"),
    "plan_prune": ("plans.prune", "plan_prune"),
    "prune": ("actions.prune", "prune"),
    "PrunePlan": ("plans.prune", "PrunePlan"),
    "plan_quantize": ("actions.quantize", "plan_quantize"),
    "quantize": ("actions.quantize", "quantize"),
    "QuantPlan": ("plans.quantize", "QuantPlan"),
    "plan_sparsify": ("actions.sparsify", "plan_sparsify"),
    "sparsify": ("actions.sparsify", "sparsify"),
    "SparsifyPlan": ("plans.sparsify", "SparsifyPlan"),
    "plan_lowrank": ("actions.lowrank", "plan_lowrank"),
    "lowrank": ("actions.lowrank", "lowrank"),
    "LowrankPlan": ("plans.lowrank", "LowrankPlan"),
    "sweep": ("evaluation.sweep", "run_sweep"),
    "load_result": ("results", "load_result"),
    "steer": ("actions.steer", "steer"),
    "plan_merge": ("plans.merge", "plan_merge"),
    "merge": ("actions.merge.apply", "merge"),
    "MergePlan": ("plans.merge", "MergePlan"),
    "load": ("model.fast", "load"),
    "finetune": ("actions.finetune.run", "finetune"),
    "plan_finetune": ("plans.finetune", "plan_finetune"),
    "FinetunePlan": ("plans.finetune", "FinetunePlan"),
    "perplexity": ("evaluation.perplexity", "perplexity"),
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


__all__ = ["__version__", *_LAZY]
