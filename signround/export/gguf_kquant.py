"""Byte layouts of the GGUF block types that hold K-quant layers and their fallbacks (llama.cpp's
``block_q4_K`` and ``block_q5_0``). Pure numpy; arrays in, raw rows ``uint8 [out, blocks * bytes]`` out.

``q4_k`` (144 bytes per 256 weights; :mod:`signround.formats.kquant` describes the grid):

* bytes 0-1: fp16 ``d``; bytes 2-3: fp16 ``dmin``;
* bytes 4-15: ``scales[12]``, the eight 6-bit group scales ``sc[j]`` and minimums ``m[j]``: for ``j < 4``,
  ``scales[j]`` low 6 bits = ``sc[j]`` and ``scales[j + 4]`` low 6 bits = ``m[j]``; for ``j >= 4``,
  ``scales[j + 4]`` = ``sc[j] & 15`` | ``(m[j] & 15) << 4``, and the top two bits of ``sc[j]`` go to bits
  6-7 of ``scales[j - 4]``, those of ``m[j]`` to bits 6-7 of ``scales[j]``;
* bytes 16-143: ``qs[128]``, the codes, 64 weights per 32 bytes: byte ``l`` of chunk ``c`` holds weight
  ``64c + l`` in its low nibble and weight ``64c + 32 + l`` in its high nibble.

Decoded: weight ``i`` of group ``j`` is ``d * sc[j] * q - dmin * m[j]`` (float32).

``q5_0`` (22 bytes per 32 weights; llama.cpp's fallback for Q4_K rows whose length is not a multiple
of 256; our W5G32-sym ``int`` grid, code = ggml's ``q``):

* bytes 0-1: fp16 ``d`` (our scale); bytes 2-5: ``qh``, a little-endian uint32 whose bit ``i`` is bit 4
  of weight ``i``'s code; bytes 6-21: ``qs[16]``, byte ``j`` = low nibble of weight ``j`` | low nibble of
  weight ``j + 16`` << 4.

Decoded: ``d * (q - 16)``, exactly our ``scale * (code - zero)`` with ``zero = 16``.
"""

from __future__ import annotations

import numpy as np

QK_K = 256


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    """``float16 [...]`` -> little-endian bytes ``uint8 [..., 2]``."""
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(*x.shape, 2)


def pack_k4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """6-bit ``sc``, ``m`` ``uint8 [..., 8]`` -> ``scales[12]`` ``uint8 [..., 12]`` (module docstring)."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.zeros((*sc.shape[:-1], 12), dtype=np.uint8)
    out[..., 0:4] = sc[..., 0:4] | ((sc[..., 4:8] >> 4) << 6)
    out[..., 4:8] = m[..., 0:4] | ((m[..., 4:8] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:8] & 15) | ((m[..., 4:8] & 15) << 4)
    return out


def encode_q4_k(codes: np.ndarray, sc: np.ndarray, m: np.ndarray, d: np.ndarray, dmin: np.ndarray) -> np.ndarray:
    """Q4_K rows ``uint8 [out, in / 256 * 144]`` from codes ``uint8 [out, in]`` (0..15), group scales and
    minimums ``uint8 [out, in / 32]`` (0..63) and super-block factors ``float16 [out, in / 256]``."""
    out_features, in_features = codes.shape
    if in_features % QK_K:
        raise ValueError(f"Q4_K rows hold multiples of {QK_K} weights, not {in_features}")
    n = in_features // QK_K
    q = codes.reshape(out_features, n, 4, 2, 32)  # chunk of 64 = two halves of 32
    qs = (q[:, :, :, 0, :] | (q[:, :, :, 1, :] << np.uint8(4))).reshape(out_features, n, 128)
    scales = pack_k4_scales(sc.reshape(out_features, n, 8), m.reshape(out_features, n, 8))
    blocks = np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), scales, qs], axis=-1)
    return np.ascontiguousarray(blocks.reshape(out_features, -1))


def encode_q5_0(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Q5_0 rows ``uint8 [out, in / 32 * 22]`` from symmetric 5-bit codes ``uint8 [out, in]`` (zero 16)
    and ``float16 [out, in / 32]`` scales."""
    out_features, in_features = codes.shape
    b = codes.reshape(out_features, in_features // 32, 32).astype(np.uint32)
    qh = ((b >> 4) & 1) << np.arange(32, dtype=np.uint32)
    qh = np.bitwise_or.reduce(qh, axis=-1).astype("<u4")
    low = (b & 15).astype(np.uint8)
    qs = low[..., :16] | (low[..., 16:] << np.uint8(4))
    qh_bytes = np.ascontiguousarray(qh).view(np.uint8).reshape(out_features, -1, 4)
    blocks = np.concatenate([_fp16_bytes(scales), qh_bytes, qs], axis=-1)
    return np.ascontiguousarray(blocks.reshape(out_features, -1))
