"""Writers of quantized checkpoints, in a registry keyed by format name.

An exporter is ``fn(model, tokenizer, folder) -> None`` writing into an empty, existing folder; the caller
(:func:`signround.export.save`) owns atomicity (temporary folder, rename at the end). Exporters read
``QuantLinear`` layers only; they never import the tuning code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from signround.errors import SignRoundError
from signround.export.atomic import atomic_folder
from signround.export.native import write_native

Exporter = Callable[[Any, Any, Path], None]
_EXPORTERS: dict[str, Exporter] = {}


def register_exporter(name: str, fn: Exporter) -> None:
    if name in _EXPORTERS:
        raise ValueError(f"exporter {name!r} is already registered")
    _EXPORTERS[name] = fn


def exporter_names() -> list[str]:
    return sorted(_EXPORTERS)


def save(model: Any, tokenizer: Any, output: str | Path, fmt: str = "native", overwrite: bool = False) -> Path:
    """Write ``model`` (and ``tokenizer``) to ``output`` in format ``fmt``, atomically."""
    if fmt not in _EXPORTERS:
        raise SignRoundError(f"unknown format {fmt!r}; choose one of {', '.join(exporter_names())}")
    with atomic_folder(output, overwrite=overwrite) as tmp:
        _EXPORTERS[fmt](model, tokenizer, tmp)
    return Path(output)


register_exporter("native", write_native)
