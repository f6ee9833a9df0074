"""Compression primitives shared by measurement and actions (fake quantization, ...)."""
