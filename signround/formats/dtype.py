"""The weight data types, keys of the format registry (:mod:`signround.formats`).

A leaf module: it imports nothing from signround when it loads, so that every layer (the formats, the
config above them) can name a data type. What a data type fixes (its width, its block size, its
symmetry) is a fact of its registered format (:class:`signround.formats.base.WeightFormat`); the
properties below ask the registry for it.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from signround.formats.base import WeightFormat


class DType(str, enum.Enum):
    """Number format of a quantized weight; a key of the format registry.

    ``int`` is the integer affine grid (any width 2..8). The others are sign-magnitude minifloat grids
    whose width is part of the name: ``fp4_e2m1`` .. ``fp8_e5m2`` with one float16 scale per group,
    ``mxfp4`` (OCP MX: e2m1 elements, power-of-two scale per 32 weights) and ``nvfp4`` (e2m1 elements,
    e4m3 scale per 16 weights times one float32 scale per tensor); see :mod:`signround.formats.fp`.
    ``bitmod`` is a per-group mixture of 4-bit grids (INT4 asymmetric and FP4 variants), see
    :mod:`signround.formats.bitmod`. ``q4_k`` is llama.cpp's Q4_K structure (4-bit codes in groups of 32,
    6-bit group scales and minimums under float16 factors per 256 weights), ``q2_k`` its Q2_K structure
    (2-bit codes in groups of 16, 4-bit scales and minimums), ``q6_k`` / ``q3_k`` its symmetric Q6_K /
    Q3_K structures (6- / 3-bit codes in groups of 16, signed 8- / 6-bit scales), see :mod:`signround.formats.kquant`.
    """

    INT = "int"
    FP4_E2M1 = "fp4_e2m1"
    FP4_E1M2 = "fp4_e1m2"
    FP4_E3M0 = "fp4_e3m0"
    FP6_E2M3 = "fp6_e2m3"
    FP6_E3M2 = "fp6_e3m2"
    FP8_E4M3 = "fp8_e4m3"
    FP8_E5M2 = "fp8_e5m2"
    MXFP4 = "mxfp4"
    NVFP4 = "nvfp4"
    BITMOD = "bitmod"
    Q4_K = "q4_k"
    Q2_K = "q2_k"
    Q6_K = "q6_k"
    Q3_K = "q3_k"

    @property
    def is_float(self) -> bool:
        """Any grid but the plain integer one: the format fixes its width and its own symmetry (the
        floating-point grids, ``bitmod`` and the K-quants); only ``int`` exports to the integer checkpoint
        formats."""
        return _format(self).fixed_sym is not None

    @property
    def implied_bits(self) -> int | None:
        """Bits per weight fixed by the format (None for ``int``, whose width is free)."""
        return _format(self).implied_bits

    @property
    def fixed_group_size(self) -> int | None:
        """Block size fixed by the format (32 for ``mxfp4`` and ``q4_k``, 16 for ``nvfp4``, ``q2_k``, ``q6_k``
        and ``q3_k``), else None."""
        return _format(self).fixed_group_size


def _format(dtype: DType) -> WeightFormat:
    """The registered format of ``dtype`` (:func:`signround.formats.get_format`)."""
    # Imported here, not at the top: the registry imports this module (its keys are DTypes). From the
    # package, not from base: the package has imported (so registered) every format.
    from signround.formats import get_format

    return get_format(dtype)
