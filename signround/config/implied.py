"""The scheme a checkpoint format implies: ``--format gguf:q4_0`` alone means symmetric 4-bit groups of 32.

A format that stores one grid exactly (GGUF's block types, the K-quant structures) fixes some scheme fields;
:func:`implied_scheme` fills the fields a user left unset from it, and refuses an explicit field that
contradicts it with one line naming both. Formats that store any grid (native, compressed-tensors, GPTQ,
auto_round, ``gguf:f16``) imply nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from signround.config.choices import ExportFormat
from signround.config.scheme import QuantScheme
from signround.config.stages import parse_formats
from signround.errors import SignRoundError

# format -> the scheme fields it fixes (QuantScheme's names; a K-quant's dtype fixes its width and blocks)
IMPLIED: dict[ExportFormat, dict[str, Any]] = {
    ExportFormat.GGUF_Q8_0: {"bits": 8, "group_size": 32, "sym": True, "dtype": "int"},
    ExportFormat.GGUF_Q4_0: {"bits": 4, "group_size": 32, "sym": True, "dtype": "int"},
    ExportFormat.GGUF_Q4_1: {"bits": 4, "group_size": 32, "sym": False, "dtype": "int"},
    ExportFormat.GGUF_Q4_K: {"dtype": "q4_k"},
    ExportFormat.GGUF_Q2_K: {"dtype": "q2_k"},
    ExportFormat.GGUF_Q3_K: {"dtype": "q3_k"},
    ExportFormat.GGUF_Q6_K: {"dtype": "q6_k"},
    ExportFormat.GGUF_Q4_K_M: {"dtype": "q4_k"},
}
_FLAGS = {"bits": "--bits", "group_size": "--group-size", "sym": "--sym", "dtype": "--data-type"}


def _given(field: str, value: Any, label: str | None) -> str:
    if label is not None:
        return label
    if field == "sym":
        return "--sym" if value else "an asymmetric grid"
    return f"{_FLAGS[field]} {value}"


def _stores(fmt: ExportFormat) -> str:
    dtype = IMPLIED[fmt]["dtype"]
    if dtype != "int":
        return f"llama.cpp's {dtype.upper()} structure (--data-type {dtype})"
    return QuantScheme(**IMPLIED[fmt]).name


def implied_scheme(
    formats: str | Sequence[str | ExportFormat],
    *,
    bits: int | None = None,
    group_size: int | None = None,
    sym: bool | None = None,
    dtype: str | None = None,
    labels: dict[str, str] | None = None,
) -> QuantScheme:
    """The :class:`QuantScheme` of the given fields (None: not given), with the fields the ``formats`` fix
    filled in (``implied_scheme("gguf:q4_k_m")`` is the Q4_K structure, ``implied_scheme("gguf:q4_0")``
    W4G32-sym); unset fields no format fixes take QuantScheme's defaults.

    ``labels`` names where a given field came from in a conflict's message (``{"bits": "--scheme W4A16"}``;
    default: its flag).

    Raises:
        SignRoundError: an explicit field differs from what a format fixes, or two formats fix one field
            differently.
    """
    given = {"bits": bits, "group_size": group_size, "sym": sym, "dtype": dtype}
    fixed: dict[str, tuple[Any, ExportFormat]] = {}
    for fmt in parse_formats(formats):
        for name, value in IMPLIED.get(fmt, {}).items():
            if name in fixed and fixed[name][0] != value:
                first = fixed[name][1]
                raise SignRoundError(
                    f"--format {first.value} and {fmt.value} store different grids ({_stores(first)} vs "
                    f"{_stores(fmt)}); write them in separate runs"
                )
            fixed[name] = (value, fmt)
    for name, (value, fmt) in fixed.items():
        if given[name] is None:
            given[name] = value
        elif given[name] != value:
            source = (labels or {}).get(name)
            raise SignRoundError(
                f"{_given(name, given[name], source)} conflicts with --format {fmt.value}, which stores "
                f"{_stores(fmt)}; drop {source or _FLAGS[name]} or choose another format"
            )
    if given["dtype"] is None:
        given["dtype"] = "int"
    return QuantScheme(**given)
