"""llama.cpp's K-quant grids with a float minimum (Q4_K's and Q2_K's structure), tuned as SignRound tunes
any grid.

A row is cut into groups of ``g`` weights (32 for Q4_K, 16 for Q2_K) and groups into super-blocks of ``n``
(8 for Q4_K, 16 for Q2_K: 256 weights). A weight decodes to

    ``w = (d * sc) * q - (dmin * m)``

with ``q`` the ``bits``-bit code of the weight (4 / 2), ``sc`` and ``m`` the group's ``scale_bits``-bit
integer scale and minimum (6 bits for Q4_K, 4 for Q2_K) and ``d``, ``dmin`` the super-block's float16
factors; the product and the difference are float32, as llama.cpp's dequantization computes them.
Unlike the ``int`` grid, the minimum is not an integer number of steps.

Quantization (my reading of llama.cpp's ``quantize_row_q4_K``, with plain min/max extremes in place of
its per-group search, which SignRound's clipping factors replace): per group, ``s = (max*b - min*a) /
(2^bits - 1)`` and ``mn = -min*a`` (``min <= 0 <= max``, so ``mn >= 0``); per super-block, ``d =
fp16(max(s) / (2^scale_bits - 1))`` and ``sc = round(s / d)`` clamped to ``[0, 2^scale_bits - 1]``
(``dmin`` and ``m`` likewise from ``mn``); codes ``q = clamp(round((w + mn') / s' + v), 0, 2^bits - 1)``
with ``s' = d*sc``, ``mn' = dmin*m``. All roundings are straight-through, so the rounding offsets ``v``
and the clipping factors ``a``/``b`` learn against the format's own two-level structure.

A row whose groups do not fill its last super-block gets a partial one (its factors come from the
groups it has); GGUF stores K-quant rows only when the row length is a multiple of ``g * n``, which the
GGUF exporter checks.

The parameters are :class:`KQuantParams` ``(scale, minimum)``: ``s'`` and ``mn'``, both float32
``[out, groups]`` (the methods' positional ``(scale, zero)``). Stored per ``QuantLinear``: ``scales`` and
``mins`` uint8 ``[out, groups]`` (``sc``, ``m``) and ``d``, ``dmin`` float16 ``[out, super-blocks]``.

Registered formats: :class:`Q4KFormat` and :class:`Q2KFormat` (this structure), :class:`Q6KFormat` and
:class:`Q3KFormat` (the symmetric one, :class:`SymKQuantFormat`); ``Q4_K`` .. ``Q3_K`` are their
registered instances.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, NamedTuple

import torch

from signround.formats.base import Layout, Scheme, WeightFormat, get_format, register_format
from signround.formats.dtype import DType
from signround.formats.int_affine import AffineParams, clip_extremes, group_minmax
from signround.primitives import round_ste

# Division guard for a group whose scale rounded to 0 (its codes are then all 0 or all max).
TINY = 1e-30


def _super_blocks(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[out, groups]`` -> ``[out, S, n]`` (``S = ceil(groups / n)``), zero-padded past the last group."""
    out, groups = x.shape
    pad = -groups % n
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(out, -1, n)


def two_level(values: torch.Tensor, n: int, smax: int, signed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(factor [out, S] float16-valued float32, ints [out, groups])`` for ``values [out, groups]`` in
    super-blocks of ``n`` groups: ``factor = fp16(max |value| / smax)``, ``ints = round(values / factor)``
    clamped to ``[0, smax]`` (``[-smax, smax]`` when ``signed``); straight-through, differentiable in
    ``values``."""
    groups = values.shape[1]
    sb = _super_blocks(values, n)
    factor = (sb.abs().amax(dim=-1) / smax).to(torch.float16).to(values.dtype)
    ints = round_ste(sb / factor.clamp(min=TINY).unsqueeze(-1)).clamp(-smax if signed else 0, smax)
    return factor, ints.reshape(values.shape[0], -1)[:, :groups]


def expand(factor: torch.Tensor, ints: torch.Tensor, n: int) -> torch.Tensor:
    """``factor [out, S] * ints [out, groups]`` -> ``[out, groups]`` float32 (exact: an fp16 times a small
    integer), ``n`` groups per super-block."""
    return factor.repeat_interleave(n, dim=1)[:, : ints.shape[1]] * ints


def factorize(values: torch.Tensor, n: int, smax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(factor float16 [out, S], ints uint8 [out, groups])`` with ``factor * ints == values`` exactly, for
    non-negative ``values`` that :func:`two_level` produced (each super-block's values are an fp16 times
    integers in ``[0, smax]``). The factor is recovered from the super-block's largest value, whose integer
    is the largest ``k <= smax`` leaving every quotient integral; any such pair decodes alike.

    Raises:
        ValueError: ``values`` is not of that form (not produced by a K-quant grid).
    """
    groups = values.shape[1]
    sb = _super_blocks(values, n)
    top = sb.amax(dim=-1)
    factor = torch.zeros_like(top)
    found = top == 0
    for k in range(smax, 0, -1):
        cand = (top / k).to(torch.float16).float()
        q = sb / cand.clamp(min=TINY).unsqueeze(-1)
        exact = (cand * k == top) & ((q == q.round()) & (q <= smax)).all(dim=-1)
        exact &= (cand.unsqueeze(-1) * q.round() == sb).all(dim=-1)
        take = exact & ~found
        factor = torch.where(take, cand, factor)
        found |= take
        if bool(found.all()):
            break
    if not bool(found.all()):
        raise ValueError("values are not float16 factors times small integers; not a K-quant grid")
    ints = torch.where(factor.unsqueeze(-1) > 0, sb / factor.clamp(min=TINY).unsqueeze(-1), 0.0).round()
    return factor.to(torch.float16), ints.reshape(values.shape[0], -1)[:, :groups].to(torch.uint8)


class KQuantParams(NamedTuple):
    """Per-group parameters of a K-quant grid with a float minimum: ``w = q * scale - minimum``; both
    ``[out, groups]`` float32.

    Attributes:
        scale: ``s' = d * sc``, the group's step.
        minimum: ``mn' = dmin * m >= 0``, subtracted after scaling (not an integer number of steps).
    """

    scale: torch.Tensor
    minimum: torch.Tensor


class KQuantFormat(WeightFormat):
    """A K-quant grid: ``implied_bits``-bit codes in groups of ``fixed_group_size``, ``scale_bits``-bit group
    scales and minimums under float16 super-block factors, ``per_super`` groups per super-block.

    The ``bits`` arguments are the shared signature's and ignored: the format fixes the width.
    """

    implied_bits: ClassVar[int]
    fixed_group_size: ClassVar[int]
    scale_bits: ClassVar[int]
    per_super: ClassVar[int]
    fixed_sym = True
    params_type = KQuantParams

    @property
    def qmax(self) -> int:
        return 2**self.implied_bits - 1

    @property
    def smax(self) -> int:
        return 2**self.scale_bits - 1

    def group_minmax(self, wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return group_minmax(wg)

    def choose_qparams(
        self,
        stats: Sequence[torch.Tensor],
        scheme: Scheme,
        min_factor: torch.Tensor | None = None,
        max_factor: torch.Tensor | None = None,
    ) -> KQuantParams:
        """``(s', mn')`` ``[out, groups]`` float32 (module docstring) of ``stats = (wmin, wmax)``,
        differentiable in the factors; the format fixes the grid, so the scheme is not read."""
        wmin, wmax = clip_extremes(*stats, min_factor, max_factor)
        d, sc = two_level((wmax - wmin) / self.qmax, self.per_super, self.smax)
        dmin, m = two_level(-wmin, self.per_super, self.smax)
        return KQuantParams(expand(d, sc, self.per_super), expand(dmin, m, self.per_super))

    def fake_quant(
        self,
        wg: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bits: int | None = None,
        v: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``q * s' - mn'`` for ``wg [out, groups, g]`` with rounding offsets ``v`` (straight-through);
        ``zero`` is the minimum ``mn'``."""
        s = scale.unsqueeze(-1)
        mn = zero.unsqueeze(-1)
        x = (wg + mn) / s.clamp(min=TINY)
        if v is not None:
            x = x + v
        q = round_ste(x).clamp(0, self.qmax)
        return q * s - mn

    @torch.no_grad()
    def quantize_codes(
        self,
        wg: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bits: int | None = None,
        v: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """uint8 codes ``[out, groups, g]`` in ``[0, 2^bits)`` for the rounding of :meth:`fake_quant`."""
        x = (wg + zero.unsqueeze(-1)) / scale.unsqueeze(-1).clamp(min=TINY)
        if v is not None:
            x = x + v
        return torch.round(x).clamp(0, self.qmax).to(torch.uint8)

    def dequantize_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return codes.float() * scale.unsqueeze(-1) - zero.unsqueeze(-1)

    def group_bits(self, scheme: Scheme) -> int:
        """Per group: its scale and minimum, plus its share of the two float16 super-block factors."""
        return 2 * self.scale_bits + 32 // self.per_super

    def stored_layout(self, scheme: Scheme, out_features: int, groups: int) -> Layout:
        supers = -(-groups // self.per_super)
        return {
            "scales": ((out_features, groups), torch.uint8),
            "mins": ((out_features, groups), torch.uint8),
            "d": ((out_features, supers), torch.float16),
            "dmin": ((out_features, supers), torch.float16),
        }

    def to_stored(self, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme) -> dict[str, torch.Tensor]:
        d, sc = factorize(scale.detach().float(), self.per_super, self.smax)
        dmin, m = factorize(zero.detach().float(), self.per_super, self.smax)
        return {"scales": sc, "mins": m, "d": d, "dmin": dmin}

    def from_stored(self, stored: dict[str, torch.Tensor], scheme: Scheme) -> KQuantParams:
        scale = expand(stored["d"].float(), stored["scales"].float(), self.per_super)
        zero = expand(stored["dmin"].float(), stored["mins"].float(), self.per_super)
        return KQuantParams(scale, zero)


@register_format
class Q4KFormat(KQuantFormat):
    """llama.cpp's Q4_K structure: 4-bit codes, groups of 32, 6-bit scales and minimums, 8 groups per
    super-block."""

    dtype = DType.Q4_K
    implied_bits = 4
    fixed_group_size = 32
    scale_bits = 6
    per_super = 8


@register_format
class Q2KFormat(KQuantFormat):
    """llama.cpp's Q2_K structure: 2-bit codes, groups of 16, 4-bit scales and minimums, 16 groups per
    super-block."""

    dtype = DType.Q2_K
    implied_bits = 2
    fixed_group_size = 16
    scale_bits = 4
    per_super = 16


class SymKQuantFormat(WeightFormat):
    """A symmetric K-quant grid (Q6_K's and Q3_K's structure): ``w = (d * sc) * (q - 2^(bits-1))`` with ``q``
    the ``bits``-bit code, ``sc`` a signed ``scale_bits``-bit integer per group of ``fixed_group_size`` and
    ``d`` a float16 factor per super-block of ``per_super`` groups.

    Per group, the scale is the full-range one of the ``int`` grid (the larger-magnitude extreme, times
    the clipping factor, lands on code 0 and the scale carries its sign); per super-block ``d = fp16(max
    |s| / (2^(scale_bits-1) - 1))`` and ``sc = round(s / d)`` (straight-through). The parameters are
    :class:`~signround.formats.int_affine.AffineParams`: ``scale`` is ``d * sc`` and ``zero_point`` is
    ``2^(bits-1)``. Stored: ``scales`` int8 ``[out, groups]``, ``d`` float16 ``[out, super-blocks]``. The
    ``bits`` arguments are the shared signature's and ignored.
    """

    implied_bits: ClassVar[int]
    fixed_group_size: ClassVar[int]
    scale_bits: ClassVar[int]
    per_super: ClassVar[int]
    fixed_sym = True
    params_type = AffineParams

    @property
    def qmax(self) -> int:
        return 2**self.implied_bits - 1

    @property
    def smax(self) -> int:
        return 2 ** (self.scale_bits - 1) - 1

    @property
    def half(self) -> int:
        return 2 ** (self.implied_bits - 1)

    def group_minmax(self, wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return group_minmax(wg)

    def choose_qparams(
        self,
        stats: Sequence[torch.Tensor],
        scheme: Scheme,
        min_factor: torch.Tensor | None = None,
        max_factor: torch.Tensor | None = None,
    ) -> AffineParams:
        """``(d * sc, 2^(bits-1))`` ``[out, groups]`` float32 of ``stats = (wmin, wmax)``, differentiable in
        the factors; the format fixes the grid, so the scheme is not read."""
        wmin, wmax = clip_extremes(*stats, min_factor, max_factor)
        d, sc = two_level(torch.where(-wmin > wmax, wmin, wmax) / -self.half, self.per_super, self.smax, signed=True)
        scale = expand(d, sc, self.per_super)
        return AffineParams(scale, torch.full_like(scale, float(self.half)))

    def _safe(self, scale: torch.Tensor) -> torch.Tensor:
        return torch.where(scale == 0, torch.ones_like(scale), scale).unsqueeze(-1)

    def fake_quant(
        self,
        wg: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bits: int | None = None,
        v: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(q - 2^(bits-1)) * scale`` with ``q = clamp(round(w / scale + v) + 2^(bits-1))``; a group whose
        scale rounded to 0 decodes to 0."""
        x = wg / self._safe(scale)
        if v is not None:
            x = x + v
        q = (round_ste(x) + self.half).clamp(0, self.qmax)
        return (q - self.half) * scale.unsqueeze(-1)

    @torch.no_grad()
    def quantize_codes(
        self,
        wg: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bits: int | None = None,
        v: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = wg / self._safe(scale)
        if v is not None:
            x = x + v
        return (torch.round(x) + self.half).clamp(0, self.qmax).to(torch.uint8)

    def dequantize_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return (codes.float() - self.half) * scale.unsqueeze(-1)

    def group_bits(self, scheme: Scheme) -> int:
        return self.scale_bits + 16 // self.per_super

    def stored_layout(self, scheme: Scheme, out_features: int, groups: int) -> Layout:
        supers = -(-groups // self.per_super)
        return {"scales": ((out_features, groups), torch.int8), "d": ((out_features, supers), torch.float16)}

    def to_stored(self, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme) -> dict[str, torch.Tensor]:
        """Exact: the largest ``|d * sc|`` of a super-block fixes ``d`` (see :func:`factorize`)."""
        values = scale.detach().float()
        d, ints = factorize(values.abs(), self.per_super, self.smax)
        signed = torch.where(values < 0, -ints.to(torch.int16), ints.to(torch.int16)).to(torch.int8)
        return {"scales": signed, "d": d}

    def from_stored(self, stored: dict[str, torch.Tensor], scheme: Scheme) -> AffineParams:
        scale = expand(stored["d"].float(), stored["scales"].float(), self.per_super)
        return AffineParams(scale, torch.full_like(scale, float(self.half)))


@register_format
class Q6KFormat(SymKQuantFormat):
    """llama.cpp's Q6_K structure: 6-bit codes, groups of 16, signed 8-bit scales, 16 groups per super-block."""

    dtype = DType.Q6_K
    implied_bits = 6
    fixed_group_size = 16
    scale_bits = 8
    per_super = 16


@register_format
class Q3KFormat(SymKQuantFormat):
    """llama.cpp's Q3_K structure: 3-bit codes, groups of 16, signed 6-bit scales, 16 groups per super-block."""

    dtype = DType.Q3_K
    implied_bits = 3
    fixed_group_size = 16
    scale_bits = 6
    per_super = 16


# The registered instances, by llama.cpp's names.
Q4_K = get_format(DType.Q4_K)
Q2_K = get_format(DType.Q2_K)
Q6_K = get_format(DType.Q6_K)
Q3_K = get_format(DType.Q3_K)
