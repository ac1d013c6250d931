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

In the shared ``(scale, zero)`` signature, ``scale`` is ``s'`` and ``zero`` is ``mn'``, both float32
``[out, groups]``. Stored per ``QuantLinear``: ``scales`` and ``mins`` uint8 ``[out, groups]`` (``sc``,
``m``) and ``d``, ``dmin`` float16 ``[out, super-blocks]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from signround.formats.int_affine import group_minmax
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


@dataclass(frozen=True)
class KQuantFormat:
    """A K-quant grid: ``bits``-bit codes in groups of ``group``, ``scale_bits``-bit group scales and
    minimums under float16 super-block factors, ``per_super`` groups per super-block."""

    bits: int
    group: int
    scale_bits: int
    per_super: int

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def smax(self) -> int:
        return 2**self.scale_bits - 1

    def group_minmax(self, wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return group_minmax(wg)

    def two_level(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(factor [out, S] float16-valued float32, ints [out, groups])`` for non-negative ``values
        [out, groups]``: ``factor = fp16(max / smax)`` per super-block, ``ints = round(values / factor)``
        clamped to ``[0, smax]`` (straight-through, differentiable in ``values``)."""
        groups = values.shape[1]
        sb = _super_blocks(values, self.per_super)
        factor = (sb.amax(dim=-1) / self.smax).to(torch.float16).to(values.dtype)
        ints = round_ste(sb / factor.clamp(min=TINY).unsqueeze(-1)).clamp(0, self.smax)
        return factor, ints.reshape(values.shape[0], -1)[:, :groups]

    def expand(self, factor: torch.Tensor, ints: torch.Tensor) -> torch.Tensor:
        """``factor [out, S] * ints [out, groups]`` -> ``[out, groups]`` float32 (exact: an fp16 times a
        small integer)."""
        per_group = factor.repeat_interleave(self.per_super, dim=1)[:, : ints.shape[1]]
        return per_group * ints

    def compute_qparams(
        self,
        wmin: torch.Tensor,
        wmax: torch.Tensor,
        bits: int,
        sym: bool,
        min_factor: torch.Tensor | None = None,
        max_factor: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s', mn')`` ``[out, groups]`` float32 (module docstring), differentiable in the factors."""
        if min_factor is not None:
            wmin = wmin * min_factor.clamp(0, 1)
        if max_factor is not None:
            wmax = wmax * max_factor.clamp(0, 1)
        d, sc = self.two_level((wmax - wmin) / self.qmax)
        dmin, m = self.two_level(-wmin)
        return self.expand(d, sc), self.expand(dmin, m)

    def fake_quant(
        self, wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, v: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``q * s' - mn'`` for ``wg [out, groups, g]`` with rounding offsets ``v`` (straight-through)."""
        s = scale.unsqueeze(-1)
        mn = zero.unsqueeze(-1)
        x = (wg + mn) / s.clamp(min=TINY)
        if v is not None:
            x = x + v
        q = round_ste(x).clamp(0, self.qmax)
        return q * s - mn

    @torch.no_grad()
    def quantize_codes(
        self, wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, v: torch.Tensor | None = None
    ) -> torch.Tensor:
        """uint8 codes ``[out, groups, g]`` in ``[0, 2^bits)`` for the rounding of :meth:`fake_quant`."""
        x = (wg + zero.unsqueeze(-1)) / scale.unsqueeze(-1).clamp(min=TINY)
        if v is not None:
            x = x + v
        return torch.round(x).clamp(0, self.qmax).to(torch.uint8)

    def dequantize_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return codes.float() * scale.unsqueeze(-1) - zero.unsqueeze(-1)

    def group_bits(self, scheme: Any) -> int:
        """Per group: its scale and minimum, plus its share of the two float16 super-block factors."""
        return 2 * self.scale_bits + 32 // self.per_super

    def stored_layout(self, scheme: Any, out_features: int, groups: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        supers = -(-groups // self.per_super)
        return {
            "scales": ((out_features, groups), torch.uint8),
            "mins": ((out_features, groups), torch.uint8),
            "d": ((out_features, supers), torch.float16),
            "dmin": ((out_features, supers), torch.float16),
        }

    def to_stored(self, scale: torch.Tensor, zero: torch.Tensor, scheme: Any) -> dict[str, torch.Tensor]:
        d, sc = self.factorize(scale.detach().float())
        dmin, m = self.factorize(zero.detach().float())
        return {"scales": sc, "mins": m, "d": d, "dmin": dmin}

    def from_stored(self, stored: dict[str, torch.Tensor], scheme: Any) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.expand(stored["d"].float(), stored["scales"].float())
        zero = self.expand(stored["dmin"].float(), stored["mins"].float())
        return scale, zero

    def factorize(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(factor float16 [out, S], ints uint8 [out, groups])`` with ``factor * ints == values`` exactly,
        for ``values`` that :meth:`two_level` produced (each super-block's values are an fp16 times
        integers in ``[0, smax]``). The factor is recovered from the super-block's largest value, whose
        integer is the largest ``k <= smax`` leaving every quotient integral; any such pair decodes alike.

        Raises:
            ValueError: ``values`` is not of that form (not produced by this format).
        """
        groups = values.shape[1]
        sb = _super_blocks(values, self.per_super)
        top = sb.amax(dim=-1)
        factor = torch.zeros_like(top)
        found = top == 0
        for k in range(self.smax, 0, -1):
            cand = (top / k).to(torch.float16).float()
            q = sb / cand.clamp(min=TINY).unsqueeze(-1)
            exact = (cand * k == top) & ((q == q.round()) & (q <= self.smax)).all(dim=-1)
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


Q4_K = KQuantFormat(bits=4, group=32, scale_bits=6, per_super=8)
Q2_K = KQuantFormat(bits=2, group=16, scale_bits=4, per_super=16)


@dataclass(frozen=True)
class SymKQuantFormat:
    """A symmetric K-quant grid (Q6_K's and Q3_K's structure): ``w = (d * sc) * (q - 2^(bits-1))`` with ``q`` the
    ``bits``-bit code, ``sc`` a signed ``scale_bits``-bit integer per group of ``group`` and ``d`` a float16
    factor per super-block of ``per_super`` groups.

    Per group, the scale is the full-range one of the ``int`` grid (the larger-magnitude extreme, times
    the clipping factor, lands on code 0 and the scale carries its sign); per super-block ``d = fp16(max
    |s| / (2^(scale_bits-1) - 1))`` and ``sc = round(s / d)`` (straight-through). In the shared signature
    ``scale`` is ``d * sc`` and ``zero`` is ``2^(bits-1)``. Stored: ``scales`` int8 ``[out, groups]``, ``d``
    float16 ``[out, super-blocks]``.
    """

    bits: int
    group: int
    scale_bits: int
    per_super: int

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def smax(self) -> int:
        return 2 ** (self.scale_bits - 1) - 1

    @property
    def half(self) -> int:
        return 2 ** (self.bits - 1)

    def group_minmax(self, wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return group_minmax(wg)

    def compute_qparams(
        self,
        wmin: torch.Tensor,
        wmax: torch.Tensor,
        bits: int,
        sym: bool,
        min_factor: torch.Tensor | None = None,
        max_factor: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if min_factor is not None:
            wmin = wmin * min_factor.clamp(0, 1)
        if max_factor is not None:
            wmax = wmax * max_factor.clamp(0, 1)
        s = torch.where(-wmin > wmax, wmin, wmax) / -self.half
        groups = s.shape[1]
        sb = _super_blocks(s, self.per_super)
        d = (sb.abs().amax(dim=-1) / self.smax).to(torch.float16).to(s.dtype)
        sc = round_ste(sb / d.clamp(min=TINY).unsqueeze(-1)).clamp(-self.smax, self.smax)
        scale = (d.unsqueeze(-1) * sc).reshape(s.shape[0], -1)[:, :groups]
        return scale, torch.full_like(scale, float(self.half))

    def _safe(self, scale: torch.Tensor) -> torch.Tensor:
        return torch.where(scale == 0, torch.ones_like(scale), scale).unsqueeze(-1)

    def fake_quant(
        self, wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, v: torch.Tensor | None = None
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
        self, wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, v: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = wg / self._safe(scale)
        if v is not None:
            x = x + v
        return (torch.round(x) + self.half).clamp(0, self.qmax).to(torch.uint8)

    def dequantize_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return (codes.float() - self.half) * scale.unsqueeze(-1)

    def group_bits(self, scheme: Any) -> int:
        return self.scale_bits + 16 // self.per_super

    def stored_layout(self, scheme: Any, out_features: int, groups: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        supers = -(-groups // self.per_super)
        return {"scales": ((out_features, groups), torch.int8), "d": ((out_features, supers), torch.float16)}

    def to_stored(self, scale: torch.Tensor, zero: torch.Tensor, scheme: Any) -> dict[str, torch.Tensor]:
        """Exact: the largest ``|d * sc|`` of a super-block fixes ``d`` (see :meth:`KQuantFormat.factorize`)."""
        values = scale.detach().float()
        magnitude = KQuantFormat(self.bits, self.group, self.scale_bits - 1, self.per_super)
        d, ints = magnitude.factorize(values.abs())
        signed = torch.where(values < 0, -ints.to(torch.int16), ints.to(torch.int16)).to(torch.int8)
        return {"scales": signed, "d": d}

    def from_stored(self, stored: dict[str, torch.Tensor], scheme: Any) -> tuple[torch.Tensor, torch.Tensor]:
        d = stored["d"].float().repeat_interleave(self.per_super, dim=1)[:, : stored["scales"].shape[1]]
        scale = d * stored["scales"].float()
        return scale, torch.full_like(scale, float(self.half))


Q6_K = SymKQuantFormat(bits=6, group=16, scale_bits=8, per_super=16)
Q3_K = SymKQuantFormat(bits=3, group=16, scale_bits=6, per_super=16)
