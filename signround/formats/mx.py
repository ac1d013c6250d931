"""MXFP4 (OCP Microscaling Formats v1.0): blocks of 32 FP4 (e2m1) elements sharing one E8M0 scale.

My reading of the spec, as implemented here:

* A block is 32 consecutive weights along the input dimension (the scheme's group size is fixed to 32).
* The shared scale is ``X = 2^shared_exp`` with ``shared_exp = floor(log2(absmax)) - emax_elem``, where
  ``absmax`` is the block's largest ``|w|`` and ``emax_elem = 2`` is the exponent of e2m1's largest normal
  (6 = 1.5 * 2^2). ``shared_exp`` is clamped to E8M0's range ``[-127, 127]`` (the spec makes an overflowing
  scale NaN; weights never get there). An all-zero block gets ``2^-127`` and zero elements.
* Elements are ``w / X`` rounded to e2m1 (ties to even), saturating at +-6: with ``absmax / X`` in
  ``[4, 8)``, values above ``6 X`` are clipped, by design of the spec.
* E8M0 is an unsigned 8-bit biased exponent: byte ``e + 127`` stands for ``2^e``; 255 is NaN (never
  written). A weight decodes to ``e2m1(code) * 2^(byte - 127)``.

SignRound's clipping factor multiplies ``absmax`` before the ``floor(log2(.))`` (straight-through floor),
so it can only lower the shared exponent; rounding offsets work as for every minifloat grid (see
:mod:`signround.formats.fp`, which also documents the element codes: 4 bits, sign high).

Stored per ``QuantLinear``: ``scales`` uint8 ``[out, groups]`` holding the E8M0 bytes.
"""

from __future__ import annotations

import torch

from signround.formats.base import Layout, Scheme, register_format
from signround.formats.dtype import DType
from signround.formats.fp import E2M1, FloatFormat, FloatParams

BLOCK = 32
EMAX_ELEM = 2  # exponent of e2m1's largest normal, 6 = 1.5 * 2^2
E8M0_BIAS = 127
MIN_EXP, MAX_EXP = -127, 127


def pow2(exponent: torch.Tensor) -> torch.Tensor:
    """Exact float32 ``2^exponent`` for integer-valued ``exponent`` in ``[-127, 127]`` (via float64, where
    every such power is exact; 2^-127 is a float32 subnormal)."""
    return torch.pow(2.0, exponent.to(torch.float64)).to(torch.float32)


def shared_exponent(absmax: torch.Tensor) -> torch.Tensor:
    """``clamp(floor(log2(absmax)) - 2, -127, 127)`` as float32 with a straight-through floor; an all-zero
    block (``absmax == 0``) gets -127."""
    log2 = torch.log2(absmax.clamp(min=2.0**MIN_EXP))
    exp = log2 + (torch.floor(log2) - log2).detach()
    return (exp - EMAX_ELEM).clamp(MIN_EXP, MAX_EXP)


@register_format
class MXFP4Format(FloatFormat):
    """OCP MXFP4: e2m1 elements, one E8M0 (power-of-two) scale per block of 32; parameters
    :class:`~signround.formats.fp.FloatParams` ``(2^shared_exp, 1)``."""

    dtype = DType.MXFP4
    element = E2M1
    implied_bits = E2M1.bits
    fixed_group_size = BLOCK

    def group_scales(
        self, absmax: torch.Tensor, wmin: torch.Tensor, wmax: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(2^shared_exp, ones)``, ``[out, groups]`` float32; the value is an exact power of two, the
        gradient that of ``2^(log2(max_factor * absmax) - 2)``."""
        exp = shared_exponent(absmax)
        smooth = torch.exp2(exp)
        scale = pow2(exp.detach()) + (smooth - smooth.detach())
        return scale, torch.ones_like(scale)

    def group_bits(self, scheme: Scheme) -> int:
        """Storage bits per block besides the codes: one E8M0 byte."""
        return 8

    def stored_layout(self, scheme: Scheme, out_features: int, groups: int) -> Layout:
        """``scales`` uint8 ``[out, groups]``: E8M0 bytes (``2^(byte - 127)``)."""
        return {"scales": ((out_features, groups), torch.uint8)}

    def to_stored(self, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme) -> dict[str, torch.Tensor]:
        mantissa, exponent = torch.frexp(scale.detach())  # scale = 0.5 * 2^exponent exactly
        if not bool((mantissa == 0.5).all()):
            raise ValueError("MXFP4 scales must be powers of two")
        return {"scales": (exponent - 1 + E8M0_BIAS).to(torch.uint8)}

    def from_stored(self, stored: dict[str, torch.Tensor], scheme: Scheme) -> FloatParams:
        scale = pow2(stored["scales"].to(torch.int32) - E8M0_BIAS)
        return FloatParams(scale, torch.ones_like(scale))
