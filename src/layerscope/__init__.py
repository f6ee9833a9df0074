"""layerscope: which layers of this transformer matter, and what to do about it."""
__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy public API (keeps `import layerscope` and the CLI's start-up light)."""
    if name == "load":
        from .fast import load

        return load
    raise AttributeError(f"module 'layerscope' has no attribute '{name}'")
