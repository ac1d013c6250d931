"""Activation quantizers (fake-quant, straight-through): per-token dynamic and per-channel static.

Activations ``x [..., in]`` (the input of a linear layer) are quantized symmetrically, with no zero point:

* ``int``: ``q = clamp(round(x / s), -(2^(b-1) - 1), 2^(b-1) - 1)``, ``x ~= q * s`` (the symmetric
  "restricted" range, as activation kernels use, so that ``-q`` is representable);
* ``fp8_e4m3`` / ``fp4_e2m1``: ``x / s`` rounded to the minifloat grid (:mod:`signround.formats.fp`),
  saturating at its max (448 / 6).

The scale ``s`` is ``absmax / grid_max``: per token (the last dimension's absmax of each row, computed at run
time: *dynamic*; times the scheme's clip ratio where it is below 1), or per input channel (``[in]``) or per
layer (``[1]``) from calibration data, fixed: *static*. Gradients pass
straight through the rounding (and are zero where a value saturates), so SignRound can tune weights with
quantized activations in the block's forward: :func:`quantized_inputs` hooks the quantizer onto a block's
linears for the duration of a ``with`` (here, below the tuning code that uses it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from signround.config import ActDType, ActScheme
from signround.formats.fp import E2M1, E4M3, Minifloat, round_to_grid

ACT_DTYPES = tuple(d.value for d in ActDType)
_ELEMENT: dict[str, Minifloat] = {ActDType.FP8_E4M3: E4M3, ActDType.FP4_E2M1: E2M1}
MIN_SCALE = 1e-8


def grid_max(dtype: str, bits: int) -> float:
    """The largest quantized magnitude: ``2^(b-1) - 1`` for ``int``, the element max for floats."""
    if dtype == "int":
        return float(2 ** (bits - 1) - 1)
    if dtype not in _ELEMENT:
        raise ValueError(f"unknown activation dtype {dtype!r}; choose one of {ACT_DTYPES}")
    return _ELEMENT[dtype].max_value


def _round(y: torch.Tensor, dtype: str, bits: int) -> torch.Tensor:
    """``y`` (in grid units) onto the grid with a straight-through gradient, saturated."""
    top = grid_max(dtype, bits)
    if dtype == "int":
        y = y.clamp(-top, top)
        if not (torch.is_grad_enabled() and y.requires_grad):  # evaluation: the same values, fewer ops
            return y.round_()
        return y + (torch.round(y) - y).detach()
    return round_to_grid(y, _ELEMENT[dtype])


def fake_quant_token(x: torch.Tensor, bits: int = 8, dtype: str = "int", clip: float = 1.0) -> torch.Tensor:
    """Per-token dynamic quantize-dequantize of ``x [..., in]``: one scale per row, ``clip`` times its absmax
    over the grid max (values beyond ``clip * absmax`` saturate)."""
    absmax = x.detach().abs().amax(dim=-1, keepdim=True)
    scale = ((absmax * clip if clip != 1.0 else absmax) / grid_max(dtype, bits)).clamp(min=MIN_SCALE)
    return _round(x / scale, dtype, bits) * scale


def channel_scales(absmax: torch.Tensor, bits: int = 8, dtype: str = "int", clip: float = 1.0) -> torch.Tensor:
    """Static per-channel scales ``[in]`` from the calibration absmax per input channel, clipped by ``clip``."""
    return (absmax.float() * clip / grid_max(dtype, bits)).clamp(min=MIN_SCALE)


def fake_quant_channel(x: torch.Tensor, scale: torch.Tensor, bits: int = 8, dtype: str = "int") -> torch.Tensor:
    """Static quantize-dequantize of ``x [..., in]`` with fixed ``scale``: ``[in]`` (per channel) or ``[1]``
    (per tensor)."""
    s = scale.to(x.dtype)
    return _round(x / s, dtype, bits) * s


@contextlib.contextmanager
def quantized_inputs(
    block: nn.Module, names: list[str], act: ActScheme | None, scales: dict[str, torch.Tensor] | None = None
) -> Iterator[None]:
    """Within the context, the named linears of ``block`` see their inputs fake-quantized by ``act`` (with
    the static ``scales`` for channel granularity); nothing happens when ``act`` is None."""
    if act is None:
        yield
        return

    def quantize(name: str, x: torch.Tensor) -> torch.Tensor:
        if act.granularity == "token":
            return fake_quant_token(x, act.bits, act.dtype, act.clip)
        return fake_quant_channel(x, scales[name].to(x.device), act.bits, act.dtype)

    modules = dict(block.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda _m, a, n=n: (quantize(n, a[0]), *a[1:])) for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
