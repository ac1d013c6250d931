"""Double Rounding's arithmetic: the codes of a lower integer width derived from a stored width's codes.

A stored ``B``-bit affine code ``c in [0, 2^B - 1]`` (zero point ``z``, scale ``s``, ``w = (c - z) s``) gives a
``b``-bit code by rounding once more with a ratio ``r``:

    c' = clamp(round(c / r), 0, 2^b - 1),   z' = clamp(round(z / r), 0, 2^b - 1),   s' = s r

(``round`` half to even). Two ratios (:func:`derive_ratio`):

* **shift** (the Double Rounding paper's): ``r = 2^(B-b)``. ``s r`` is exact in float16. On the symmetric
  full-range grid (``z = 2^(B-1)``) it is the ``b``-bit full-range grid itself. On an asymmetric grid the top
  codes, ``c >= (2^b - 1/2) r``, all clamp to ``2^b - 1``: the derived grid loses the top of the stored range
  (at 8 -> 2 bits every code from 224 up is served as 192, a quarter of the range cut off).
* **range**: ``r = (2^B - 1) / (2^b - 1)`` on asymmetric grids, so that code ``2^b - 1`` lands on code
  ``2^B - 1`` and the derived grid spans the stored one's whole range. ``r`` is odd or not an integer, so
  ``c / r`` is never a tie. When ``b`` divides ``B`` (8 -> 4 -> 2: ``r`` 17 and 85) ``r`` is an integer and the
  grids nest exactly; otherwise (8 -> 6, 8 -> 3) the derived points fall between stored ones. Symmetric grids
  shift under either rule: their shifted grid already keeps the range.
"""

from __future__ import annotations

import torch


def derive_ratio(from_bits: int, to_bits: int, sym: bool, keep_range: bool) -> float:
    """The ratio ``r`` of stored codes per derived code from ``from_bits`` to ``to_bits`` (module docstring):
    ``2^(B-b)`` for symmetric grids or when not ``keep_range``, else ``(2^B - 1) / (2^b - 1)``."""
    if sym or not keep_range:
        return float(2 ** (from_bits - to_bits))
    return (2**from_bits - 1) / (2**to_bits - 1)


def derive_codes(
    codes: torch.Tensor, zero: torch.Tensor, to_bits: int, ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes', zero')`` uint8 of width ``to_bits``: ``clamp(round(x / ratio), 0, 2^b - 1)`` of the stored
    codes (any shape) and zero points (any shape), half to even."""
    top = 2**to_bits - 1
    new_codes = torch.round(codes.float() / ratio).clamp(0, top).to(torch.uint8)
    new_zero = torch.round(zero.float() / ratio).clamp(0, top).to(torch.uint8)
    return new_codes, new_zero
