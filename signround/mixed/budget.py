"""Storage cost of a quantized layer and the bit budget of a mixed-precision run (pure functions).

Bits per weight count everything a checkpoint stores: the ``bits``-wide codes and the format's per-group
``group_bits`` (for ``int``: a float16 scale and, for asymmetric grids, a ``bits``-wide zero point, how
auto_round and GPTQ checkpoints pack zeros). Layers kept in float cost 16 bits per weight.
"""

from __future__ import annotations

import re

from signround.config import QuantScheme
from signround.errors import SignRoundError
from signround.formats import get_format
from signround.primitives import num_groups

FLOAT_BITS = 16
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def layer_bits(scheme: QuantScheme | None, out_features: int, in_features: int) -> int:
    """Total storage bits of one ``[out, in]`` linear weight under ``scheme`` (None: float16)."""
    if scheme is None:
        return FLOAT_BITS * out_features * in_features
    groups = out_features * num_groups(in_features, scheme.group_size)
    per_group = get_format(scheme.dtype).group_bits(scheme)
    return scheme.bits * out_features * in_features + per_group * groups


def parse_size(text: str) -> int:
    """``"60MB"`` / ``"1.5GiB"`` / ``"123456"`` (bytes) -> bytes. Decimal units are powers of 1000."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise SignRoundError(f"cannot read the size {text!r}; write it like 60MB, 1.5GB or 512MiB")
    value, unit = float(m.group(1)), (m.group(2) or "b").lower()
    return int(value * _UNITS[unit])


def budget_bits(
    numels: list[int], avg_bits: float | None = None, target_bytes: int | None = None, fixed_bits: int = 0
) -> int:
    """The storage bits the quantized layers may use in all.

    Args:
        numels: weight count of every layer the allocation decides.
        avg_bits: average bits per weight over those layers (scale and zero overhead included).
        target_bytes: the whole checkpoint's size; ``fixed_bits`` (everything the allocation does not
            decide: embeddings, norms, head, float layers) is taken off it.

    Exactly one of ``avg_bits`` and ``target_bytes`` is given.
    """
    if (avg_bits is None) == (target_bytes is None):
        raise SignRoundError("give exactly one of --avg-bits and --target-size")
    if avg_bits is not None:
        if not avg_bits > 0:
            raise SignRoundError(f"--avg-bits must be > 0, got {avg_bits}")
        return int(avg_bits * sum(numels))
    bits = int(target_bytes) * 8 - fixed_bits
    if bits <= 0:
        raise SignRoundError(
            f"--target-size {target_bytes / 1e6:.1f}MB is smaller than the parts kept in float "
            f"({fixed_bits / 8e6:.1f}MB); give a larger size"
        )
    return bits
