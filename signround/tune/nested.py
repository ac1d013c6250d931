"""Nested integer codes: one stored ``B``-bit code per weight whose Double Rounding at every served width
``b < B`` (:mod:`signround.formats.double_rounding`: ``clamp(round(c / r_b))`` with the run's derivation's
ratio ``r_b``, ``2^(B-b)`` or, keeping an asymmetric grid's range, ``(2^B-1)/(2^b-1)``) gives that width's own
tuned code.

Each width ``b`` has its own rounding offsets ``v_b`` and uses the stored width's scale and zero point derived
to it (``s_b = s r_b``, ``z_b = clamp(round(z / r_b))``: what the derivation serves). The stored zero point is
a multiple of the lowest width's ratio (:func:`nested_zero`), so every ``z_b`` is exact and the grids nest:
width ``b``'s points are every ``r_b``-th point of the stored grid, in the middle of their bins (exactly when
every ratio is an integer: shift, or range with ``b`` dividing ``B``). (With any other zero point the derived
grid is shifted against its bins by ``z - r_b z_b``, up to half a step, so the stored width's nearest codes and
the lower widths' disagree: on SmolLM2 at 8/4/2 bits, before this rule, the stored 8-bit model scored 24.2
against 20.1 for float.) Symmetric grids (``z = 2^(B-1)``, always shifted) nest already. From the lowest width
up, a width's code is its SignRound rounding ``round(w / s_b + v_b) + z_b`` clamped into the codes the lower
widths still allow; each code then narrows the interval of stored codes (:func:`code_interval`), so the
stored code derives every lower one exactly. The lowest width is tuned as freely as SignRound at that width
alone; the wider ones refine within its bins. Gradients are straight through the rounding and zero outside
the clamps; the bins are constants to the wider widths (tried: a gradient through the bin's edge to the lower
width's code, which made both the stored and the served error larger on the tiny test model).
"""

from __future__ import annotations

import torch

from signround.formats.double_rounding import derive_ratio
from signround.primitives import round_ste


def nested_zero(zero: torch.Tensor, bits: int, lowest: int, sym: bool, keep_range: bool) -> torch.Tensor:
    """The stored zero point ``[out, groups]`` rounded (straight-through) to the nearest integer multiple of the
    lowest width's ratio ``r`` (:func:`~signround.formats.double_rounding.derive_ratio`), within ``[0, (2^lowest
    - 1) r]``; symmetric zero points ``2^(bits-1)`` are unchanged."""
    if sym:
        return zero
    ratio = derive_ratio(bits, lowest, sym, keep_range)
    return round_ste(round_ste(zero / ratio).clamp(0, 2**lowest - 1) * ratio)


def code_interval(codes: torch.Tensor, ratio: float, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)``: the stored codes ``x`` in ``[0, top]`` with ``clamp(round(x / ratio), 0, n - 1) == codes``
    (half to even; ``n = round((top + 1) / ratio)`` derived codes), float tensors like ``codes``. ``ratio`` is a
    power of two >= 2 (shift: ties possible) or ``top / (n - 1)`` (range: odd or not an integer, no ties)."""
    r = int(ratio)
    if r == ratio and r & (r - 1) == 0:  # shift: bins of ``ratio`` codes, ties at the edges go to the even code
        half = r // 2
        odd = torch.remainder(codes.detach(), 2)
        lo = (codes * r - half + odd).clamp(min=0)
        hi = codes * r + half - odd
        hi = torch.where(codes == (top + 1) // r - 1, torch.full_like(hi, top), hi).clamp(max=top)
        return lo, hi
    lo = torch.ceil((codes - 0.5) * ratio).clamp(min=0)
    hi = torch.floor((codes + 0.5) * ratio).clamp(max=top)
    return lo, hi


def nested_codes(
    wg: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    offsets: dict[int, torch.Tensor],
    sym: bool = False,
    keep_range: bool = False,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{width: (codes, values)}`` for the stored width ``bits`` and every served width in ``offsets``.

    Args:
        wg: ``[out, groups, g]`` weight. scale, zero: ``[out, groups]`` of the stored width.
        offsets: rounding offsets ``[out, groups, g]`` per width, the stored width's included.
        sym, keep_range: the grid's symmetry and the derivation (range when True; see
            :func:`~signround.formats.double_rounding.derive_ratio`).

    Returns:
        Per width, its codes (float, exact integers; the stored width's are the checkpoint's) and its
        dequantized values ``(codes - z_b) * s_b``, differentiable in the offsets, ``scale`` and ``zero``.
    """
    top = 2**bits - 1
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    lo = torch.zeros_like(wg, dtype=torch.float32)
    hi = torch.full_like(lo, float(top))
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for b in sorted(offsets):  # the lowest width first
        ratio = derive_ratio(bits, b, sym, keep_range)
        s_b = s * ratio
        z_b = round_ste(z / ratio).clamp(0, 2**b - 1) if ratio > 1 else z
        raw = round_ste(wg / s_b + offsets[b]) + z_b
        if ratio > 1:  # the codes of width b the lower widths' choices still allow
            codes = torch.clamp(raw, torch.round(lo / ratio), torch.round(hi / ratio).clamp(max=2**b - 1))
            b_lo, b_hi = code_interval(codes.detach(), ratio, top)
            lo, hi = torch.maximum(lo, b_lo), torch.minimum(hi, b_hi)
        else:
            codes = torch.clamp(raw, lo, hi)
        out[b] = (codes, (codes - z_b) * s_b)
    return out
