"""GGUF K-quant types: which of our grids each holds, the fallback for rows that are not a multiple of
256 weights, and the byte layouts (llama.cpp's ``block_q4_K``, ``block_q2_K``, ``block_q5_0``). Encoders
are pure numpy: arrays in, raw rows ``uint8 [out, blocks * bytes]`` out.

``q4_k`` (144 bytes per 256 weights; :mod:`signround.formats.kquant` describes the grid):

* bytes 0-1: fp16 ``d``; bytes 2-3: fp16 ``dmin``;
* bytes 4-15: ``scales[12]``, the eight 6-bit group scales ``sc[j]`` and minimums ``m[j]``: for ``j < 4``,
  ``scales[j]`` low 6 bits = ``sc[j]`` and ``scales[j + 4]`` low 6 bits = ``m[j]``; for ``j >= 4``,
  ``scales[j + 4]`` = ``sc[j] & 15`` | ``(m[j] & 15) << 4``, and the top two bits of ``sc[j]`` go to bits
  6-7 of ``scales[j - 4]``, those of ``m[j]`` to bits 6-7 of ``scales[j]``;
* bytes 16-143: ``qs[128]``, the codes, 64 weights per 32 bytes: byte ``l`` of chunk ``c`` holds weight
  ``64c + l`` in its low nibble and weight ``64c + 32 + l`` in its high nibble.

Decoded: weight ``i`` of group ``j`` is ``d * sc[j] * q - dmin * m[j]`` (float32).

``q2_k`` (84 bytes per 256 weights; groups of 16):

* bytes 0-15: ``scales[16]``, byte ``j`` = 4-bit scale ``sc[j]`` (low nibble) | 4-bit minimum ``m[j]``
  (high nibble);
* bytes 16-79: ``qs[64]``, 128 weights per 32 bytes: byte ``l`` of chunk ``c`` holds weights ``128c + l``,
  ``+32``, ``+64``, ``+96`` in bits 0-1, 2-3, 4-5, 6-7;
* bytes 80-81: fp16 ``d``; bytes 82-83: fp16 ``dmin``.

Decoded: ``d * sc[j] * q - dmin * m[j]``.

``q5_0`` (22 bytes per 32 weights; llama.cpp's fallback for Q4_K rows whose length is not a multiple
of 256; our W5G32-sym ``int`` grid, code = ggml's ``q``):

* bytes 0-1: fp16 ``d`` (our scale); bytes 2-5: ``qh``, a little-endian uint32 whose bit ``i`` is bit 4
  of weight ``i``'s code; bytes 6-21: ``qs[16]``, byte ``j`` = low nibble of weight ``j`` | low nibble of
  weight ``j + 16`` << 4.

Decoded: ``d * (q - 16)``, exactly our ``scale * (code - zero)`` with ``zero = 16``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from signround.config import DType, LayerRule, QuantScheme
from signround.errors import SignRoundError

QK_K = 256


@dataclass(frozen=True)
class KQuantType:
    """A GGUF K-quant type: the grid (``dtype``) tuned for it, and the grid and block type of the rows it
    cannot hold (a row length that is not a multiple of 256)."""

    dtype: DType
    ggml: GGMLQuantizationType
    file_type: LlamaFileType
    fallback: QuantScheme
    fallback_ggml: GGMLQuantizationType
    why: str


KQUANTS: dict[str, KQuantType] = {
    "q4_k": KQuantType(
        DType.Q4_K, GGMLQuantizationType.Q4_K, LlamaFileType.MOSTLY_Q4_K_S,
        QuantScheme(bits=5, group_size=32, sym=True), GGMLQuantizationType.Q5_0, "as llama.cpp's quantizer does",
    ),
    "q2_k": KQuantType(
        DType.Q2_K, GGMLQuantizationType.Q2_K, LlamaFileType.MOSTLY_Q2_K,
        QuantScheme(bits=4, group_size=32, sym=True), GGMLQuantizationType.Q4_0,
        "where llama.cpp's quantizer picks IQ4_NL, a non-linear 4-bit grid signround does not tune",
    ),
}  # fmt: skip


def run_hint(qtype: str) -> str:
    return f"run `signround quantize --data-type {qtype} --format gguf:{qtype}`"


def fits(scheme: QuantScheme, qtype: str, in_features: int | None) -> bool:
    """Whether ``gguf:qtype`` stores ``scheme`` exactly at this input width (any width when None)."""
    kind = KQUANTS[qtype]
    if scheme.dtype is kind.dtype:
        return in_features is None or in_features % QK_K == 0
    return scheme == kind.fallback


def mismatch(qtype: str, what: str, scheme: QuantScheme, in_features: int | None) -> SignRoundError:
    kind = KQUANTS[qtype]
    fallback = f"{kind.fallback.name} ({kind.fallback_ggml.name})"
    if scheme.dtype is kind.dtype:
        return SignRoundError(
            f"gguf:{qtype} stores {kind.ggml.name} rows of a multiple of {QK_K} weights; {what} has {in_features}; "
            f"quantize it as {fallback}, which `--format gguf:{qtype}` does by itself"
        )
    return SignRoundError(
        f"gguf:{qtype} stores {kind.ggml.name} layers (and {fallback}); {what} is {scheme.name}; {run_hint(qtype)}"
    )


def fallback_rules(planned: Iterable[Any], qtype: str) -> tuple[LayerRule, ...]:
    """For ``--format gguf:<qtype>``: a rule giving each planned layer of the type's grid whose input width
    is not a multiple of 256 the fallback grid."""
    kind = KQUANTS[qtype]
    return tuple(
        LayerRule(pattern=re.escape(p.name) + "$", scheme=kind.fallback)
        for p in planned
        if p.scheme.dtype is kind.dtype and p.in_features % QK_K
    )


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


def encode_q2_k(codes: np.ndarray, sc: np.ndarray, m: np.ndarray, d: np.ndarray, dmin: np.ndarray) -> np.ndarray:
    """Q2_K rows ``uint8 [out, in / 256 * 84]`` from codes ``uint8 [out, in]`` (0..3), group scales and
    minimums ``uint8 [out, in / 16]`` (0..15) and super-block factors ``float16 [out, in / 256]``."""
    out_features, in_features = codes.shape
    if in_features % QK_K:
        raise ValueError(f"Q2_K rows hold multiples of {QK_K} weights, not {in_features}")
    n = in_features // QK_K
    q = codes.reshape(out_features, n, 2, 4, 32)  # chunk of 128 = four slices of 32
    shifts = (np.arange(4, dtype=np.uint8) * 2).reshape(1, 1, 1, 4, 1)
    qs = np.bitwise_or.reduce(q << shifts, axis=3).reshape(out_features, n, 64).astype(np.uint8)
    scales = (sc.astype(np.uint8) | (m.astype(np.uint8) << 4)).reshape(out_features, n, 16)
    blocks = np.concatenate([scales, qs, _fp16_bytes(d), _fp16_bytes(dmin)], axis=-1)
    return np.ascontiguousarray(blocks.reshape(out_features, -1))


def encode_kquant(qtype: str, codes: np.ndarray, stored: dict[str, np.ndarray]) -> np.ndarray:
    """Rows of ``qtype``'s own block type from a layer's codes and stored ``scales``/``mins``/``d``/``dmin``."""
    encoder = {"q4_k": encode_q4_k, "q2_k": encode_q2_k}[qtype]
    return encoder(codes, stored["scales"], stored["mins"], stored["d"], stored["dmin"])


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
