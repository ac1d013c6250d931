"""Named schemes, as auto-round and llm-compressor users type them: ``--scheme W4A16`` or
``QuantConfig(scheme="W8A8")``.

Each name is a weight scheme and, for the ``W?A8`` / ``W4A4`` / ``FP8_DYNAMIC`` names, an activation scheme,
with compressed-tensors' meanings (its ``quant_scheme.py`` presets): ``W{b}A16`` is ``b``-bit symmetric int
weights in groups of 128; ``W8A8`` per-channel int8 weights with int8 per-token dynamic activations;
``W4A8`` / ``W4A4`` int4 groups of 128 with int8 / int4 per-token activations; ``W4AFP8`` the same weights
with float8 (e4m3) per-token activations; ``FP8_DYNAMIC`` per-channel float8 weights and per-token float8
activations; ``FP8`` float8 weights with static per-tensor float8 activation scales (calibrated; the weights
keep one scale per output channel where compressed-tensors' preset has one per tensor: finer, and served by
vLLM's same FP8 W8A8 scheme); ``MXFP4A16`` / ``NVFP4A16`` those grids for the weights alone. Explicit flags
(``--bits``, ``--group-size``, ``--act-bits`` ...) override a name's fields.

Names whose activation quantization signround does not have are refused with the reason and the nearest name
it has: ``MXFP4`` and ``NVFP4`` (activations in groups of 32 / 16 with their own block scales).
"""

from __future__ import annotations

from dataclasses import dataclass

from signround.config.scheme import PRESETS, QuantScheme
from signround.config.stages import ActScheme
from signround.errors import SignRoundError


@dataclass(frozen=True)
class NamedScheme:
    """A name's weight scheme and activation scheme (None: weights only, 16-bit activations)."""

    weights: QuantScheme
    act: ActScheme | None = None


_TOKEN_INT8 = ActScheme(bits=8, dtype="int", granularity="token")
SCHEMES: dict[str, NamedScheme] = {
    **{name: NamedScheme(s) for name, s in PRESETS.items()},
    "W8A8": NamedScheme(QuantScheme(bits=8, group_size=-1, sym=True), _TOKEN_INT8),
    "W4A8": NamedScheme(QuantScheme(bits=4, group_size=128, sym=True), _TOKEN_INT8),
    "W4A4": NamedScheme(QuantScheme(bits=4, group_size=128, sym=True), ActScheme(bits=4, granularity="token")),
    "W4AFP8": NamedScheme(QuantScheme(bits=4, group_size=128, sym=True), ActScheme(dtype="fp8_e4m3")),
    "FP8_DYNAMIC": NamedScheme(QuantScheme(dtype="fp8_e4m3", group_size=-1), ActScheme(dtype="fp8_e4m3")),
    "FP8": NamedScheme(QuantScheme(dtype="fp8_e4m3", group_size=-1), ActScheme(dtype="fp8_e4m3", granularity="tensor")),
    "MXFP4A16": NamedScheme(QuantScheme(dtype="mxfp4")),
    "NVFP4A16": NamedScheme(QuantScheme(dtype="nvfp4")),
}
# names the peers have whose activation quantization signround lacks: why, and the nearest name it has
UNSUPPORTED: dict[str, str] = {
    "MXFP4": "MXFP4 activations (groups of 32 with E8M0 scales) are not supported yet; MXFP4A16 quantizes the "
    "weights alone",
    "NVFP4": "NVFP4 activations (groups of 16 with float8 scales) are not supported yet; NVFP4A16 quantizes the "
    "weights alone",
}


def named_scheme(name: str) -> NamedScheme:
    """The :class:`NamedScheme` of ``name`` (case-insensitive); a one-line error for any other name."""
    key = name.upper()
    if key in SCHEMES:
        return SCHEMES[key]
    if key in UNSUPPORTED:
        raise SignRoundError(f"--scheme {name}: {UNSUPPORTED[key]}")
    raise SignRoundError(f"unknown scheme {name!r}; choose one of {', '.join(SCHEMES)}")
