"""The export formats, their options, and the registry of exporters keyed by format.

:class:`~signround.config.ExportFormat` (defined once, in the config layer, so a config can refuse what a
format cannot hold) names every format; its value is the name a user gives to ``--format`` (``native``,
``gguf:q4_k_m``). An exporter is a subclass of :class:`Exporter` that registers itself for
one or more formats with :func:`register_exporter` when its module is imported (one instance per format,
which knows its format); registering a format twice is an error. :mod:`signround.export` imports every
exporter module, so ``get_exporter`` finds each format there.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from signround.config import ActScheme, ExportFormat
from signround.model.blocks import Planned
from signround.model.lazy import BlockStream


@dataclass(frozen=True)
class ExportOptions:
    """What an export needs beyond the model and the tokenizer.

    Attributes:
        allow_partial_groups: compressed-tensors and auto_round write integer groups that do not divide a
            layer's input width (stock readers fail on them at the first forward; refused by default).
        stream: the block store of a streamed (``--low-memory``) run: the native writer reads the finished
            blocks' packed tensors back from it, one block at a time, as the model holds none of them.
        act: the activation scheme of every quantized layer (None: weights only), so that a format's check
            refuses, before tuning, activations it cannot store (only formats whose
            :attr:`ExportFormat.stores_activations` is set get a plan with one).
    """

    allow_partial_groups: bool = False
    stream: BlockStream | None = None
    act: ActScheme | None = None


class Exporter(abc.ABC):
    """The writer of one format (``self.format``). Exporters read ``QuantLinear`` layers only; they never
    import the tuning code. Subclasses register with ``@register_exporter(ExportFormat.X, ...)``."""

    def __init__(self, fmt: ExportFormat) -> None:
        self.format = fmt

    def check(self, model: Any, planned: Sequence[Planned], options: ExportOptions) -> None:  # noqa: B027
        """Refuse, before any tuning, a layer plan this format cannot store (``planned``: every layer that
        will be quantized, with its scheme and shape), so that a long run never fails at the end. The
        default accepts any plan."""

    @abc.abstractmethod
    def write(self, model: Any, tokenizer: Any, folder: Path, options: ExportOptions) -> None:
        """Write ``model`` (and ``tokenizer``) into ``folder``, which exists and is empty; the caller owns
        atomicity (a temporary folder renamed at the end)."""


_EXPORTERS: dict[ExportFormat, Exporter] = {}
_E = TypeVar("_E", bound=type[Exporter])


def register_exporter(*formats: ExportFormat) -> Callable[[_E], _E]:
    """Class decorator: register one instance of the class per format in ``formats``.

    Raises:
        ValueError: no format, a format listed twice, or one that already has an exporter (nothing of
            this class is registered then).
    """
    fmts = [ExportFormat(f) for f in formats]
    if not fmts:
        raise ValueError("register_exporter needs at least one ExportFormat")

    def register(cls: _E) -> _E:
        for i, f in enumerate(fmts):  # every format checked before any is registered
            if f in fmts[:i]:
                raise ValueError(f"register_exporter lists {f} twice for {cls.__name__}")
            if f in _EXPORTERS:
                owner = type(_EXPORTERS[f]).__name__
                raise ValueError(f"exporter {f} is already registered by {owner}; a format has one exporter")
        for f in fmts:
            _EXPORTERS[f] = cls(f)
        return cls

    return register


def get_exporter(fmt: ExportFormat | str) -> Exporter:
    """The registered exporter of ``fmt`` (import :mod:`signround.export` first: it registers them all).

    Raises:
        ValueError: ``fmt`` is no format name.
        LookupError: no exporter is registered for it.
    """
    fmt = ExportFormat(fmt)
    if fmt not in _EXPORTERS:
        raise LookupError(f"no exporter is registered for {fmt}; import signround.export")
    return _EXPORTERS[fmt]
