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
    shifts = torch.arange(per, dtype=torch.int64, device=c.device) * bits
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
    shifts = torch.arange(per, dtype=torch.int64, device=p.device) * bits
    codes = (p.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.reshape(rows, words * per)[:, :n].to(torch.uint8)


def pack_bitstream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Dense packing: each row's codes form one little-endian bit stream cut into int32 words.

    ``codes [rows, n]`` (values in ``[0, 2^bits)``) -> int32 ``[rows, ceil(n * bits / 32)]``. Element ``j``
    of a row occupies stream bits ``bits*j .. bits*j + bits - 1``, i.e. word ``bits*j // 32`` at offset
    ``bits*j % 32``, spilling into the next word when it straddles a boundary (3, 5, 6, 7 bits): 32 codes fill
    exactly ``bits`` words. This is GPTQ's layout (3-bit included), auto-round's generic layout, and
    compressed-tensors' ``pack_to_int32`` (>= 0.20). For 1, 2, 4 and 8 bits it equals :func:`pack_int32`.
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [rows, n], got shape {tuple(codes.shape)}")
    values_per_word(bits)  # validates bits
    rows, n = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    chunks = -(-n // 32)
    c = torch.nn.functional.pad(c, (0, chunks * 32 - n)).reshape(rows, chunks, 32)
    # 32 codes of `bits` bits are one 32*bits-bit integer; build it from its int32 words directly.
    start = torch.arange(32, dtype=torch.int64, device=c.device) * bits
    words = torch.zeros(rows, chunks, bits, dtype=torch.int64, device=c.device)
    words.scatter_add_(2, (start // 32).expand(rows, chunks, 32), (c << (start % 32)) & 0xFFFFFFFF)
    spill = (start % 32) + bits > 32
    if spill.any():
        idx = (start[spill] // 32 + 1).expand(rows, chunks, int(spill.sum()))
        words.scatter_add_(2, idx, c[..., spill] >> (32 - start[spill] % 32))
    words = words.reshape(rows, chunks * bits)[:, : -(-n * bits // 32)]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_bitstream(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitstream`: int32 ``[rows, words]`` -> uint8 codes ``[rows, n]``."""
    values_per_word(bits)
    rows, words = packed.shape
    if words * 32 < n * bits:
        raise ValueError(f"{words} words of {bits}-bit codes hold fewer than {n} values")
    p = packed.to(torch.int64) & 0xFFFFFFFF
    p = torch.nn.functional.pad(p, (0, 1))  # a zero word so the last element's spill read stays in range
    start = torch.arange(n, dtype=torch.int64, device=p.device) * bits
    lo = p[:, start // 32] >> (start % 32)
    hi = p[:, start // 32 + 1] << (32 - start % 32)
    return ((lo | hi) & (2**bits - 1)).to(torch.uint8)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``[..., n]`` (uint8, 0..15, ``n`` even) -> bytes ``[..., n / 2]``: two codes per byte, the even
    column in the low nibble (compressed-tensors' FP4 ``weight_packed`` and gpt-oss's MXFP4 blocks)."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)
