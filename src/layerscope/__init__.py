"""layerscope: which layers of this transformer matter, and what to do about it."""
__version__ = "0.1.0"
