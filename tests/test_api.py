"""The Python API has the same verbs as the CLI and they are callables, not modules."""
import layerscope


def test_api_verbs_are_functions():
    import layerscope.analysis.probes  # noqa: F401  (importing the modules must not shadow the functions)
    import layerscope.metrics.scan  # noqa: F401
    import layerscope.actions.steer  # noqa: F401

    for name in ("scan", "probe", "steer", "agree", "lens", "prune", "quantize", "load", "load_model", "perplexity"):
        assert callable(getattr(layerscope, name)), name
    assert layerscope.scan.__module__ == "layerscope.metrics.scan"


def test_scan_api_on_tiny_model():
    from tiny_models import build, sample_inputs

    table = layerscope.scan(build("qwen2"), sample_inputs("qwen2"), metrics="block_influence,weights")
    assert table.num_layers == 4
    assert len(table.least_important("block_influence", 2)) == 2
