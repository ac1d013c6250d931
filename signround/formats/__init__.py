"""Number formats: what a quantized weight is. The registry maps a :class:`DType` to its format.

Every format is a :class:`~signround.formats.base.WeightFormat` subclass that registers one instance of
itself when its module is imported (``@register_format``; a data type registered twice is an error). The
interface, the parameter types and the shapes are in :mod:`signround.formats.base`; one module per family:

* :mod:`~signround.formats.int_affine`: ``int`` (:class:`IntAffineFormat`);
* :mod:`~signround.formats.fp`: ``fp4_e2m1`` .. ``fp8_e5m2`` (:class:`FP4E2M1Format` ..);
* :mod:`~signround.formats.mx`: ``mxfp4``; :mod:`~signround.formats.nvfp4`: ``nvfp4``;
* :mod:`~signround.formats.bitmod`: ``bitmod``;
* :mod:`~signround.formats.kquant`: ``q4_k``, ``q2_k``, ``q6_k``, ``q3_k``.

Importing this package imports (so registers) all of them.
"""

from __future__ import annotations

from signround.formats.base import Layout, QParams, Scheme, WeightFormat, get_format, register_format, registered
from signround.formats.bitmod import BitMoDFormat, BitMoDParams
from signround.formats.dtype import DType
from signround.formats.fp import (
    FloatFormat,
    FloatParams,
    FP4E1M2Format,
    FP4E2M1Format,
    FP4E3M0Format,
    FP6E2M3Format,
    FP6E3M2Format,
    FP8E4M3Format,
    FP8E5M2Format,
)
from signround.formats.int_affine import AffineParams, IntAffineFormat
from signround.formats.kquant import (
    KQuantFormat,
    KQuantParams,
    Q2KFormat,
    Q3KFormat,
    Q4KFormat,
    Q6KFormat,
    SymKQuantFormat,
)
from signround.formats.mx import MXFP4Format
from signround.formats.nvfp4 import NVFP4Format

__all__ = [
    "AffineParams",
    "BitMoDFormat",
    "BitMoDParams",
    "DType",
    "FP4E1M2Format",
    "FP4E2M1Format",
    "FP4E3M0Format",
    "FP6E2M3Format",
    "FP6E3M2Format",
    "FP8E4M3Format",
    "FP8E5M2Format",
    "FloatFormat",
    "FloatParams",
    "IntAffineFormat",
    "KQuantFormat",
    "KQuantParams",
    "Layout",
    "MXFP4Format",
    "NVFP4Format",
    "QParams",
    "Q2KFormat",
    "Q3KFormat",
    "Q4KFormat",
    "Q6KFormat",
    "Scheme",
    "SymKQuantFormat",
    "WeightFormat",
    "get_format",
    "register_format",
    "registered",
]
