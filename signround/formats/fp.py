"""Floating-point weight grids (FP4 / FP6 / FP8) with one float16 scale per group, and the minifloat
machinery that :mod:`signround.formats.mx` and :mod:`signround.formats.nvfp4` share.

**Element formats.** A ``b``-bit element is a sign-magnitude minifloat ``eEmM`` (``b = 1 + E + M``), with
exponent bias ``2^(E-1) - 1``. A magnitude with exponent field ``e`` and mantissa field ``m`` is
``2^(1-bias) * m / 2^M`` when ``e == 0`` (subnormals: representable, never flushed) and
``2^(e-bias) * (1 + m / 2^M)`` otherwise. Which codes are finite:

========  ====  ========  =========  ===================================================================
dtype     bias  max       min > 0    codes that are not finite numbers
========  ====  ========  =========  ===================================================================
e2m1      1     6         0.5        none (OCP MX FP4)
e1m2      0     3.5       0.5        none (LLM-FP4's E1M2: uniform steps of 0.5, an INT4-like grid)
e3m0      3     16        0.25       none (LLM-FP4's E3M0: powers of two)
e2m3      1     7.5       0.125      none (OCP MX FP6)
e3m2      3     28        0.0625     none (OCP MX FP6)
e4m3      7     448       2^-9       magnitude 0x7F is NaN; no infinity (the "fn" variant, OCP FP8 E4M3)
e5m2      15    57344     2^-16      exponent field 31: infinity (mantissa 0) or NaN (IEEE-like)
========  ====  ========  =========  ===================================================================

**Code bit order.** A code is an unsigned ``b``-bit integer: bit ``b-1`` (the highest) is the sign, then
``E`` exponent bits, then ``M`` mantissa bits in the lowest bits; i.e. the element's own bit pattern (for
FP8 exactly the byte of ``torch.float8_e4m3fn`` / ``torch.float8_e5m2``). Zero is always written as +0
(code 0); decoding accepts -0. Codes are packed like integer codes (:mod:`signround.pack.bitpack`).
Because the magnitude field increases with the value, the magnitude code *is* the index into the sorted
table of representable magnitudes, and its lowest bit is the mantissa's lowest bit.

**Rounding.** ``x = w / scale`` is rounded to the nearest representable value; ties go to the even
mantissa (IEEE round-half-to-even, as the OCP MX spec and torch's float8 casts do); without mantissa bits
(e3m0), to the even magnitude code. Magnitudes above the
grid maximum saturate to it (no infinities, no NaN).

**SignRound's offset** ``v`` is in units of the local grid step: the spacing of the two representable
values around ``x`` (the grid is uniform within a binade ``[2^e, 2^(e+1))``, with spacing
``2^(e - M)``, and in the subnormal range). The chosen value is ``round(|x| / step + v') * step`` with
the sign of ``x``, ``round`` half to even, and ``v' = v`` for ``x >= 0``, ``-v`` for ``x < 0``, so that
``v > 0`` always moves the signed value up, as on the integer grid, whose rule is ``round(x + v)``. For
``|v| <= 0.5`` the result is one of the two neighbours of ``x``: ``v = +-0.5`` moves a weight to its upper
or lower neighbour exactly as on the integer grid. Larger offsets act as +-0.5 (SignRound's default step
sizes keep ``|v| <= 0.5`` anyway). Magnitudes beyond the grid are saturated before the offset. The gradient
is straight-through in value space: ``d q / d x = 1`` and ``d q / d v = step`` inside the grid, 0 where
the value saturates (as the integer grid's clamp).

**Scale and clipping.** Sign-magnitude grids are symmetric, so there is no zero point and one clipping
factor: ``scale = float16(max_factor * absmax / grid_max)`` per group (``absmax`` = the group's largest
``|w|``, ``max_factor`` learned in [0, 1]); SignRound's ``min_factor`` is not used (it receives no
gradient and stays 1). The scale is rounded through float16 because the checkpoint stores it so, and kept
within float16's positive range (an all-zero group gets the smallest float16 subnormal; its codes are 0).

**Parameters.** Like every format (see :mod:`signround.formats.base`), the per-group parameters are a
pair of ``[out, groups]`` float32 tensors, here :class:`FloatParams` ``(scale, tensor_scale)``: the second
is a per-tensor multiplier broadcast to every group (1 here and for MX; NVFP4's float32 tensor scale), and
a weight decodes to ``element(code) * (scale * tensor_scale)``. All tensors are grouped ``[out, groups, g]``.
The methods' positional ``(scale, zero)`` are these two.

**Registered formats.** One class per element format: :class:`FP4E2M1Format` .. :class:`FP8E5M2Format`
(``fp4_e2m1`` .. ``fp8_e5m2``); :mod:`signround.formats.mx` and :mod:`signround.formats.nvfp4` subclass
:class:`FloatFormat` with their own scale rules.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from signround.formats import int_affine
from signround.formats.base import Layout, Scheme, WeightFormat, register_format
from signround.formats.dtype import DType
from signround.formats.int_affine import fp16_round

FP16_MIN = 2.0**-24  # smallest positive float16 (subnormal)
FP16_MAX = 65504.0


@dataclass(frozen=True)
class Minifloat:
    """A sign-magnitude minifloat element format.

    Attributes:
        name: ``e2m1``, ``e2m3``, ``e3m2``, ``e4m3`` or ``e5m2``.
        exp_bits, man_bits: widths of the exponent and mantissa fields.
        specials: ``none`` (every code finite), ``fn`` (only the all-ones magnitude is NaN),
            ``ieee`` (the all-ones exponent holds infinity and NaN).
    """

    name: str
    exp_bits: int
    man_bits: int
    specials: str = "none"

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1

    @property
    def max_code(self) -> int:
        """The largest finite magnitude code; magnitude codes ``0..max_code`` are exactly the finite values."""
        top = 2 ** (self.exp_bits + self.man_bits) - 1
        if self.specials == "fn":
            return top - 1
        if self.specials == "ieee":
            return top - 2**self.man_bits
        return top

    @property
    def max_value(self) -> float:
        return magnitude(self, self.max_code)


E2M1 = Minifloat("e2m1", 2, 1)
E1M2 = Minifloat("e1m2", 1, 2)
E3M0 = Minifloat("e3m0", 3, 0)
E2M3 = Minifloat("e2m3", 2, 3)
E3M2 = Minifloat("e3m2", 3, 2)
E4M3 = Minifloat("e4m3", 4, 3, "fn")
E5M2 = Minifloat("e5m2", 5, 2, "ieee")


def magnitude(fmt: Minifloat, code: int) -> float:
    """Value of magnitude code ``code`` (``0 <= code < 2^(b-1)``); inf or NaN for special codes."""
    e, m = code >> fmt.man_bits, code & (2**fmt.man_bits - 1)
    if fmt.specials == "fn" and code == 2 ** (fmt.exp_bits + fmt.man_bits) - 1:
        return float("nan")
    if fmt.specials == "ieee" and e == 2**fmt.exp_bits - 1:
        return float("inf") if m == 0 else float("nan")
    if e == 0:
        return m / 2**fmt.man_bits * 2.0 ** (1 - fmt.bias)
    return (1 + m / 2**fmt.man_bits) * 2.0 ** (e - fmt.bias)


@functools.cache
def magnitudes(fmt: Minifloat) -> torch.Tensor:
    """float32 ``[2^(b-1)]``: the value of every magnitude code, specials included (increasing up to
    ``max_code``)."""
    return torch.tensor([magnitude(fmt, c) for c in range(2 ** (fmt.bits - 1))], dtype=torch.float32)


def _finite_table(fmt: Minifloat, device: torch.device) -> torch.Tensor:
    return magnitudes(fmt)[: fmt.max_code + 1].to(device)


def grid_step(a: torch.Tensor, fmt: Minifloat) -> torch.Tensor:
    """float32 distance between the representable magnitudes around ``a >= 0`` (float32, at most the grid
    max): ``2^(max(floor(log2 a), 1 - bias) - M)``, the spacing of ``a``'s binade (the subnormal spacing
    below the smallest normal). Exact: computed on the float32 exponent field (bits 23-30 of ``a``)."""
    exponent_field = a.view(torch.int32) >> 23  # floor(log2 a) + 127 for normal a; 0 for 0 and subnormals
    step_field = exponent_field.clamp(min=1 - fmt.bias + 127) - fmt.man_bits
    return (step_field << 23).view(torch.float32)


@torch.no_grad()
def nearest(x: torch.Tensor, fmt: Minifloat, v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid value chosen for ``x`` (plus ``v`` local steps), and the local step.

    Args:
        x: values in grid units (any shape), e.g. ``w / scale``.
        fmt: the element format.
        v: offsets in local grid steps (same shape as ``x``), or None for plain round-to-nearest.

    Returns:
        ``(q, step)``, float32, no gradient: ``q`` a representable value (see the module docstring) and
        ``step`` the spacing of the two representable magnitudes around ``|x|``.

    Why this is exact: ``|x| / step`` is an exact division by a power of two, and its integer values are the
    grid points of ``|x|``'s binade, the even ones having an even mantissa; so ``round`` (half to even) of
    ``|x| / step + v`` is round-to-nearest-even onto the grid. With ``|v| <= 0.5`` the result stays within
    one step, so it is a grid point even across a binade edge (``|v|`` is clamped to 0.5 here: larger
    offsets act as 0.5), and the top value is clamped to the grid max.
    """
    a = x.float().abs().clamp(max=fmt.max_value)  # saturate: no infinities; float32 for grid_step
    step = grid_step(a, fmt)
    y = a / step
    if v is not None:
        y = y + torch.where(x < 0, -v, v).clamp(-0.5, 0.5)  # v moves the signed value: mirror it for x < 0
    r = torch.round(y)
    if fmt.man_bits == 0:  # no mantissa: a tie between 2^e and 2^(e+1) goes to the even exponent code
        lower_code = torch.frexp(step)[1] - 1 + fmt.bias  # code of the value `step` (= 2^e) itself
        tie = (y - torch.floor(y) == 0.5) & (torch.floor(y) == 1)
        r = torch.where(tie, torch.where(lower_code % 2 == 0, 1.0, 2.0), r)
    q = (r * step).clamp(max=fmt.max_value)
    return torch.copysign(q, x), step


def round_to_grid(x: torch.Tensor, fmt: Minifloat, v: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest grid value of ``x`` (plus ``v`` local steps), with a straight-through gradient.

    The value is exactly a representable element; the gradient is that of ``clamp(x + v * step)``.
    """
    q, step = nearest(x, fmt, v)
    surrogate = x if v is None else x + v * step
    surrogate = surrogate.clamp(-fmt.max_value, fmt.max_value)
    # Adds exactly 0, so q's value is kept bit for bit, while the gradient is the surrogate's.
    return q + (surrogate - surrogate.detach())


@torch.no_grad()
def encode(q: torch.Tensor, fmt: Minifloat) -> torch.Tensor:
    """Grid values (from :func:`nearest`) -> uint8 codes: sign in bit ``b-1``, then exponent, then mantissa
    (lowest bits); zero is +0 (code 0)."""
    table = _finite_table(fmt, q.device)
    magnitude_code = torch.searchsorted(table, q.abs().reshape(-1), out_int32=True).reshape(q.shape)
    sign = (q < 0).to(torch.int32) << (fmt.bits - 1)
    return (sign | magnitude_code).to(torch.uint8)


def decode(codes: torch.Tensor, fmt: Minifloat) -> torch.Tensor:
    """uint8 codes (any shape) -> float32 element values (specials decode to inf / NaN)."""
    c = codes.to(torch.int64)
    half = 2 ** (fmt.bits - 1)
    mag = magnitudes(fmt).to(codes.device)[c % half]
    return torch.where(c >= half, -mag, mag)


def divide_by_scale(wg: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``wg / scale`` for ``[out, groups, g]`` weights and ``[out, groups, 1]`` scales; 0 where the scale
    is 0 (an NVFP4 block whose e4m3 scale underflows), with a finite gradient."""
    positive = scale > 0
    return torch.where(positive, wg / torch.where(positive, scale, torch.ones_like(scale)), torch.zeros_like(wg))


def group_absmax(wmin: torch.Tensor, wmax: torch.Tensor, max_factor: torch.Tensor | None) -> torch.Tensor:
    """``max_factor * max(-wmin, wmax)`` per group, the factor clamped to [0, 1] (None means 1)."""
    absmax = torch.maximum(-wmin, wmax)
    if max_factor is not None:
        absmax = absmax * max_factor.clamp(0, 1)
    return absmax


class FloatParams(NamedTuple):
    """Per-group parameters of a minifloat grid: a weight decodes to ``element(code) * (scale *
    tensor_scale)``; both ``[out, groups]`` float32.

    Attributes:
        scale: the group's (block's) scale: a float16 value (``fp*``), a power of two (``mxfp4``), an e4m3
            value (``nvfp4``).
        tensor_scale: the per-tensor multiplier, the same in every group: 1, or NVFP4's float32 tensor scale.
    """

    scale: torch.Tensor
    tensor_scale: torch.Tensor


class FloatFormat(WeightFormat):
    """A minifloat grid with one float16 scale per group; the concrete formats below (and MXFP4 / NVFP4)
    name their element format and data type.

    The ``bits`` arguments are the shared signature's and ignored: the element format fixes the width.
    """

    element: ClassVar[Minifloat]
    fixed_sym = True
    params_type = FloatParams

    # ---------------------------------------------------------------- per-group parameters

    # Per-group ``(min, max)`` widened to include 0, the statistics the integer grid uses as well.
    group_minmax = staticmethod(int_affine.group_minmax)

    def choose_qparams(
        self,
        stats: Sequence[torch.Tensor],
        scheme: Scheme,
        min_factor: torch.Tensor | None = None,
        max_factor: torch.Tensor | None = None,
    ) -> FloatParams:
        """``(scale, tensor_scale)``, both ``[out, groups]`` float32, from the clipped absmax ``max_factor *
        absmax`` of ``stats = (wmin, wmax)`` by :meth:`group_scales`; differentiable in ``max_factor``.
        ``min_factor`` is unused (one clip factor) and so is the scheme (the format fixes the grid)."""
        wmin, wmax = stats
        return FloatParams(*self.group_scales(group_absmax(wmin, wmax, max_factor), wmin, wmax))

    def group_scales(
        self, absmax: torch.Tensor, wmin: torch.Tensor, wmax: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(float16(absmax / grid_max), ones)`` from the clipped ``absmax [out, groups]``; subclasses with
        other scale rules override this (``wmin``/``wmax`` are the unclipped extremes)."""
        scale = fp16_round(absmax / self.element.max_value).clamp(FP16_MIN, FP16_MAX)
        return scale, torch.ones_like(scale)

    # ---------------------------------------------------------------- quantization

    def fake_quant(
        self,
        wg: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bits: int | None = None,
        v: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Quantize-dequantize ``wg [out, groups, g]`` with offsets ``v`` (same shape, or None):
        ``element(round(wg / s + v steps)) * s`` with ``s = scale * zero`` (``zero``: the tensor scale);
        straight-through gradients reach ``v``, ``scale`` and the clipping factors. Equals
        ``dequantize_codes(quantize_codes(.))`` bit for bit."""
        s = (scale * zero).unsqueeze(-1)
        return round_to_grid(divide_by_scale(wg, s), self.element, v) * s

    @torch.no_grad()
    def quantize_codes(
        self,
        wg: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bits: int | None = None,
        v: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """uint8 codes ``[out, groups, g]`` (sign high, exponent, mantissa low) for the rounding of
        :meth:`fake_quant`."""
        s = (scale * zero).unsqueeze(-1)
        q, _ = nearest(divide_by_scale(wg, s), self.element, v)
        return encode(q, self.element)

    def dequantize_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """``element(codes) * (scale * zero)`` for grouped codes ``[out, groups, g]`` and ``[out, groups]``
        float32 parameters."""
        return decode(codes, self.element) * (scale * zero).unsqueeze(-1)

    # ---------------------------------------------------------------- storage (QuantLinear buffers)

    def group_bits(self, scheme: Scheme) -> int:
        """Storage bits per group besides the codes: one float16 scale."""
        return 16

    def stored_layout(self, scheme: Scheme, out_features: int, groups: int) -> Layout:
        """Buffers a ``QuantLinear`` holds besides ``qweight``: ``scales`` float16 ``[out, groups]``."""
        return {"scales": ((out_features, groups), torch.float16)}

    def to_stored(self, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme) -> dict[str, torch.Tensor]:
        """``(scale, zero)`` -> the buffers of :meth:`stored_layout` (exact: the scale is a float16 value)."""
        return {"scales": scale.detach().to(torch.float16)}

    def from_stored(self, stored: dict[str, torch.Tensor], scheme: Scheme) -> FloatParams:
        """Inverse of :meth:`to_stored`: float32 ``(scale, tensor_scale)`` ``[out, groups]``."""
        scale = stored["scales"].float()
        return FloatParams(scale, torch.ones_like(scale))


# ---------------------------------------------------------------- the registered formats (one float16 scale per group)


@register_format
class FP4E2M1Format(FloatFormat):
    dtype = DType.FP4_E2M1
    element = E2M1
    implied_bits = E2M1.bits


@register_format
class FP4E1M2Format(FloatFormat):
    dtype = DType.FP4_E1M2
    element = E1M2
    implied_bits = E1M2.bits


@register_format
class FP4E3M0Format(FloatFormat):
    dtype = DType.FP4_E3M0
    element = E3M0
    implied_bits = E3M0.bits


@register_format
class FP6E2M3Format(FloatFormat):
    dtype = DType.FP6_E2M3
    element = E2M3
    implied_bits = E2M3.bits


@register_format
class FP6E3M2Format(FloatFormat):
    dtype = DType.FP6_E3M2
    element = E3M2
    implied_bits = E3M2.bits


@register_format
class FP8E4M3Format(FloatFormat):
    dtype = DType.FP8_E4M3
    element = E4M3
    implied_bits = E4M3.bits


@register_format
class FP8E5M2Format(FloatFormat):
    dtype = DType.FP8_E5M2
    element = E5M2
    implied_bits = E5M2.bits
