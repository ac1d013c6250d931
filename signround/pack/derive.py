"""Double Rounding: serve a lower integer precision from a higher-precision checkpoint's codes.

A checkpoint quantized once at ``B`` bits (SignRound, integer grid) holds codes ``c in [0, 2^B)``, a zero
point ``z`` and a scale ``s`` per group, ``w = (c - z) * s``. A ``b``-bit model (``b < B``) is derived by
rounding the codes a second time, with a ratio ``r`` (:mod:`signround.formats.double_rounding`):

    c' = clamp(round(c / r), 0, 2^b - 1),   z' = clamp(round(z / r), 0, 2^b - 1),   s' = s * r

(``round`` half to even). The checkpoint's ``quantization_config.derivation`` says which ``r``: ``shift``
(absent: every checkpoint before it) ``r = 2^(B-b)``, exact in float16, for which the symmetric grid's
``z = 2^(B-1)`` becomes ``2^(b-1)``; ``range`` ``r = (2^B - 1) / (2^b - 1)`` for asymmetric layers (symmetric
ones still shift), so the derived grid keeps the stored range. Nothing is re-tuned here; a checkpoint tuned
with ``--nested`` holds codes whose derivation is that width's tuned codes (:mod:`signround.tune.nested`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from signround._version import __version__
from signround.act.hadamard import carry_online
from signround.config import Derivation, DType
from signround.errors import SignRoundError
from signround.formats import double_rounding
from signround.pack.packed import QuantLinear


def _ratio(from_bits: int, to_bits: int, sym: bool, derivation: Derivation) -> float:
    """The derivation's ratio (:func:`~signround.formats.double_rounding.derive_ratio`), widths checked."""
    if not 2 <= to_bits <= from_bits:
        raise SignRoundError(f"can derive 2..{from_bits} bits from a {from_bits}-bit checkpoint, not {to_bits}")
    return double_rounding.derive_ratio(from_bits, to_bits, sym, derivation is Derivation.RANGE)


def derive_codes(
    codes: torch.Tensor,
    zero: torch.Tensor,
    from_bits: int,
    to_bits: int,
    sym: bool = False,
    derivation: Derivation = Derivation.SHIFT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes', zero')`` uint8 at ``to_bits`` from codes ``[out, in]`` and zero points ``[out, groups]``
    at ``from_bits`` (see the module docstring)."""
    return double_rounding.derive_codes(codes, zero, to_bits, _ratio(from_bits, to_bits, sym, derivation))


def derive_layer(layer: QuantLinear, bits: int, derivation: Derivation = Derivation.SHIFT) -> QuantLinear:
    """A new ``bits``-wide ``QuantLinear`` derived from ``layer``'s integer codes (``layer`` is unchanged)."""
    scheme = layer.scheme
    if scheme.dtype is not DType.INT:
        raise SignRoundError(f"Double Rounding derives integer grids only; this layer is {scheme.dtype.value}")
    ratio = _ratio(scheme.bits, bits, scheme.sym, derivation)
    scale, zero = layer.qparams()
    codes, zero = double_rounding.derive_codes(layer.codes(), zero, bits, ratio)
    derived = QuantLinear.from_codes(codes, scale.float() * ratio, zero.float(), scheme.replace(bits=bits), layer.bias)
    derived.set_act(layer.act, getattr(layer, "input_scale", None))  # quantized inputs stay as they were
    carry_online(layer, derived)  # and so does an online input rotation
    return derived


def _wider(module: nn.Module, bits: int) -> list[tuple[str, QuantLinear]]:
    """``(name, layer)`` of every ``QuantLinear`` of ``module`` stored wider than ``bits``."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, QuantLinear) and m.scheme.bits > bits]


@contextlib.contextmanager
def served_at(module: nn.Module, bits: int, derivation: Derivation = Derivation.SHIFT) -> Iterator[nn.Module]:
    """Within the context, every ``QuantLinear`` of ``module`` wider than ``bits`` is replaced by its derived
    ``bits``-wide layer (:func:`derive_layer`); the original layers are put back on exit."""
    originals = _wider(module, bits)
    for name, layer in originals:
        module.set_submodule(name, derive_layer(layer, bits, derivation))
    try:
        yield module
    finally:
        for name, layer in originals:
            module.set_submodule(name, layer)


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
    recorded = qc.get("derivation", Derivation.SHIFT.value) if isinstance(qc, dict) else Derivation.SHIFT.value
    try:
        derivation = Derivation(recorded)
    except ValueError:
        raise SignRoundError(
            f"this checkpoint's derivation {recorded!r} is unknown to signround {__version__}; upgrade signround"
        ) from None
    for name, layer in _wider(model, bits):
        derived = derive_layer(layer, bits, derivation)
        model.set_submodule(name, derived)
        if isinstance(qc, dict) and name in qc.get("modules", {}):
            qc["modules"][name] = derived.scheme.to_dict()
    if isinstance(qc, dict):
        qc["derived_from_bits"] = qc.get("derived_from_bits", qc.get("bits", widest))
        qc["bits"] = min(qc.get("bits", widest), bits)
    return model
