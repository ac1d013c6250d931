"""GGUF export (llama.cpp's file format), written with the ``gguf`` package: the block encodings, the checks
and the writer. The families (LLaMA, Qwen3, Qwen3-MoE, gpt-oss, Mixtral, OLMoE), their metadata, tensor names
and the fused expert tensors of a mixture of experts are in :mod:`signround.export.gguf_arch`.

One file ``model-<qtype>.gguf`` per export. Supported ``qtype``s (:data:`GGUF_TYPES`):

* ``f16``: every matrix F16, 1-D tensors (norms, biases) F32, as llama.cpp's converter writes them. A
  ``QuantLinear`` is written as its dequantized weight rounded to f16; a float model is plainly converted.
* ``q8_0`` / ``q4_0`` / ``q4_1``: the quantized linears are *re-encoded, not re-quantized*: each of our
  groups of 32 becomes one ggml block holding the same integer codes and the same fp16 scale.

  ==========  ==============  ======================================  =====================================
  qtype       our scheme      block (bytes, little-endian)            decoded value
  ==========  ==============  ======================================  =====================================
  ``q8_0``    W8G32-sym       34: fp16 ``d``, 32 x int8 ``q``         ``d * q``;  ``q = code - 128``
  ``q4_0``    W4G32-sym       18: fp16 ``d``, 16 bytes of nibbles     ``d * (nibble - 8)``; nibble = code
  ``q4_1``    W4G32-asym      20: fp16 ``d``, fp16 ``m``, 16 bytes    ``d * nibble + m``;   nibble = code
  ==========  ==============  ======================================  =====================================

  Nibble order (q4_0 and q4_1): byte ``j`` (0..15) of a block holds element ``j`` of the group in its
  low nibble (bits 0-3) and element ``j + 16`` in its high nibble (bits 4-7). ``d`` is our scale.
  q8_0 and q4_0 decode to exactly ``QuantLinear.dequantize()`` (both are one float32 product of the same
  fp16 scale and the same small integer). q4_1 needs ``m = -scale * zero`` (the value of code 0, i.e. the
  group's minimum grid value), which is computed exactly in float32 and then **rounded to fp16: the one
  inexact step** of the export. Its error is at most ``2^-11 * |m|`` (half an fp16 ulp; at most
  ``2^-25`` absolute where ``|m| < 2^-14`` is subnormal), added to every weight of that group.

* ``q4_k`` / ``q2_k`` / ``q6_k`` (and the ``q4_k_m`` mix of Q4_K and Q6_K layers): layers tuned on
  llama.cpp's K-quant structures (``--data-type q4_k|q2_k|q6_k``,
  :mod:`signround.formats.kquant`) become blocks of that type holding the same codes, scales, minimums and
  fp16 super-block factors; layers whose rows are not a multiple of 256 weights carry the type's fallback
  grid (W5G32-sym as Q5_0 and W8G32-sym as Q8_0, as llama.cpp's quantizer does / W4G32-sym as Q4_0) and
  become those blocks. All
  decode bit for bit; the table and byte layouts are in :mod:`signround.export.gguf_kquant`.

  Only ``QuantLinear`` layers are blocks. Everything else in the file stays float: embeddings, the output
  head (written only when not tied to the embeddings, as llama.cpp does; always for OLMoE, whose llama.cpp
  graph requires it), decoder linears a layer config kept in full precision (all F16), and norms and
  biases (F32).

Layout notes. GGUF lists a tensor's shape innermost first (``ne0`` = input features), the reverse of
torch; the ``gguf`` writer reverses ``[out, in]`` arrays itself, and a block tensor is handed over as its
raw bytes ``uint8 [out, in / 32 * block_bytes]`` with ``raw_dtype`` set. The rows of ``attn_q`` and
``attn_k`` (weights and biases) are permuted as llama.cpp's converter does: HF orders each head's rotary
dimensions as two halves ``[x0..x(h/2-1), y0..y(h/2-1)]``, GGUF interleaves them ``[x0, y0, x1, y1, ...]``.
Rows only, so the same permutation applies exactly to a ``QuantLinear``'s codes, scales and zero points;
readers (llama.cpp, transformers' GGUF loader) expect it and transformers undoes it on load. That is the
LLaMA family only (LLaMA, and Mixtral, which llama.cpp runs as ``llama``); Qwen3, Qwen3-MoE, gpt-oss and
OLMoE use NeoX rotary in llama.cpp and keep HF's row order.

Experts. One fused tensor per projection and layer, ``[E, out, in]`` (``uint8 [E, out, row bytes]`` for
blocks): each expert's rows encoded as above, stacked in expert order. Block types are per row, so the
experts' codes are exactly the ones tuned; llama.cpp holds one type per tensor, so :func:`check_gguf_plan`
refuses a plan that gives the experts of one layer different types (mixed precision, a layer rule).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType
from torch import nn

from signround.config import QuantScheme
from signround.errors import SignRoundError
from signround.export import gguf_kquant as kquant
from signround.export.common import planned_from_model
from signround.export.gguf_arch import Arch, add_metadata, arch_of, tensors
from signround.export.gguf_arch import rope_permutation as rope_permutation  # re-exported for callers
from signround.export.gguf_kquant import KQUANTS, MIXES
from signround.export.gguf_tokenizer import add_tokenizer
from signround.export.registry import Exporter, ExportFormat, ExportOptions, register_exporter
from signround.model.blocks import Planned
from signround.pack.packed import QuantLinear

log = logging.getLogger("signround")

GGUF_FORMATS: tuple[ExportFormat, ...] = tuple(f for f in ExportFormat if f.is_gguf)
GGUF_TYPES: tuple[str, ...] = tuple(f.gguf_type for f in GGUF_FORMATS)  # "f16", "q8_0", ..., "q4_k_m"
_KTYPES = (*KQUANTS, *MIXES)  # written from layers tuned on K-quant grids (:mod:`signround.export.gguf_kquant`)
BLOCK = 32  # elements per ggml block, and the group size every block type here requires
_EXPERT = re.compile(r"(?P<prefix>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)")
_EXPERT_TENSORS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


@dataclass(frozen=True)
class _Grid:
    """The one scheme a block type stores exactly."""

    bits: int
    sym: bool
    words: str
    ggml_type: GGMLQuantizationType


_GRIDS = {
    "q8_0": _Grid(8, True, "symmetric 8-bit", GGMLQuantizationType.Q8_0),
    "q4_0": _Grid(4, True, "symmetric 4-bit", GGMLQuantizationType.Q4_0),
    "q4_1": _Grid(4, False, "asymmetric 4-bit", GGMLQuantizationType.Q4_1),
}
_FILE_TYPES = {
    "f16": LlamaFileType.MOSTLY_F16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
    "q4_0": LlamaFileType.MOSTLY_Q4_0,
    "q4_1": LlamaFileType.MOSTLY_Q4_1,
    **{name: kind.file_type for name, kind in KQUANTS.items()},
    **{name: mix[2] for name, mix in MIXES.items()},
}


def _check_qtype(qtype: str) -> None:
    if qtype not in GGUF_TYPES:
        raise SignRoundError(f"unknown gguf type {qtype!r}; choose one of {', '.join(GGUF_TYPES)}")


def _run_hint(qtype: str) -> str:
    if qtype in _KTYPES:
        return kquant.run_hint(qtype)
    grid = _GRIDS[qtype]
    sym = " --sym" if grid.sym else ""
    return f"run `signround quantize --bits {grid.bits} --group-size {BLOCK}{sym} --format gguf:{qtype}`"


def _fits(scheme: QuantScheme, qtype: str, in_features: int) -> bool:
    """Whether ``qtype`` stores ``scheme`` exactly (for a K-quant, at this input width)."""
    if qtype in _KTYPES:
        return kquant.fits(scheme, qtype, in_features)
    grid = _GRIDS[qtype]
    return (
        not scheme.dtype.is_float and scheme.bits == grid.bits and scheme.sym == grid.sym and scheme.group_size == BLOCK
    )


def _mismatch(qtype: str, what: str, scheme: QuantScheme, in_features: int) -> SignRoundError:
    if qtype in _KTYPES:
        return kquant.mismatch(qtype, what, scheme, in_features)
    grid = _GRIDS[qtype]
    if scheme.dtype.is_float:
        return SignRoundError(
            f"gguf:{qtype} stores integer grids only; {what} uses {scheme.dtype.value}; "
            "use --format native (or gguf:f16, which stores the dequantized weights)"
        )
    return SignRoundError(
        f"gguf:{qtype} stores {grid.words} groups of {BLOCK}; {what} is {scheme.name}; {_run_hint(qtype)}"
    )


# ---------------------------------------------------------------------------------------------- blocks


def _blocks(codes: np.ndarray) -> np.ndarray:
    """``uint8 [out, in]`` -> ``[out, in / 32, 32]``, one row per block (``in`` must divide by 32)."""
    out_features, in_features = codes.shape
    return codes.reshape(out_features, in_features // BLOCK, BLOCK)


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    """``float16 [out, groups]`` -> its little-endian bytes ``uint8 [out, groups, 2]``."""
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(*x.shape, 2)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """4-bit codes ``[out, in]`` -> ``uint8 [out, in / 32, 16]``: byte ``j`` = element ``j`` (low nibble)
    | element ``j + 16`` (high nibble) of each block."""
    b = _blocks(codes)
    return b[..., : BLOCK // 2] | (b[..., BLOCK // 2 :] << np.uint8(4))


def _flat(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate per-block fields ``[out, groups, *]`` -> raw rows ``uint8 [out, groups * block_bytes]``."""
    blocks = np.concatenate(parts, axis=-1)
    return np.ascontiguousarray(blocks.reshape(blocks.shape[0], -1))


def encode_q8_0(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Symmetric 8-bit codes ``uint8 [out, in]`` (zero 128) and ``float16 [out, in/32]`` scales -> Q8_0
    rows ``uint8 [out, in/32 * 34]``; each block is fp16 ``d`` then 32 int8 ``q = code - 128``."""
    q = (_blocks(codes).astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    return _flat([_fp16_bytes(scales), q])


def encode_q4_0(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Symmetric 4-bit codes ``uint8 [out, in]`` (zero 8, so code = ggml's nibble) and ``float16
    [out, in/32]`` scales -> Q4_0 rows ``uint8 [out, in/32 * 18]``: fp16 ``d``, 16 nibble bytes."""
    return _flat([_fp16_bytes(scales), _nibbles(codes)])


def q4_1_offsets(scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """``m = -scale * zero`` per group, ``float16 [out, groups]``: exact in float32 (an 11-bit mantissa
    times a 4-bit integer), then rounded once to fp16, the export's only inexact step."""
    return (-scales.astype(np.float32) * zeros.astype(np.float32)).astype(np.float16)


def encode_q4_1(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """Asymmetric 4-bit codes ``uint8 [out, in]``, ``float16 [out, in/32]`` scales and ``uint8
    [out, in/32]`` zero points -> Q4_1 rows ``uint8 [out, in/32 * 20]``: fp16 ``d``, fp16 ``m``, 16 nibble
    bytes; decodes to ``d * code + m`` = ``scale * (code - zero)`` up to the fp16 rounding of ``m``."""
    return _flat([_fp16_bytes(scales), _fp16_bytes(q4_1_offsets(scales, zeros)), _nibbles(codes)])


# ---------------------------------------------------------------------------------------------- tensors


def _f16(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy().astype(np.float16)


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def _linear_tensor(
    layer: nn.Module, hf_name: str, qtype: str, perm: np.ndarray | None
) -> tuple[np.ndarray, GGMLQuantizationType | None]:
    """``(array, raw_dtype)`` for one linear's weight: blocks for a ``QuantLinear`` under a block qtype
    (its scheme already checked by :func:`_check_model`), else F16 (``raw_dtype`` None). Rows reordered
    by ``perm`` when given."""
    if isinstance(layer, QuantLinear) and qtype in _KTYPES:
        return _kquant_tensor(layer, qtype, perm)
    if isinstance(layer, QuantLinear) and qtype != "f16":
        codes = layer.codes().cpu().numpy()
        scales = layer.scales.detach().cpu().numpy()
        zeros = layer.zeros().cpu().numpy()
        if perm is not None:
            codes, scales, zeros = codes[perm], scales[perm], zeros[perm]
        if qtype == "q8_0":
            data = encode_q8_0(codes, scales)
        elif qtype == "q4_0":
            data = encode_q4_0(codes, scales)
        else:
            data = encode_q4_1(codes, scales, zeros)
        return data, _GRIDS[qtype].ggml_type
    if isinstance(layer, QuantLinear):
        weight = _f16(layer.dequantize(torch.float32))
    elif isinstance(layer, nn.Linear):
        weight = _f16(layer.weight)
    else:
        raise SignRoundError(f"{hf_name} is a {type(layer).__name__}; gguf export expects a linear layer there")
    return (weight[perm] if perm is not None else weight), None


def _kquant_tensor(layer: QuantLinear, qtype: str, perm: np.ndarray | None) -> tuple[np.ndarray, GGMLQuantizationType]:
    """A gguf K-quant layer: its type's blocks from its stored scales (minimums) and factors, or the
    fallback's (Q5_0 / Q4_0 / Q8_0) for a fallback grid. Every stored tensor is per row, so ``perm``
    reorders them all alike."""
    match = kquant.kind_of(layer.scheme, qtype)
    if match is None:  # _check_model refused such a layer before any tensor was built
        raise SignRoundError(f"gguf:{qtype} does not store {layer.scheme.name}")
    name, fallback = match
    kind = KQUANTS[name]
    rows = perm if perm is not None else slice(None)
    codes = layer.codes().cpu().numpy()[rows]
    if not fallback:
        stored = {n: layer.get_buffer(n).detach().cpu().numpy()[rows] for n in layer.qparam_names}
        return kquant.encode_kquant(name, codes, stored), kind.ggml
    scales = layer.scales.detach().cpu().numpy()[rows]
    encode = {
        GGMLQuantizationType.Q5_0: kquant.encode_q5_0,
        GGMLQuantizationType.Q4_0: encode_q4_0,
        GGMLQuantizationType.Q8_0: encode_q8_0,
    }[kind.fallback_ggml]
    return encode(codes, scales), kind.fallback_ggml


def _check_layers(planned: Iterable[Planned], qtype: str) -> None:
    """Every layer (``name``, ``scheme``, ``in_features``) fits the block type ``qtype`` exactly."""
    for p in planned:
        if not _fits(p.scheme, qtype, p.in_features):
            raise _mismatch(qtype, p.name, p.scheme, p.in_features)
        if p.in_features % BLOCK:
            raise SignRoundError(
                f"{p.name} has {p.in_features} input features, not a multiple of {BLOCK}; "
                f"gguf:{qtype} blocks cannot hold its partial last group"
            )


def _stored_type(scheme: QuantScheme, qtype: str) -> str:
    """The GGUF block type a layer of ``scheme`` (one that fits ``qtype``) is written in."""
    if qtype in _KTYPES:
        match = kquant.kind_of(scheme, qtype)
        if match is None:  # not reached: _check_layers refused it
            raise SignRoundError(f"gguf:{qtype} does not store {scheme.name}")
        kind = KQUANTS[match[0]]
        return (kind.fallback_ggml if match[1] else kind.ggml).name
    return _GRIDS[qtype].ggml_type.name


def _check_experts(model: Any, planned: Iterable[Planned], qtype: str) -> None:
    """Every expert of one fused GGUF tensor (``ffn_gate_exps``, ...) gets the same block type: llama.cpp
    holds one type per tensor. An expert missing from ``planned`` is kept float (F16)."""
    groups: dict[tuple[str, str], dict[int, str]] = {}
    for p in planned:
        if m := _EXPERT.fullmatch(p.name):
            groups.setdefault((m["prefix"], m["proj"]), {})[int(m["e"])] = _stored_type(p.scheme, qtype)
    for (prefix, proj), types in groups.items():
        module = model.get_submodule(prefix)
        count = len(module) if isinstance(module, nn.ModuleList) else max(types) + 1
        by_type: dict[str, list[int]] = {}
        for e in range(count):
            by_type.setdefault(types.get(e, "F16"), []).append(e)
        if len(by_type) > 1:
            found = "; ".join(f"{t} for experts {es}" for t, es in by_type.items())
            raise SignRoundError(
                f"{prefix}.{{e}}.{proj}: llama.cpp stores the experts of a layer as one {_EXPERT_TENSORS[proj]} "
                f"tensor of one type, but gguf:{qtype} would hold {found}; give every expert of a layer the same "
                f"scheme (one layer rule for {prefix}.*.{proj})"
            )


def _check_model(model: Any, qtype: str) -> Arch:
    arch = arch_of(model)
    if qtype == "f16":
        return arch
    quantized = planned_from_model(model)
    if not quantized:
        raise SignRoundError(
            f"gguf:{qtype} needs a model quantized by signround ({_run_hint(qtype)}); "
            f"use gguf:f16 to export a float model"
        )
    _check_layers(quantized, qtype)  # all checked before any block is built
    _check_experts(model, quantized, qtype)
    return arch


def check_gguf_plan(model: Any, planned: Iterable[Planned], qtype: str) -> None:
    """Before tuning: ``qtype`` is a GGUF type, the architecture is one :mod:`signround.export.gguf_arch`
    writes (with a config llama.cpp runs), every planned layer fits ``qtype`` exactly (``f16`` takes any
    scheme: it stores the dequantized weights), and the experts of each fused tensor share one type.

    Raises:
        SignRoundError: unknown ``qtype``, an unsupported architecture or config option, a layer ``qtype``
            cannot store exactly (the message names the layer and the ``signround quantize`` options that
            produce a fitting model), or experts of one layer planned in different GGUF types.
    """
    _check_qtype(qtype)
    arch_of(model)
    if qtype == "f16":
        return
    planned = list(planned)
    _check_layers(planned, qtype)
    _check_experts(model, planned, qtype)


def write_gguf(model: Any, tokenizer: Any, folder: Path, qtype: str) -> Path:
    """Write ``model`` (a family of :data:`signround.export.gguf_arch.ARCHS`, float or with ``QuantLinear``
    layers) and ``tokenizer`` as ``folder / "model-<qtype>.gguf"`` (module docstring) and return that path.

    Raises:
        SignRoundError: unknown ``qtype``, an unsupported architecture, an unsupported tokenizer, a
            quantized layer whose scheme ``qtype`` cannot store exactly (the message names the layer and
            the ``signround quantize`` options that produce a fitting model), or experts of one layer in
            different types.
    """
    _check_qtype(qtype)
    arch = _check_model(model, qtype)
    path = Path(folder) / f"model-{qtype}.gguf"
    writer = GGUFWriter(path, arch.name)
    add_metadata(writer, model, arch, _FILE_TYPES[qtype])
    add_tokenizer(writer, tokenizer, int(model.config.vocab_size))

    def encode(layer: nn.Module, name: str, perm: np.ndarray | None) -> tuple[np.ndarray, GGMLQuantizationType | None]:
        return _linear_tensor(layer, name, qtype, perm)

    with torch.no_grad():
        for name, data, raw in tensors(model, arch, encode):
            writer.add_tensor(name, data, raw_dtype=raw)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    log.info("wrote %s", path)
    return path


@register_exporter(*GGUF_FORMATS)
class GGUFExporter(Exporter):
    """``gguf:<type>``: one llama.cpp file of that type (module docstring)."""

    def check(self, model: Any, planned: Sequence[Planned], options: ExportOptions) -> None:
        check_gguf_plan(model, planned, self.format.gguf_type)

    def write(self, model: Any, tokenizer: Any, folder: Path, options: ExportOptions) -> None:
        write_gguf(model, tokenizer, folder, self.format.gguf_type)
