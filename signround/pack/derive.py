"""Double Rounding: serve a lower integer precision from a higher-precision checkpoint's codes.

A checkpoint quantized once at ``B`` bits (SignRound, integer grid) holds codes ``c in [0, 2^B)``, a zero
point ``z`` and a scale ``s`` per group, ``w = (c - z) * s``. A ``b``-bit model (``b < B``) is derived by
rounding the codes a second time, with ``k = B - b``:

    c' = clamp(round(c / 2^k), 0, 2^b - 1),   z' = clamp(round(z / 2^k), 0, 2^b - 1),   s' = s * 2^k

(``round`` half to even). ``s * 2^k`` is exact in float16, so no new rounding enters the scale. For the
symmetric grid ``z = 2^(B-1)`` becomes ``2^(b-1)``, so ``c' - z'`` is the signed code rounded: the same rule
serves both flavours. Nothing is re-tuned: the ``b``-bit model costs no calibration (the Double Rounding
paper's joint multi-precision training is not done here; see docs/formats.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from signround.act.hadamard import carry_online
from signround.config import DType
from signround.errors import SignRoundError
from signround.pack.packed import QuantLinear


def derive_codes(
    codes: torch.Tensor, zero: torch.Tensor, from_bits: int, to_bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes', zero')`` uint8 at ``to_bits`` from codes ``[out, in]`` and zero points ``[out, groups]``
    at ``from_bits`` (see the module docstring)."""
    if not 2 <= to_bits <= from_bits:
        raise SignRoundError(f"can derive 2..{from_bits} bits from a {from_bits}-bit checkpoint, not {to_bits}")
    div, top = 2.0 ** (from_bits - to_bits), 2**to_bits - 1
    new_codes = torch.round(codes.float() / div).clamp(0, top).to(torch.uint8)
    new_zero = torch.round(zero.float() / div).clamp(0, top).to(torch.uint8)
    return new_codes, new_zero


def derive_layer(layer: QuantLinear, bits: int) -> QuantLinear:
    """A new ``bits``-wide ``QuantLinear`` derived from ``layer``'s integer codes (``layer`` is unchanged)."""
    scheme = layer.scheme
    if scheme.dtype is not DType.INT:
        raise SignRoundError(f"Double Rounding derives integer grids only; this layer is {scheme.dtype.value}")
    scale, zero = layer.qparams()
    codes, zero = derive_codes(layer.codes(), zero, scheme.bits, bits)
    new = scheme.replace(bits=bits)
    scale = scale.float() * 2.0 ** (scheme.bits - bits)
    derived = QuantLinear.from_codes(codes, scale, zero.float(), new, layer.bias)
    derived.set_act(layer.act, getattr(layer, "input_scale", None))  # quantized inputs stay as they were
    carry_online(layer, derived)  # and so does an online input rotation
    return derived


def serve_at_bits(model: nn.Module, bits: int) -> nn.Module:
    """Replace, in place, every ``QuantLinear`` wider than ``bits`` by its derived ``bits``-wide layer, and
    update ``config.quantization_config`` (``modules``, top-level ``bits``, ``derived_from_bits``).

    Raises:
        SignRoundError: the model has no quantized layer, or ``bits`` is outside 2..the stored width.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not layers:
        raise SignRoundError("--bits needs a quantized checkpoint; this model has no quantized layers")
    widest = max(m.scheme.bits for _, m in layers)
    if not 2 <= bits <= widest:
        raise SignRoundError(f"this checkpoint stores {widest}-bit codes: --bits can be 2..{widest}, not {bits}")
    qc: dict[str, Any] | None = getattr(model.config, "quantization_config", None)
    for name, layer in layers:
        if layer.scheme.bits <= bits:
            continue
        parent_name, _, child = name.rpartition(".")
        derived = derive_layer(layer, bits)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, derived)
        if isinstance(qc, dict) and name in qc.get("modules", {}):
            qc["modules"][name] = derived.scheme.to_dict()
    if isinstance(qc, dict):
        qc["derived_from_bits"] = qc.get("derived_from_bits", qc.get("bits", widest))
        qc["bits"] = min(qc.get("bits", widest), bits)
    return model
