"""Where signround keeps files between runs; knows nothing about models (rank 0, importable from anywhere)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SIGNROUND_CACHE"


def cache_dir() -> Path:
    """The cache folder: ``$SIGNROUND_CACHE``, default ``~/.cache/signround``. It holds the float models built
    from the built-in aliases (``<cache>/smollm2-135m``) and the prepared zero-shot task files
    (``<cache>/tasks``)."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "signround"))
