"""Metrics: small units that keep streaming statistics while the engine runs each block.

`registry.METRICS` maps every metric name to its class (imported lazily); `scan` runs them.
"""
from layerscope.metrics.base import BlockObservation, Column, Metric, ScanContext  # noqa: F401
from layerscope.metrics.registry import DEFAULT_METRICS, METRICS  # noqa: F401
