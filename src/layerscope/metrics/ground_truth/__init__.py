"""Ground truth for layer importance: what a unit is worth when it is actually taken out, and the
gradient- and relevance-based scores that are usually trusted as its proxies.

* `ablation`  -- leave one block / attention sublayer / MLP sublayer out and measure the damage
  (KL to the full model's next-token distribution, change of the mean NLL and perplexity).
* `taylor`, `fisher`, `grad_norm`, `weight_norm` -- one forward + backward over calibration data.
* `relevance` -- gradient x activation at block outputs and sublayer outputs (LRP-style).
* `quant_sensitivity` -- the output KL when one block alone is quantized.

They are metrics like any other (listed in `metrics.registry`), not in the default scan.
"""
