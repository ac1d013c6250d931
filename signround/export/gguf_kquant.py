"""GGUF K-quant types: which of our grids each holds, the fallback for rows that are not a multiple of
256 weights, the q4_k_m mix, and the byte layouts (llama.cpp's ``block_q4_K``, ``block_q2_K``,
``block_q6_K``, ``block_q3_K``, ``block_q5_0``). Encoders
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

``q6_k`` (210 bytes per 256 weights; groups of 16; symmetric, :class:`signround.formats.kquant.SymKQuantFormat`):

* bytes 0-127: ``ql[128]``, the low 4 bits of the codes: per 128 weights 64 bytes, byte ``l`` (0..31) =
  weight ``l`` | weight ``l + 64`` << 4, byte ``32 + l`` = weight ``l + 32`` | weight ``l + 96`` << 4;
* bytes 128-191: ``qh[64]``, the top 2 bits: per 128 weights 32 bytes, byte ``l`` holding those of weights
  ``l``, ``+32``, ``+64``, ``+96`` in bits 0-1, 2-3, 4-5, 6-7;
* bytes 192-207: ``scales[16]`` int8; bytes 208-209: fp16 ``d``.

Decoded: ``d * sc[j] * (q - 32)``. Its fallback for other row lengths is Q8_0 (W8G32-sym), as llama.cpp's.

``q3_k`` (110 bytes per 256 weights; groups of 16; symmetric):

* bytes 0-31: ``hmask[32]``, bit 2 of each code: weight ``i``'s in byte ``i % 32``, bit ``i // 32``;
* bytes 32-95: ``qs[64]``, the low two bits, laid out as Q2_K's ``qs``;
* bytes 96-107: ``scales[12]``, the sixteen 6-bit scales biased by 32 (``sc + 32``): low nibbles of groups
  0-7 in the low nibbles of bytes 0-7, of groups 8-15 in their high nibbles; the top two bits of group
  ``j`` in byte ``8 + j % 4``, bits ``2 * (j // 4)``;
* bytes 108-109: fp16 ``d``.

Decoded: ``d * sc[j] * (q - 4)``. Fallback: Q4_0 (W4G32-sym), where llama.cpp picks IQ4_NL.

``q5_0`` (22 bytes per 32 weights; llama.cpp's fallback for Q4_K rows whose length is not a multiple
of 256; our W5G32-sym ``int`` grid, code = ggml's ``q``):

* bytes 0-1: fp16 ``d`` (our scale); bytes 2-5: ``qh``, a little-endian uint32 whose bit ``i`` is bit 4
  of weight ``i``'s code; bytes 6-21: ``qs[16]``, byte ``j`` = low nibble of weight ``j`` | low nibble of
  weight ``j + 16`` << 4.

Decoded: ``d * (q - 16)``, exactly our ``scale * (code - zero)`` with ``zero = 16``.
"""

from __future__ import annotations

import re
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
    "q6_k": KQuantType(
        DType.Q6_K, GGMLQuantizationType.Q6_K, LlamaFileType.MOSTLY_Q6_K,
        QuantScheme(bits=8, group_size=32, sym=True), GGMLQuantizationType.Q8_0, "as llama.cpp's quantizer does",
    ),
    "q3_k": KQuantType(
        DType.Q3_K, GGMLQuantizationType.Q3_K, LlamaFileType.MOSTLY_Q3_K_S,
        QuantScheme(bits=4, group_size=32, sym=True), GGMLQuantizationType.Q4_0,
        "where llama.cpp's quantizer picks IQ4_NL, a non-linear 4-bit grid signround does not tune",
    ),
}  # fmt: skip

# Mixes: (the base type every layer is tuned for, the type some layers get, file type). q4_k_m follows my
# reading of llama.cpp's ``llama_tensor_get_type`` for Q4_K_M: attn_v and ffn_down of the layers
# ``use_more_bits`` picks are Q6_K, every other linear Q4_K (the output head, which llama.cpp makes Q6_K,
# is kept float here, as the embeddings are).
MIXES: dict[str, tuple[str, str, LlamaFileType]] = {"q4_k_m": ("q4_k", "q6_k", LlamaFileType.MOSTLY_Q4_K_M)}
# llama.cpp matches "attn_v" and "ffn_down" in the tensor name, so a MoE layer's ffn_down_exps is upgraded
# too: every expert's down_proj of that layer (one fused tensor, one type).
MORE_BITS_LAYERS = re.compile(r"self_attn\.v_proj|mlp\.down_proj|mlp\.experts\.\d+\.down_proj")


def members(qtype: str) -> tuple[str, ...]:
    """The K-quant types a ``gguf:<qtype>`` file holds (one, or a mix's two)."""
    return MIXES[qtype][:2] if qtype in MIXES else (qtype,)


def run_hint(qtype: str) -> str:
    return f"run `signround quantize --data-type {members(qtype)[0]} --format gguf:{qtype}`"


def kind_of(scheme: QuantScheme, qtype: str) -> tuple[str, bool] | None:
    """``(member type, is_fallback)`` of a layer's scheme in a ``gguf:<qtype>`` file, None when the file
    cannot hold it."""
    for name in members(qtype):
        kind = KQUANTS[name]
        if scheme.dtype is kind.dtype:
            return name, False
        if scheme == kind.fallback:
            return name, True
    return None


def fits(scheme: QuantScheme, qtype: str, in_features: int | None) -> bool:
    """Whether ``gguf:qtype`` stores ``scheme`` exactly at this input width (any width when None)."""
    match = kind_of(scheme, qtype)
    return match is not None and (match[1] or in_features is None or in_features % QK_K == 0)


def mismatch(qtype: str, what: str, scheme: QuantScheme, in_features: int | None) -> SignRoundError:
    match = kind_of(scheme, qtype)
    if match is not None and not match[1]:  # the type's own grid on a row it cannot hold
        kind = KQUANTS[match[0]]
        return SignRoundError(
            f"gguf:{qtype} stores {kind.ggml.name} rows of a multiple of {QK_K} weights; {what} has "
            f"{in_features}; quantize it as {kind.fallback.name} ({kind.fallback_ggml.name}), which "
            f"`--format gguf:{qtype}` does by itself"
        )
    kinds = [KQUANTS[name] for name in members(qtype)]
    held = ", ".join(f"{k.ggml.name} (and {k.fallback.name} as {k.fallback_ggml.name})" for k in kinds)
    return SignRoundError(f"gguf:{qtype} stores {held} layers; {what} is {scheme.name}; {run_hint(qtype)}")


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in the _M mixes: the first and last eighth of
    the layers and every third one in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def format_rules(planned: list[Any], qtype: str, n_layers: int) -> tuple[LayerRule, ...]:
    """For ``--format gguf:<qtype>``: one rule per layer whose scheme the file needs changed: the mix's
    upgraded layers (layers ``model.layers.<i>.<...>``; all experts of an upgraded MoE ``down_proj``), and
    the fallback grid for every K-quant layer whose input width is not a multiple of 256."""
    rules: list[LayerRule] = []
    base, more = (KQUANTS[t] for t in MIXES[qtype][:2]) if qtype in MIXES else (None, None)
    for p in planned:
        scheme = p.scheme
        layer = re.search(r"\.(\d+)\.(.+)$", p.name)
        if (
            base is not None
            and scheme.dtype is base.dtype
            and layer
            and MORE_BITS_LAYERS.fullmatch(layer.group(2))
            and use_more_bits(int(layer.group(1)), n_layers)
        ):
            scheme = QuantScheme(dtype=more.dtype.value)
        match = kind_of(scheme, qtype)
        if match is not None and not match[1] and p.in_features % QK_K:
            scheme = KQUANTS[match[0]].fallback
        if scheme != p.scheme:
            rules.append(LayerRule(pattern=re.escape(p.name) + "$", scheme=scheme))
    return tuple(rules)


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    """``float16 [...]`` -> little-endian bytes ``uint8 [..., 2]``."""
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(*x.shape, 2)


def _super_blocks_of(codes: np.ndarray, block: str) -> int:
    """Super-blocks per row of ``codes [out, in]``; refuses rows that are not a multiple of 256 weights."""
    if codes.shape[1] % QK_K:
        raise ValueError(f"{block} rows hold multiples of {QK_K} weights, not {codes.shape[1]}")
    return codes.shape[1] // QK_K


def _two_bit_planes(x: np.ndarray) -> np.ndarray:
    """2-bit values ``uint8 [out, n, 256]`` -> ``uint8 [out, n, 64]``: per 128 values 32 bytes, byte ``l``
    holding values ``l``, ``+32``, ``+64``, ``+96`` in bits 0-1, 2-3, 4-5, 6-7 (Q2_K's and Q3_K's ``qs``,
    Q6_K's ``qh``)."""
    out_features, n, _ = x.shape
    shifts = (np.arange(4, dtype=np.uint8) * 2).reshape(1, 1, 1, 4, 1)
    planes = np.bitwise_or.reduce(x.reshape(out_features, n, 2, 4, 32) << shifts, axis=3)
    return planes.reshape(out_features, n, 64).astype(np.uint8)


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
    out_features, n = codes.shape[0], _super_blocks_of(codes, "Q4_K")
    q = codes.reshape(out_features, n, 4, 2, 32)  # chunk of 64 = two halves of 32
    qs = (q[:, :, :, 0, :] | (q[:, :, :, 1, :] << np.uint8(4))).reshape(out_features, n, 128)
    scales = pack_k4_scales(sc.reshape(out_features, n, 8), m.reshape(out_features, n, 8))
    blocks = np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), scales, qs], axis=-1)
    return np.ascontiguousarray(blocks.reshape(out_features, -1))


def encode_q2_k(codes: np.ndarray, sc: np.ndarray, m: np.ndarray, d: np.ndarray, dmin: np.ndarray) -> np.ndarray:
    """Q2_K rows ``uint8 [out, in / 256 * 84]`` from codes ``uint8 [out, in]`` (0..3), group scales and
    minimums ``uint8 [out, in / 16]`` (0..15) and super-block factors ``float16 [out, in / 256]``."""
    out_features, n = codes.shape[0], _super_blocks_of(codes, "Q2_K")
    qs = _two_bit_planes(codes.reshape(out_features, n, QK_K))
    scales = (sc.astype(np.uint8) | (m.astype(np.uint8) << 4)).reshape(out_features, n, 16)
    blocks = np.concatenate([scales, qs, _fp16_bytes(d), _fp16_bytes(dmin)], axis=-1)
    return np.ascontiguousarray(blocks.reshape(out_features, -1))


def encode_q6_k(codes: np.ndarray, sc: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q6_K rows ``uint8 [out, in / 256 * 210]`` from codes ``uint8 [out, in]`` (0..63, zero 32), signed
    group scales ``int8 [out, in / 16]`` and factors ``float16 [out, in / 256]``."""
    out_features, n = codes.shape[0], _super_blocks_of(codes, "Q6_K")
    q = codes.reshape(out_features, n, QK_K)
    low = (q & np.uint8(15)).reshape(out_features, n, 2, 4, 32)  # chunk of 128 = four slices of 32
    ql = np.concatenate([low[:, :, :, 0] | (low[:, :, :, 2] << 4), low[:, :, :, 1] | (low[:, :, :, 3] << 4)], axis=-1)
    parts = [ql.reshape(out_features, n, 128), _two_bit_planes(q >> np.uint8(4))]
    parts += [sc.astype(np.int8).view(np.uint8).reshape(out_features, n, 16), _fp16_bytes(d)]
    return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(out_features, -1))


def encode_q3_k(codes: np.ndarray, sc: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q3_K rows ``uint8 [out, in / 256 * 110]`` from codes ``uint8 [out, in]`` (0..7, zero 4), signed
    group scales ``int8 [out, in / 16]`` (-32..31) and factors ``float16 [out, in / 256]``."""
    out_features, n = codes.shape[0], _super_blocks_of(codes, "Q3_K")
    q = codes.reshape(out_features, n, QK_K)
    high = (q >> np.uint8(2)) & np.uint8(1)  # weight j's bit 2 -> hmask[j % 32], bit j // 32
    hmask = np.bitwise_or.reduce(high.reshape(out_features, n, 8, 32) << np.arange(8, dtype=np.uint8)[:, None], axis=2)
    qs = _two_bit_planes(q & np.uint8(3))
    biased = (sc.astype(np.int16) + 32).astype(np.uint8).reshape(out_features, n, 16)  # 6 bits each
    scales = np.zeros((out_features, n, 12), dtype=np.uint8)
    scales[..., 0:8] = (biased[..., 0:8] & 15) | ((biased[..., 8:16] & 15) << 4)
    top = biased >> 4  # group j's top two bits -> byte 8 + j % 4, bits 2 * (j // 4)
    scales[..., 8:12] = np.bitwise_or.reduce(
        top.reshape(out_features, n, 4, 4) << (np.arange(4, dtype=np.uint8) * 2)[:, None], axis=2
    )
    blocks = np.concatenate([hmask.astype(np.uint8), qs, scales, _fp16_bytes(d)], axis=-1)
    return np.ascontiguousarray(blocks.reshape(out_features, -1))


def encode_kquant(qtype: str, codes: np.ndarray, stored: dict[str, np.ndarray]) -> np.ndarray:
    """Rows of ``qtype``'s own block type from a layer's codes and stored tensors (``scales``, ``d`` and,
    for the grids with a minimum, ``mins``, ``dmin``)."""
    if qtype in ("q6_k", "q3_k"):
        return {"q6_k": encode_q6_k, "q3_k": encode_q3_k}[qtype](codes, stored["scales"], stored["d"])
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
