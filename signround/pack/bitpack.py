"""Bit packing of integer codes into int32 words.

Layout (the native signround layout, identical to compressed-tensors' ``pack_to_int32``):
codes ``[rows, n]`` with values in ``[0, 2^bits)`` -> words ``[rows, ceil(n / per)]`` int32, where
``per = 32 // bits``. Element ``j`` of a row lives in word ``j // per`` at bit offset
``bits * (j % per)`` (least significant bits first). For widths that do not divide 32 (3, 5, 6, 7) the
top ``32 - per*bits`` bits of each word are zero. Unused slots of a row's last word are zero.
"""

from __future__ import annotations

import torch


def values_per_word(bits: int) -> int:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    return 32 // bits


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes [rows, n]`` (any integer dtype, values in ``[0, 2^bits)``) to int32 ``[rows, ceil(n/per)]``."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [rows, n], got shape {tuple(codes.shape)}")
    per = values_per_word(bits)
    rows, n = codes.shape
    words = -(-n // per)
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    c = torch.nn.functional.pad(c, (0, words * per - n)).reshape(rows, words, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    packed = (c << shifts).sum(dim=-1)
    # Reinterpret the unsigned 32-bit value as int32 (two's complement), as every reader expects.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 ``[rows, words]`` -> uint8 codes ``[rows, n]``."""
    per = values_per_word(bits)
    rows, words = packed.shape
    if words * per < n:
        raise ValueError(f"{words} words of {bits}-bit codes hold fewer than {n} values")
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    codes = (p.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.reshape(rows, words * per)[:, :n].to(torch.uint8)
