"""Registry of number formats, keyed by :class:`signround.config.DType`.

A format is an object (a module such as :mod:`signround.formats.int_affine`, or an instance such as
:class:`signround.formats.fp.FloatFormat`) with these functions; grouped tensors are ``[out, groups, g]``
and per-group ones ``[out, groups]``:

* ``group_minmax(wg) -> (wmin, wmax, ...)``: fixed per-group statistics the parameters derive from (the
  extremes widened to 0; ``bitmod`` adds its per-group type ids);
* ``compute_qparams(*stats, bits, sym, min_factor, max_factor) -> (scale, zero)``: float32, differentiable
  in SignRound's clipping factors;
* ``fake_quant(wg, scale, zero, bits, v)``: quantize-dequantize with rounding offsets ``v`` (straight-through);
* ``quantize_codes(wg, scale, zero, bits, v)``: uint8 codes ``[out, groups, g]`` in ``[0, 2^bits)``;
* ``dequantize_codes(codes, scale, zero)``: float32 weights, equal to ``fake_quant``'s bit for bit;
* ``stored_layout(scheme, out_features, groups) -> {name: (shape, dtype)}``: the tensors a ``QuantLinear``
  stores besides its packed codes (``scales`` always; e.g. ``qzeros``, ``tensor_scale``);
* ``to_stored(scale, zero, scheme) -> {name: tensor}`` and ``from_stored(stored, scheme) -> (scale, zero)``:
  exact conversions between those tensors and the parameters;
* ``group_bits(scheme) -> int``: storage bits per group besides the codes (scale, zero point, type id), for
  size budgets and bits-per-weight reports.

What ``scale`` and ``zero`` mean is the format's (documented in its module). Registering a key twice is an
error.
"""

from __future__ import annotations

from typing import Any

from signround.config import DType
from signround.formats import int_affine
from signround.formats.bitmod import BitMoDFormat
from signround.formats.fp import E1M2, E2M1, E2M3, E3M0, E3M2, E4M3, E5M2, FloatFormat
from signround.formats.kquant import Q2_K, Q3_K, Q4_K, Q6_K
from signround.formats.mx import MXFP4Format
from signround.formats.nvfp4 import NVFP4Format

_REGISTRY: dict[DType, Any] = {}


def register_format(dtype: DType, impl: Any) -> None:
    if dtype in _REGISTRY:
        raise ValueError(f"format {dtype.value!r} is already registered")
    _REGISTRY[dtype] = impl


def get_format(dtype: DType) -> Any:
    try:
        return _REGISTRY[DType(dtype)]
    except (KeyError, ValueError):
        raise ValueError(f"no format registered for {dtype!r}") from None


register_format(DType.INT, int_affine)
register_format(DType.FP4_E2M1, FloatFormat(E2M1))
register_format(DType.FP4_E1M2, FloatFormat(E1M2))
register_format(DType.FP4_E3M0, FloatFormat(E3M0))
register_format(DType.FP6_E2M3, FloatFormat(E2M3))
register_format(DType.FP6_E3M2, FloatFormat(E3M2))
register_format(DType.FP8_E4M3, FloatFormat(E4M3))
register_format(DType.FP8_E5M2, FloatFormat(E5M2))
register_format(DType.MXFP4, MXFP4Format())
register_format(DType.NVFP4, NVFP4Format())
register_format(DType.BITMOD, BitMoDFormat())
register_format(DType.Q4_K, Q4_K)
register_format(DType.Q2_K, Q2_K)
register_format(DType.Q6_K, Q6_K)
register_format(DType.Q3_K, Q3_K)
