"""Arbitrary-bit integer products as sums of binary matrix products (ABQ-LLM's bit-plane decomposition).

An unsigned ``p``-bit matrix is the weighted sum of its bit planes, ``A = sum_j 2^j A_j`` with ``A_j`` in
{0, 1} (plane ``j`` holds bit ``j``, least significant first). So for ``A [m, k]`` (``p`` bits) and
``W [n, k]`` (``q`` bits):

    A @ W^T = sum_{i < p} sum_{j < q} 2^(i + j) * (A_i @ W_j^T)

``p * q`` binary products, each of which hardware computes with AND + popcount; any pair of widths
(W2A8, W6A6, ...) runs on the same binary kernel. This module is the reference (exact) implementation: the
binary products run as float64 matmuls, exact while ``k < 2^53``.

:func:`integer_linear` adds the affine parts: with ``A_real = sa * (A - za)`` (per row) and
``W_real = sw * (W - zw)`` (per output channel), ``A_real @ W_real^T = sa sw^T * (A W^T - za * rowsum(W)
- colsum(A) zw^T + k za zw^T)``: the bit-plane product plus rank-one corrections.
"""

from __future__ import annotations

import torch


def bitplanes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[bits, *codes.shape]`` float64 planes of unsigned integer ``codes`` (values in ``[0, 2^bits)``),
    plane ``j`` = bit ``j`` (least significant first)."""
    c = codes.to(torch.int64)
    if bool((c < 0).any()) or bool((c >= 2**bits).any()):
        raise ValueError(f"codes must lie in [0, 2^{bits})")
    shifts = torch.arange(bits, dtype=torch.int64, device=c.device).reshape(-1, *([1] * c.dim()))
    return ((c.unsqueeze(0) >> shifts) & 1).to(torch.float64)


def bitplane_matmul(a: torch.Tensor, w: torch.Tensor, a_bits: int, w_bits: int) -> torch.Tensor:
    """Exact ``a @ w.T`` (int64 ``[m, n]``) for unsigned codes ``a [m, k]`` (``a_bits``) and ``w [n, k]``
    (``w_bits``), computed as ``a_bits * w_bits`` binary matrix products."""
    pa, pw = bitplanes(a, a_bits), bitplanes(w, w_bits)
    out = torch.zeros(a.shape[0], w.shape[0], dtype=torch.float64, device=a.device)
    for i in range(a_bits):
        for j in range(w_bits):
            out += (2.0 ** (i + j)) * (pa[i] @ pw[j].T)
    return out.round().to(torch.int64)


def integer_linear(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    a_zero: torch.Tensor,
    a_bits: int,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor,
    w_bits: int,
) -> torch.Tensor:
    """``(sa (A - za)) @ (sw (W - zw))^T`` float64 ``[m, n]`` via :func:`bitplane_matmul` and the rank-one
    corrections; ``a [m, k]``, ``a_scale``/``a_zero`` ``[m]``; ``w [n, k]``, ``w_scale``/``w_zero`` ``[n]``."""
    k = a.shape[1]
    za, zw = a_zero.to(torch.float64), w_zero.to(torch.float64)
    acc = bitplane_matmul(a, w, a_bits, w_bits).to(torch.float64)
    acc -= za[:, None] * w.to(torch.float64).sum(1)[None, :]
    acc -= a.to(torch.float64).sum(1)[:, None] * zw[None, :]
    acc += k * za[:, None] * zw[None, :]
    return acc * a_scale.to(torch.float64)[:, None] * w_scale.to(torch.float64)[None, :]
