"""Registry of number formats, keyed by :class:`signround.config.DType`.

A format is a module-like object with ``group_minmax``, ``compute_qparams``, ``fake_quant``,
``quantize_codes`` and ``dequantize_codes`` (see :mod:`signround.formats.int_affine`). New formats
(FP grids, MX, NVFP4, GGUF K-quants) register here; registering a key twice is an error.
"""

from __future__ import annotations

from types import ModuleType

from signround.config import DType
from signround.formats import int_affine

_REGISTRY: dict[DType, ModuleType] = {}


def register_format(dtype: DType, impl: ModuleType) -> None:
    if dtype in _REGISTRY:
        raise ValueError(f"format {dtype.value!r} is already registered")
    _REGISTRY[dtype] = impl


def get_format(dtype: DType) -> ModuleType:
    try:
        return _REGISTRY[DType(dtype)]
    except KeyError:
        raise ValueError(f"no format registered for {dtype!r}") from None


register_format(DType.INT, int_affine)
