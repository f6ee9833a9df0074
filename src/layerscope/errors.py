"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class LayerscopeError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class AssetMissing(LayerscopeError):
    """An embedded asset has not been prepared yet."""

    def __init__(self, what: str):
        super().__init__(f"{what} is not prepared: run `layerscope assets fetch` first")


class NumericalError(LayerscopeError):
    """NaN/Inf met where finite numbers are required."""
