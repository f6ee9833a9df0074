"""layerscope: which layers of this transformer matter, and what to do about it."""
__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy public API (keeps `import layerscope` and the CLI's start-up light)."""
    if name == "load":
        from .fast import load

        return load
    if name in ("probe", "lens", "steer"):
        import importlib

        module = importlib.import_module(f".{'lenses' if name == 'lens' else name}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'layerscope' has no attribute '{name}'")
