"""Ground truth for layer importance: what a unit is worth when it is actually taken out, and the
gradient- and relevance-based scores that are usually trusted as its proxies.

* `ablation`  -- leave one block / attention sublayer / MLP sublayer out and measure the damage
  (KL to the full model's next-token distribution, change of the mean NLL and perplexity).
* `taylor`, `fisher`, `grad_norm`, `weight_norm` -- one forward + backward over calibration data.
* `relevance` -- gradient x activation at block outputs and sublayer outputs (LRP-style).

Importing this package registers the metrics (none of them is in the default scan) and the
report section of the agreement analysis (`layerscope.agreement`).
"""
from . import ablation, gradients, relevance  # noqa: F401

GROUND_TRUTH_METRICS = ("ablation", "taylor", "fisher", "grad_norm", "weight_norm", "relevance")


def _register_report_section() -> None:
    try:
        from ..agreement import register_report_section
    except ImportError:  # the report package is optional for the scorers themselves
        return
    register_report_section()


_register_report_section()
