"""Registered metrics. Importing this package registers every built-in metric."""
from .base import METRICS, BlockObservation, Column, Metric, ScanContext, register  # noqa: F401
from . import activations, heads, lens, representation, weights  # noqa: F401
from ..quant import sensitivity as _quant_sensitivity  # noqa: F401,E402  (quant_sensitivity, not a default)
from ..ground_truth import ablation as _gt  # noqa: F401,E402  (ground truth: ablation, taylor, fisher, ...)

# The one-pass default scan.
DEFAULT_METRICS = (
    "block_influence",
    "angular_distance",
    "relative_contribution",
    "hidden_growth",
    "logit_lens",
    "massive_activations",
    "mlp_sparsity",
    "attention_heads",
    "weights",
)
