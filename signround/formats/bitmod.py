"""BitMoD-style mixture of datatypes: every group of weights picks its own 4-bit grid from a small set.

My reading of BitMoD (Chen et al., HPCA 2025), as implemented here. FP4 (e2m1) spends one of its 16 codes
on -0; BitMoD gives that code a special value instead, either between 4 and 6 for *extra resolution*
(+-5) or beyond 6 for *extra asymmetry* (+-8). Each group of weights (128 by default) uses the variant
with the least quantization error, and stores a type id. The issue this implements adds INT4 asymmetric
(with its zero point) to the set, so the set is (type id: grid, its 16 values in increasing order):

===  ==========  ===========================================================================
id   name        values (in units of the group scale)
===  ==========  ===========================================================================
0    int4_asym   ``0 .. 15``, minus the group's integer zero point
1    fp4_er_pos  e2m1's 15 values ``-6 .. 6`` and ``+5``
2    fp4_er_neg  e2m1's 15 values and ``-5``
3    fp4_ea_pos  e2m1's 15 values and ``+8``
4    fp4_ea_neg  e2m1's 15 values and ``-8``
===  ==========  ===========================================================================

**Codes.** A code is the index (0..15) of the value in its type's increasing table above; this layout is
signround's own (BitMoD is a hardware proposal with no checkpoint format). A weight decodes to
``(table[type][code] - zero) * scale`` with ``zero`` the group's zero point (0 for the FP4 variants).

**Scale and clipping.** For ``int4_asym``: the integer grid's asymmetric rule (:mod:`int_affine`,
both clipping factors). For a table with extremes ``lo < 0 < hi``: the smallest scale that covers the
clipped group on both sides, ``scale = max(max_factor * wmax / hi, min_factor * wmin / lo)``, rounded
through float16. So an asymmetric variant like ``+8`` maps a group's larger positive tail onto 8.

**Type choice.** :func:`choose_types` quantizes each group with every type (round to nearest, no clipping)
and keeps the one with the least squared error; the choice is then fixed while SignRound tunes the rounding
offsets and clipping factors on it.

**Rounding with SignRound's offset.** ``x = w / scale + zero`` lies between two neighbouring table values
``L <= x < U``; with ``t = (x - L) / (U - L)`` and the offset ``v`` (in local steps, clamped to +-0.5), the
code is ``U`` when ``t + v > 0.5``, ``L`` when below, and the even index on a tie (round half to even,
as on the integer grid). Values beyond the table saturate to its ends. The gradient is straight-through,
that of ``clamp(x + v * (U - L), table[0], table[-1])``.

**Parameters.** :class:`BitMoDParams` ``(scale [out, groups], type_zero [out, groups, 2])`` where
``type_zero[..., 0]`` is the type id and ``type_zero[..., 1]`` the zero point (float32 holding integers);
the methods' positional ``(scale, zero)`` are these two. The statistics from
:meth:`BitMoDFormat.group_minmax` are ``(wmin, wmax, types)``. Stored per ``QuantLinear``: ``scales``
float16, ``qzeros`` uint8 and ``types`` uint8, each ``[out, groups]``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch

from signround.formats import int_affine
from signround.formats.base import Layout, Scheme, WeightFormat, register_format
from signround.formats.dtype import DType
from signround.formats.fp import E2M1, magnitudes
from signround.formats.int_affine import MIN_SCALE, fp16_round

BITS = 4
TYPE_NAMES = ("int4_asym", "fp4_er_pos", "fp4_er_neg", "fp4_ea_pos", "fp4_ea_neg")
AFFINE = 0  # the type id of int4_asym
_SPECIALS = (None, 5.0, -5.0, 8.0, -8.0)
TYPE_ID_BITS = 3  # ceil(log2(len(TYPE_NAMES)))


@functools.cache
def tables() -> torch.Tensor:
    """float32 ``[types, 16]``: every type's values in increasing order (see the module table)."""
    e2m1 = magnitudes(E2M1)
    base = torch.cat([-e2m1.flip(0)[:-1], e2m1])  # 15 values: -6 .. -0.5, 0, 0.5 .. 6
    rows = [torch.arange(16, dtype=torch.float32)]
    for special in _SPECIALS[1:]:
        rows.append(torch.sort(torch.cat([base, torch.tensor([special])])).values)
    return torch.stack(rows)


def _group_tables(types: torch.Tensor) -> torch.Tensor:
    """``[out, groups, 16]`` value tables for ``[out, groups]`` type ids."""
    return tables().to(types.device)[types.long()]


def table_round(
    x: torch.Tensor, table: torch.Tensor, v: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round ``x [out, groups, g]`` onto per-group tables ``[out, groups, n]`` (increasing).

    Returns ``(index, value, step)``: the chosen code (int64), its table value and the spacing ``U - L`` of
    the two neighbours of ``x`` (float32), all without gradient; see the module docstring for the rule.
    """
    with torch.no_grad():
        n = table.shape[-1]
        lower = (torch.searchsorted(table, x.detach().contiguous(), right=True) - 1).clamp(0, n - 2)
        lo = table.gather(-1, lower)
        step = table.gather(-1, lower + 1) - lo
        y = (x.detach() - lo) / step
        if v is not None:
            y = y + v.detach().clamp(-0.5, 0.5)
        up = (y > 0.5) | ((y == 0.5) & (lower % 2 == 1))
        index = lower + up.long()
        return index, table.gather(-1, index), step


class BitMoDParams(NamedTuple):
    """Per-group parameters of the mixture: a weight decodes to ``(table[type][code] - zero_point) * scale``.

    Attributes:
        scale: ``[out, groups]`` float32 (float16 values).
        type_zero: ``[out, groups, 2]`` float32 holding integers: ``[..., 0]`` the type id, ``[..., 1]`` the
            zero point (0 for the FP4 variants); stacked so that the pair travels as the second parameter.
    """

    scale: torch.Tensor
    type_zero: torch.Tensor

    @property
    def type_ids(self) -> torch.Tensor:
        """``[out, groups]``: the type id of each group."""
        return self.type_zero[..., 0]

    @property
    def zero_point(self) -> torch.Tensor:
        """``[out, groups]``: the integer zero point of each group."""
        return self.type_zero[..., 1]


def qparams(
    wmin: torch.Tensor,
    wmax: torch.Tensor,
    types: torch.Tensor,
    min_factor: torch.Tensor | None = None,
    max_factor: torch.Tensor | None = None,
) -> BitMoDParams:
    """``(scale [out, groups], type_zero [out, groups, 2])`` (see the module) for the group extremes and
    type ids ``[out, groups]``, differentiable in the factors."""
    a_scale, a_zero = int_affine.compute_qparams(wmin, wmax, BITS, False, min_factor, max_factor)
    lo_w, hi_w = int_affine.clip_extremes(wmin, wmax, min_factor, max_factor)
    table = _group_tables(types)
    affine = types == AFFINE
    # int4's table starts at 0: give its (unused) branch a finite divisor so no NaN reaches the gradient
    lo_t = torch.where(affine, -torch.ones_like(table[..., 0]), table[..., 0])
    t_scale = fp16_round(torch.maximum(hi_w / table[..., -1], lo_w / lo_t)).clamp(min=MIN_SCALE)
    scale = torch.where(affine, a_scale, t_scale)
    zero_point = torch.where(affine, a_zero, torch.zeros_like(a_zero))
    return BitMoDParams(scale, torch.stack([types.to(scale.dtype), zero_point], dim=-1))


@register_format
class BitMoDFormat(WeightFormat):
    """Per-group mixture of 4-bit datatypes (INT4 asymmetric and four FP4 variants); see the module. The
    ``bits`` arguments are the shared signature's and ignored (always 4)."""

    dtype = DType.BITMOD
    implied_bits = BITS
    fixed_group_size = None
    fixed_sym = True
    params_type = BitMoDParams

    # ---------------------------------------------------------------- per-group parameters

    def group_minmax(self, wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(wmin, wmax, types)``, each ``[out, groups]``: the extremes (widened to 0) and the chosen type."""
        wmin, wmax = int_affine.group_minmax(wg)
        return wmin, wmax, choose_types(wg, wmin, wmax)

    def choose_qparams(
        self,
        stats: Sequence[torch.Tensor],
        scheme: Scheme,
        min_factor: torch.Tensor | None = None,
        max_factor: torch.Tensor | None = None,
    ) -> BitMoDParams:
        """:func:`qparams` of ``stats = (wmin, wmax, types)``; the format fixes the grid, so the scheme is
        not read."""
        wmin, wmax, types = stats
        return qparams(wmin, wmax, types, min_factor, max_factor)

    def fake_quant(
        self,
        wg: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bits: int | None = None,
        v: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Quantize-dequantize ``wg [out, groups, g]``, straight-through in ``v``, ``scale`` and the zero point."""
        table = _group_tables(zero[..., 0].detach())
        s, z = scale.unsqueeze(-1), zero[..., 1].unsqueeze(-1)
        x = wg / s + z
        _, q, step = table_round(x, table, v)
        surrogate = x if v is None else x + v * step
        surrogate = torch.maximum(torch.minimum(surrogate, table[..., -1:]), table[..., :1])
        return (q + (surrogate - surrogate.detach()) - z) * s

    @torch.no_grad()
    def quantize_codes(
        self,
        wg: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bits: int | None = None,
        v: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """uint8 codes ``[out, groups, g]`` (indices into each group's table) for :meth:`fake_quant`'s rounding."""
        x = wg / scale.unsqueeze(-1) + zero[..., 1].unsqueeze(-1)
        index, _, _ = table_round(x, _group_tables(zero[..., 0]), v)
        return index.to(torch.uint8)

    def dequantize_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """``(table[type][code] - zero_point) * scale``, float32 ``[out, groups, g]``."""
        values = _group_tables(zero[..., 0]).gather(-1, codes.long())
        return (values - zero[..., 1].unsqueeze(-1)) * scale.unsqueeze(-1)

    # ---------------------------------------------------------------- storage (QuantLinear buffers)

    def stored_layout(self, scheme: Scheme, out_features: int, groups: int) -> Layout:
        """``scales`` float16, ``qzeros`` uint8 and ``types`` uint8, each ``[out, groups]``."""
        shape = (out_features, groups)
        return {"scales": (shape, torch.float16), "qzeros": (shape, torch.uint8), "types": (shape, torch.uint8)}

    def to_stored(self, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme) -> dict[str, torch.Tensor]:
        return {
            "scales": scale.detach().to(torch.float16),
            "qzeros": zero[..., 1].detach().to(torch.uint8),
            "types": zero[..., 0].detach().to(torch.uint8),
        }

    def from_stored(self, stored: dict[str, torch.Tensor], scheme: Scheme) -> BitMoDParams:
        scale = stored["scales"].float()
        return BitMoDParams(scale, torch.stack([stored["types"].float(), stored["qzeros"].float()], dim=-1))

    def group_bits(self, scheme: Scheme) -> int:
        """Bits stored per group besides the codes: a float16 scale, a 4-bit zero point, a 3-bit type id."""
        return 16 + BITS + TYPE_ID_BITS


@torch.no_grad()
def choose_types(wg: torch.Tensor, wmin: torch.Tensor, wmax: torch.Tensor) -> torch.Tensor:
    """uint8 ``[out, groups]``: per group, the type whose round-to-nearest quantization of ``wg
    [out, groups, g]`` has the least squared error (ties: the lowest id)."""
    fmt = BitMoDFormat()
    errors = []
    for type_id in range(len(TYPE_NAMES)):
        types = torch.full(wmin.shape, type_id, dtype=torch.uint8, device=wg.device)
        scale, zero = qparams(wmin, wmax, types)
        errors.append((fmt.fake_quant(wg, scale, zero) - wg).pow(2).sum(-1))
    return torch.stack(errors).argmin(0).to(torch.uint8)
