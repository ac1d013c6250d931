"""Static activation scales from calibration data, and the hooks that quantize linear inputs in a block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from signround.act.quant import channel_scales, fake_quant_channel, fake_quant_token
from signround.config import ActScheme


@torch.no_grad()
def input_absmax(
    block: nn.Module, inputs: torch.Tensor, kwargs: dict[str, Any], names: list[str], batch_size: int
) -> dict[str, torch.Tensor]:
    """``{name: absmax [in]}``: the largest ``|x|`` per input channel that each named linear of ``block``
    sees when ``block`` runs on ``inputs [n, seq, hidden]``."""
    found: dict[str, torch.Tensor] = {}

    def hook(name: str, x: torch.Tensor) -> None:
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
        found[name] = torch.maximum(found[name], m) if name in found else m

    modules = dict(block.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda _m, a, n=n: hook(n, a[0])) for n in names]
    try:
        for start in range(0, inputs.shape[0], batch_size):
            block(inputs[start : start + batch_size], **kwargs)
    finally:
        for h in handles:
            h.remove()
    return found


def static_scales(absmax: dict[str, torch.Tensor], act: ActScheme) -> dict[str, torch.Tensor]:
    """Per-channel scales ``[in]`` for every layer from its calibration absmax (no clipping)."""
    return {name: channel_scales(a, act.bits, act.dtype) for name, a in absmax.items()}


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
            return fake_quant_token(x, act.bits, act.dtype)
        return fake_quant_channel(x, scales[name].to(x.device), act.bits, act.dtype)

    modules = dict(block.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda _m, a, n=n: (quantize(n, a[0]), *a[1:])) for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
