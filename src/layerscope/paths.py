"""Where layerscope keeps its cache (assets, hashes). LAYERSCOPE_HOME overrides the user cache dir."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    env = os.environ.get("LAYERSCOPE_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("layerscope"))
