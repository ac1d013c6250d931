"""The export formats, their options, and the registry of exporters keyed by format.

:class:`ExportFormat` names every format once; its value is the name a user gives to ``--format``
(``native``, ``gguf:q4_k_m``). An exporter is a subclass of :class:`Exporter` that registers itself for
one or more formats with :func:`register_exporter` when its module is imported (one instance per format,
which knows its format); registering a format twice is an error. :mod:`signround.export` imports every
exporter module, so ``get_exporter`` finds each format there.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from signround.export.gguf_kquant import KQUANTS, MIXES
from signround.model.blocks import Planned
from signround.model.lazy import BlockStream

GGUF_PREFIX = "gguf:"


class ExportFormat(str, enum.Enum):
    """A checkpoint format; ``str(fmt)`` and f-strings give the user-visible name (the value)."""

    NATIVE = "native"
    AUTO_ROUND = "auto_round"
    GPTQ = "gptq"
    COMPRESSED_TENSORS = "compressed-tensors"
    # one GGUF file of llama.cpp's type ``<type>`` (signround.export.gguf_export, whose GGUF_TYPES lists these)
    GGUF_F16 = "gguf:f16"
    GGUF_Q8_0 = "gguf:q8_0"
    GGUF_Q4_0 = "gguf:q4_0"
    GGUF_Q4_1 = "gguf:q4_1"
    GGUF_Q4_K = "gguf:q4_k"
    GGUF_Q2_K = "gguf:q2_k"
    GGUF_Q6_K = "gguf:q6_k"
    GGUF_Q3_K = "gguf:q3_k"
    GGUF_Q4_K_M = "gguf:q4_k_m"

    __str__ = str.__str__
    __format__ = str.__format__

    @property
    def is_gguf(self) -> bool:
        return self.value.startswith(GGUF_PREFIX)

    @property
    def gguf_type(self) -> str | None:
        """The GGUF type (``q4_k_m`` for ``gguf:q4_k_m``); None for the other formats."""
        return self.value[len(GGUF_PREFIX) :] if self.is_gguf else None

    @property
    def is_kquant(self) -> bool:
        """A GGUF K-quant type or mix (:mod:`signround.export.gguf_kquant`): the format changes the layer
        plan (``gguf_kquant.format_rules``: a mix's upgraded layers, and the fallback grid of rows that are
        not a multiple of 256 weights)."""
        return self.gguf_type in KQUANTS or self.gguf_type in MIXES

    @property
    def is_mix(self) -> bool:
        """A GGUF mix of two K-quant types (``gguf:q4_k_m``: Q4_K with some layers Q6_K)."""
        return self.gguf_type in MIXES

    @property
    def subfolder(self) -> str:
        """The folder of this format when several are written at once: ``gguf:q4_k_m`` -> ``gguf-q4_k_m``."""
        return self.value.replace(":", "-")


@dataclass(frozen=True)
class ExportOptions:
    """What an export needs beyond the model and the tokenizer.

    Attributes:
        allow_partial_groups: compressed-tensors writes integer groups that do not divide a layer's input
            width (stock readers fail on them at the first forward; refused by default).
        stream: the block store of a streamed (``--low-memory``) run: the native writer reads the finished
            blocks' packed tensors back from it, one block at a time, as the model holds none of them.
    """

    allow_partial_groups: bool = False
    stream: BlockStream | None = None


class Exporter(abc.ABC):
    """The writer of one format (``self.format``). Exporters read ``QuantLinear`` layers only; they never
    import the tuning code. Subclasses register with ``@register_exporter(ExportFormat.X, ...)``."""

    stores_activations: ClassVar[bool] = False  # whether it stores activation quantization (scheme, scales)

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
