"""NVFP4: blocks of 16 FP4 (e2m1) elements, each block scaled by an FP8 (e4m3) value, times one float32
scale per tensor.

My reading of NVIDIA's description, as implemented here (weights only):

* The tensor scale is ``s_t = absmax(W) / (6 * 448)`` in float32 (6: e2m1's max, 448: e4m3's max), from the
  whole weight ``[out, in]`` of one linear layer, unclipped. (Readers that store its reciprocal, the
  "global scale" ``6 * 448 / absmax``, divide instead; this checkpoint stores ``s_t`` and multiplies.)
* A block is 16 consecutive weights along the input dimension (the scheme's group size is fixed to 16).
  Its scale is ``s_b = e4m3(absmax_block / (6 * s_t))``: round to nearest e4m3 "fn" value (ties to even,
  subnormals kept, at most 448), so the block's largest weight lands near e2m1's max 6.
* Elements are ``w / (s_b * s_t)`` rounded to e2m1 (ties to even), saturating at +-6; when ``s_b``
  rounded down, a block's largest values can exceed 6 and are clipped. A block whose ``s_b`` underflows
  to 0 (all its weights below about ``absmax(W) / 460000``) decodes to zeros.
* A weight decodes to ``e2m1(code) * (float(s_b) * s_t)``, the product in float32.

SignRound's clipping factor multiplies ``absmax_block`` before the e4m3 rounding (straight-through);
rounding offsets work as for every minifloat grid (see :mod:`signround.formats.fp`, which also documents
the 4-bit element codes, sign high). The parameters are :class:`~signround.formats.fp.FloatParams`
``(scale, tensor_scale)``: ``scale`` is ``s_b`` (float32 holding e4m3 values) and ``tensor_scale`` is
``s_t`` broadcast to every block.

Stored per ``QuantLinear``: ``scales`` float8_e4m3fn ``[out, groups]`` (``s_b``) and ``tensor_scale``
float32 ``[1]`` (``s_t``).
"""

from __future__ import annotations

import torch

from signround.formats.base import Layout, Scheme, register_format
from signround.formats.dtype import DType
from signround.formats.fp import E2M1, E4M3, FloatFormat, FloatParams, round_to_grid

BLOCK = 16
E2M1_MAX, E4M3_MAX = 6.0, 448.0
# Keeps an all-zero tensor's scale finite (its block scales are then 0); the smallest normal float32.
MIN_TENSOR_SCALE = 2.0**-126


def tensor_scale(wmin: torch.Tensor, wmax: torch.Tensor) -> torch.Tensor:
    """float32 scalar ``absmax(W) / (6 * 448)`` from the unclipped group extremes ``[out, groups]``."""
    absmax = torch.maximum(-wmin, wmax).max()
    return (absmax / (E2M1_MAX * E4M3_MAX)).clamp(min=MIN_TENSOR_SCALE).detach()


@register_format
class NVFP4Format(FloatFormat):
    """NVFP4: e2m1 elements, an e4m3 scale per block of 16, a float32 scale per tensor."""

    dtype = DType.NVFP4
    element = E2M1
    implied_bits = E2M1.bits
    fixed_group_size = BLOCK

    def group_scales(
        self, absmax: torch.Tensor, wmin: torch.Tensor, wmax: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s_b, s_t)``: ``[out, groups]`` float32 e4m3 values of the clipped ``absmax`` (differentiable in
        the clip factor) and the tensor scale of the unclipped extremes, broadcast to the same shape."""
        s_t = tensor_scale(wmin, wmax)
        block = round_to_grid(absmax / (E2M1_MAX * s_t), E4M3)
        return block, s_t.expand_as(block)

    def group_bits(self, scheme: Scheme) -> int:
        """Storage bits per block besides the codes: one e4m3 byte (the per-tensor float32 scale is not counted)."""
        return 8

    def stored_layout(self, scheme: Scheme, out_features: int, groups: int) -> Layout:
        """``scales`` float8_e4m3fn ``[out, groups]`` and ``tensor_scale`` float32 ``[1]``."""
        return {"scales": ((out_features, groups), torch.float8_e4m3fn), "tensor_scale": ((1,), torch.float32)}

    def to_stored(self, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme) -> dict[str, torch.Tensor]:
        return {
            "scales": scale.detach().to(torch.float8_e4m3fn),
            "tensor_scale": zero.detach().reshape(-1)[:1].to(torch.float32).clone(),
        }

    def from_stored(self, stored: dict[str, torch.Tensor], scheme: Scheme) -> FloatParams:
        scale = stored["scales"].float()
        return FloatParams(scale, stored["tensor_scale"].float().expand_as(scale))
