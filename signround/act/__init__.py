"""Activation quantization (issue 10, first pieces): fake-quant quantizers for a linear layer's input and the
bit-plane integer product (ABQ-LLM). Not yet wired into the pipeline or the checkpoint."""

from signround.act.bitplane import bitplane_matmul, bitplanes, integer_linear
from signround.act.quant import channel_scales, fake_quant_channel, fake_quant_token

__all__ = [
    "bitplane_matmul",
    "bitplanes",
    "channel_scales",
    "fake_quant_channel",
    "fake_quant_token",
    "integer_linear",
]
