"""``QuantLinear``: a linear layer whose weight is stored as packed integer codes.

State (all saved in the checkpoint, names are the on-disk tensor names under the layer's prefix):

* ``qweight`` int32 ``[out, ceil(in / (32 // bits))]``: codes packed along the input dimension,
  least significant bits first (see :mod:`signround.pack.bitpack`). Padding columns of a partial last
  group are not stored.
* ``scales`` float16 ``[out, groups]``: one scale per group (may be negative for symmetric grids).
* ``qzeros`` uint8 ``[out, groups]``: integer zero point per group; present for asymmetric schemes
  only (symmetric schemes use the constant ``2^(bits-1)``).
* ``bias`` (optional): unchanged from the float layer.

Dequantized weight: ``W[o, i] = (code[o, i] - zero[o, i // g]) * scale[o, i // g]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from signround.config import QuantScheme
from signround.formats import int_affine
from signround.pack.bitpack import pack_int32, unpack_int32, values_per_word
from signround.primitives import from_groups, num_groups, to_groups


class QuantLinear(nn.Module):
    """Weight-only quantized replacement for ``nn.Linear``; computes ``x @ W^T + b`` in ``x``'s dtype."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        # Dequantized weight kept between forwards while a `dequantized_weights` context is active.
        self.keep_dequantized = False
        self.dequantized: torch.Tensor | None = None
        groups = num_groups(in_features, scheme.group_size)
        words = -(-in_features // values_per_word(scheme.bits))
        self.register_buffer("qweight", torch.zeros(out_features, words, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16))
        if not scheme.sym:
            self.register_buffer("qzeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        scheme: QuantScheme,
        bias: torch.Tensor | None,
    ) -> QuantLinear:
        """Build from codes ``[out, in]`` (uint8), ``scale`` and ``zero`` ``[out, groups]``."""
        out_features, in_features = codes.shape
        dtype = bias.dtype if bias is not None else torch.float32
        layer = cls(in_features, out_features, scheme, bias is not None, dtype)
        layer.qweight.copy_(pack_int32(codes, scheme.bits))
        layer.scales.copy_(scale.to(torch.float16))
        if not scheme.sym:
            layer.qzeros.copy_(zero.to(torch.uint8))
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def codes(self) -> torch.Tensor:
        """Unpacked integer codes ``[out, in]`` uint8."""
        return unpack_int32(self.qweight, self.scheme.bits, self.in_features)

    def zeros(self) -> torch.Tensor:
        """Zero points ``[out, groups]`` (constant ``2^(bits-1)`` for symmetric schemes)."""
        if self.scheme.sym:
            return torch.full_like(self.scales, 2 ** (self.scheme.bits - 1), dtype=torch.uint8)
        return self.qzeros

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[out, in]`` this layer computes with."""
        codes = to_groups(self.codes(), self.scheme.group_size)
        w = int_affine.dequantize_codes(codes, self.scales.float(), self.zeros().float())
        return from_groups(w, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized
        if w is None or w.dtype != x.dtype or w.device != x.device:
            w = self.dequantize(x.dtype)
            self.dequantized = w if self.keep_dequantized else None
        return nn.functional.linear(x, w, self.bias)

    def _apply(self, fn, recurse: bool = True):  # .to() / .cuda() / .half(): the cached weight is stale
        self.dequantized = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # new codes: the cached weight is stale
        self.dequantized = None
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}"


@contextlib.contextmanager
def dequantized_weights(model: nn.Module) -> Iterator[None]:
    """Keep every ``QuantLinear``'s dequantized weight between forwards inside the block.

    Evaluation runs many short forwards (lm-eval requests are tens of tokens), where unpacking 210 layers
    per call costs more than the matrix products; this trades memory (one float weight per layer, the size
    of the float model) for speed, only while the context lasts.
    """
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.keep_dequantized = True
    try:
        yield
    finally:
        for layer in layers:
            layer.keep_dequantized = False
            layer.dequantized = None
