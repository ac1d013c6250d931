"""Static activation scales from calibration data: the input maxima of a block's linears (per input channel,
or one per layer for ``tensor`` granularity) and the clip ratio per layer that quantizes them best."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from signround.act.quant import channel_scales, fake_quant_channel
from signround.config import ActGranularity, ActScheme

# clip ratios tried for static per-channel activation scales (1.0: the calibration absmax itself)
CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)


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


def static_scales(
    absmax: dict[str, torch.Tensor], act: ActScheme, clips: dict[str, float] | None = None
) -> dict[str, torch.Tensor]:
    """Static scales for every layer from its calibration absmax (``[in]`` per channel or ``[1]`` per tensor),
    times its clip ratio; the same shape as the absmax."""
    clips = clips or {}
    return {name: channel_scales(a, act.bits, act.dtype, clips.get(name, 1.0)) for name, a in absmax.items()}


def clip_errors(
    x: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor, act: ActScheme, clips: tuple[float, ...]
) -> torch.Tensor:
    """``[len(clips)]``: the squared error ``||Q(x; s c) W^T - x W^T||^2`` of a linear's output for each clip
    ratio ``c`` of the static scales ``s`` (``x [..., in]``, ``weight [out, in]``, ``absmax [in]``)."""
    x = x.reshape(-1, x.shape[-1]).float()
    w = weight.detach().float()
    ref = x @ w.T
    errs = []
    for c in clips:
        q = fake_quant_channel(x, channel_scales(absmax, act.bits, act.dtype, c), act.bits, act.dtype)
        errs.append((q @ w.T - ref).pow(2).sum())
    return torch.stack(errs)


@torch.no_grad()
def calibrate_static(
    block: nn.Module,
    inputs: torch.Tensor,
    kwargs: dict[str, Any],
    names: list[str],
    act: ActScheme,
    batch_size: int,
    clips: tuple[float, ...] = CLIPS,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Static scales for the named linears of ``block`` with adaptive clipping (MergeQuant): per layer, the
    clip ratio among ``clips`` whose quantized inputs give the least output error over the calibration
    ``inputs`` (a ratio below 1 saturates rare outliers to resolve the bulk of the values better). Returns
    ``(scales {name: [in]}, clip ratio {name: c})`` for ``channel`` granularity, ``[1]`` scales (the largest
    channel's) for ``tensor``. The layers see float inputs during the search (one pass for the absmax, one
    for the errors)."""
    absmax = input_absmax(block, inputs, kwargs, names, batch_size)
    if act.granularity is ActGranularity.TENSOR:
        absmax = {name: a.amax().reshape(1) for name, a in absmax.items()}
    errors: dict[str, torch.Tensor] = {}
    modules = dict(block.named_modules())

    def hook(name: str, x: torch.Tensor) -> None:
        e = clip_errors(x, modules[name].weight, absmax[name], act, clips)
        errors[name] = errors[name] + e if name in errors else e

    handles = [modules[n].register_forward_pre_hook(lambda _m, a, n=n: hook(n, a[0])) for n in names]
    try:
        for start in range(0, inputs.shape[0], batch_size):
            block(inputs[start : start + batch_size], **kwargs)
    finally:
        for h in handles:
            h.remove()
    chosen = {name: clips[int(errors[name].argmin())] for name in names}
    return static_scales(absmax, act, chosen), chosen
