"""``QuantLinear``: a linear layer whose weight is stored as packed integer codes.

State (all saved in the checkpoint, names are the on-disk tensor names under the layer's prefix):

* ``qweight`` int32 ``[out, ceil(in / (32 // bits))]``: codes packed along the input dimension,
  least significant bits first (see :mod:`signround.pack.bitpack`). Padding columns of a partial last
  group are not stored.
* the format's per-group tensors (``stored_layout`` of the scheme's format, :mod:`signround.formats`):

  * ``int``: ``scales`` float16 ``[out, groups]`` (may be negative for symmetric grids) and ``qzeros``
    uint8 ``[out, groups]``, the integer zero point, for asymmetric schemes only (symmetric schemes use
    the constant ``2^(bits-1)``). ``W[o, i] = (code[o, i] - zero[o, i // g]) * scale[o, i // g]``.
  * ``fp4_e2m1`` .. ``fp8_e5m2``: ``scales`` float16 ``[out, groups]``; ``mxfp4``: ``scales`` uint8
    ``[out, groups]`` (E8M0 bytes); ``nvfp4``: ``scales`` float8_e4m3fn ``[out, groups]`` and
    ``tensor_scale`` float32 ``[1]``. ``W[o, i] = element(code[o, i]) * scale[o, i // g]`` (times
    ``tensor_scale`` for nvfp4), codes holding sign, exponent, mantissa from the high bit down
    (:mod:`signround.formats.fp`).
* ``bias`` (optional): unchanged from the float layer.
* ``input_scale`` float32 ``[in]`` (static per-channel scales) or ``[1]`` (static per-tensor), only when
  the input is quantized with static scales (:meth:`QuantLinear.set_act`); per-token activation
  quantization stores nothing (scales are computed at run time). The activation scheme itself is in
  ``quantization_config["activations"]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from signround.act.quant import fake_quant_channel, fake_quant_token
from signround.config import ActScheme, QuantScheme
from signround.formats import get_format
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
        layout = get_format(scheme.dtype).stored_layout(scheme, out_features, groups)
        for name, (shape, buffer_dtype) in layout.items():
            self.register_buffer(name, torch.zeros(shape, dtype=buffer_dtype))
        self.qparam_names = tuple(layout)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.act: ActScheme | None = None

    def set_act(self, act: ActScheme | None, input_scale: torch.Tensor | None = None) -> None:
        """Quantize this layer's input with ``act`` from now on (None: keep it float). Static granularities
        register the ``input_scale`` buffer, ``[in]`` per channel or ``[1]`` per tensor (zeros until
        ``input_scale`` or a state dict fills it)."""
        self.act = act
        if act is not None and act.granularity.is_static:
            width = self.in_features if act.granularity == "channel" else 1
            scale = torch.zeros(width) if input_scale is None else input_scale.detach().float().reshape(-1)
            self.register_buffer("input_scale", scale.clone())
        elif "input_scale" in self._buffers:
            del self._buffers["input_scale"]

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` fake-quantized by the layer's activation scheme (unchanged when there is none)."""
        if self.act is None:
            return x
        if self.act.granularity == "token":
            return fake_quant_token(x, self.act.bits, self.act.dtype, self.act.clip)
        return fake_quant_channel(x, self.input_scale, self.act.bits, self.act.dtype)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        scheme: QuantScheme,
        bias: torch.Tensor | None,
    ) -> QuantLinear:
        """Build from codes ``[out, in]`` (uint8) and the format's ``scale`` and ``zero`` ``[out, groups]``
        (as :meth:`signround.tune.wrapper.TunableWeight.finalize` returns them)."""
        out_features, in_features = codes.shape
        dtype = bias.dtype if bias is not None else torch.float32
        layer = cls(in_features, out_features, scheme, bias is not None, dtype)
        layer.qweight.copy_(pack_int32(codes, scheme.bits))
        for name, tensor in get_format(scheme.dtype).to_stored(scale, zero, scheme).items():
            layer.get_buffer(name).copy_(tensor)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def codes(self) -> torch.Tensor:
        """Unpacked integer codes ``[out, in]`` uint8."""
        return unpack_int32(self.qweight, self.scheme.bits, self.in_features)

    def zeros(self) -> torch.Tensor:
        """Integer grids' zero points ``[out, groups]`` (constant ``2^(bits-1)`` for symmetric schemes)."""
        return self.qparams()[1]

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The format's ``(scale, zero)`` ``[out, groups]``, decoded from the stored tensors."""
        stored = {name: self.get_buffer(name) for name in self.qparam_names}
        return get_format(self.scheme.dtype).from_stored(stored, self.scheme)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[out, in]`` this layer computes with."""
        codes = to_groups(self.codes(), self.scheme.group_size)
        scale, zero = self.qparams()
        w = get_format(self.scheme.dtype).dequantize_codes(codes, scale.float(), zero.float())
        return from_groups(w, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized
        if w is None or w.dtype != x.dtype or w.device != x.device:
            w = self.dequantize(x.dtype)
            self.dequantized = w if self.keep_dequantized else None
        return nn.functional.linear(self.quantize_input(x), w, self.bias)

    def _apply(self, fn, recurse: bool = True):  # .to() / .cuda() / .half(): the cached weight is stale
        self.dequantized = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # new codes: the cached weight is stale
        self.dequantized = None
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        act = f", act={self.act.name}" if self.act is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}{act}"


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
