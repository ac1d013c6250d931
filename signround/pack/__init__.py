"""Packed quantized weights: the one artifact that exporters consume."""

from signround.pack.bitpack import pack_int32, unpack_int32
from signround.pack.packed import QuantLinear

__all__ = ["QuantLinear", "pack_int32", "unpack_int32"]
