"""Analyses built on scores and features: agreement with ground truth, probes, layer similarity, lenses, neurons."""
