"""compressed-tensors ``pack-quantized`` exporter (what llm-compressor writes and vLLM serves), written with
the ``compressed-tensors`` library's packer and config models; see docs/formats.md.

For a quantized linear ``P`` with weight ``[out, in]``, ``b`` bits, ``G`` groups:

* ``P.weight_packed`` int32 ``[out, ceil(in * b / 32)]``: the signed values ``code - 2^(b-1)`` offset back
  by ``+2^(b-1)`` (so the stored unsigned value is our code) in one little-endian bit stream per row.
* ``P.weight_scale`` ``[out, G]`` in the model's dtype (from the float16 scale, exactly).
* ``P.weight_zero_point`` int32 ``[ceil(out * b / 32), G]`` (asymmetric only): zero points, same offset,
  packed along the output dimension.
* ``P.weight_shape`` int64 ``[2]`` = ``[out, in]``.

Dequantized: ``W = (q - zp) * scale`` with signed ``q = code - 2^(b-1)``, ``zp = zero - 2^(b-1)``, which is
our ``(code - zero) * scale``. Stock readers need groups that divide the layer width; a partial last group
is refused unless ``allow_partial_groups`` is set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from signround.config import QuantScheme
from signround.errors import SignRoundError
from signround.export.common import Planned, planned_from_model, quantized_layers, write_hf_folder
from signround.pack.packed import QuantLinear


def _ct():
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    except ImportError:
        raise SignRoundError(
            "the compressed-tensors format needs the compressed-tensors package; pip install compressed-tensors"
        ) from None
    return pack_to_int32, QuantizationArgs, QuantizationConfig, QuantizationScheme


def _divisor_hint(width: int, group: int) -> int | None:
    """The largest power-of-two group size below ``group`` that divides ``width`` (>= 16), if any."""
    g = group // 2
    while g >= 16:
        if width % g == 0:
            return g
        g //= 2
    return None


def check_ct(model: nn.Module, planned: list[Planned], allow_partial_groups: bool = False, **_: Any) -> None:
    """Refuse what pack-quantized cannot hold: non-integer grids, and (unless ``allow_partial_groups``) groups
    that do not divide a layer's input width, which stock readers fail on at the first forward."""
    _ct()
    for p in planned:
        if p.scheme.dtype.value != "int":
            raise SignRoundError(f"pack-quantized stores integer grids only; {p.name} uses {p.scheme.dtype.value}")
        g = p.scheme.group_size
        if not allow_partial_groups and g != -1 and p.in_features % g:
            hint = _divisor_hint(p.in_features, g)
            fix = f"quantize with --group-size {hint}" if hint else "quantize with --group-size -1"
            raise SignRoundError(
                f"compressed-tensors readers (vLLM, transformers) cannot run group size {g} on {p.name} "
                f"(input width {p.in_features}); {fix}, or pass --allow-partial-groups to write it anyway"
            )


def layer_tensors(layer: QuantLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    pack_to_int32 = _ct()[0]
    bits = layer.scheme.bits
    offset = 2 ** (bits - 1)
    signed = (layer.codes().to(torch.int16) - offset).to(torch.int8)
    tensors = {
        "weight_packed": pack_to_int32(signed, bits),
        "weight_scale": layer.scales.to(dtype),
        "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),
    }
    if not layer.scheme.sym:
        zp = (layer.qzeros.to(torch.int16) - offset).to(torch.int8)
        tensors["weight_zero_point"] = pack_to_int32(zp, bits, packed_dim=0)
    if layer.bias is not None:
        tensors["bias"] = layer.bias.detach()
    return tensors


def ct_config(model: nn.Module, layers: dict[str, QuantLinear]) -> dict[str, Any]:
    """``quantization_config``: one config group per distinct scheme; float linears go to ``ignore``."""
    _, QuantizationArgs, QuantizationConfig, QuantizationScheme = _ct()
    by_scheme: dict[QuantScheme, list[str]] = {}
    for name, layer in layers.items():
        by_scheme.setdefault(layer.scheme, []).append(name)
    groups = {}
    for i, (scheme, names) in enumerate(by_scheme.items()):
        args = QuantizationArgs(
            num_bits=scheme.bits,
            type="int",
            symmetric=scheme.sym,
            strategy="channel" if scheme.group_size == -1 else "group",
            group_size=None if scheme.group_size == -1 else scheme.group_size,
        )
        targets = ["Linear"] if len(by_scheme) == 1 else names
        groups[f"group_{i}"] = QuantizationScheme(targets=targets, weights=args, format="pack-quantized")
    ignore = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head" not in ignore:
        ignore.append("lm_head")
    config = QuantizationConfig(
        config_groups=groups, format="pack-quantized", quantization_status="compressed", ignore=ignore
    )
    return config.model_dump()


def write_compressed_tensors(
    model: nn.Module, tokenizer: Any, folder: Path, allow_partial_groups: bool = False, **_: Any
) -> None:
    check_ct(model, planned_from_model(model), allow_partial_groups)
    layers = quantized_layers(model)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    tensors = {name: layer_tensors(layer, dtype) for name, layer in layers.items()}
    write_hf_folder(model, tokenizer, folder, tensors, ct_config(model, layers))
