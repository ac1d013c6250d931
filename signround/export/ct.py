r"""compressed-tensors ``pack-quantized`` exporter (what llm-compressor writes and vLLM serves), written with
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

MXFP4 and NVFP4 layers go to ``mxfp4-pack-quantized`` / ``nvfp4-pack-quantized`` config groups (the
library's ``MXFP4A16`` / ``NVFP4A16`` weight arguments):

* ``P.weight_packed`` uint8 ``[out, in / 2]``: two e2m1 codes per byte, the even column in the low nibble;
  a code is sign (bit 3), exponent (bits 2-1), mantissa (bit 0), as ours.
* ``P.weight_scale`` ``[out, in / g]``: MXFP4 uint8 E8M0 bytes (``2^(byte - 127)``, ours unchanged);
  NVFP4 float8_e4m3fn block scales (ours unchanged).
* ``P.weight_global_scale`` float32 ``[1]`` (NVFP4): the reciprocal of our tensor scale, ``1 / s_t``; the
  reader divides by it, so a weight is ours up to one float32 rounding of that reciprocal.

Layers whose inputs are quantized (``--act-bits 8``; which weight and activation schemes combine is the table of
:mod:`signround.export.ct_schemes`) and fp8 weights are stored one value per byte:

* ``int-quantized`` (int8 W8A8, int4 W4A8): ``P.weight`` int8 ``[out, in]`` holding ``code - 2^(b-1)``
  (symmetric only) and ``P.weight_scale`` ``[out, G]`` (``G = 1`` per channel), ``W = weight * scale``;
* ``float-quantized`` (fp8 weights): ``P.weight`` float8_e4m3fn ``[out, in]`` (our codes are its bit patterns)
  and ``P.weight_scale`` ``[out, 1]``;
* int4 weights with fp8 activations (W4A8-FP8) keep the ``pack-quantized`` tensors above.

Each such config group carries ``input_activations`` (8 bits, symmetric; ``strategy: token, dynamic: true``,
or ``strategy: tensor, dynamic: false`` with ``P.input_scale`` float32 ``[1]``: ``x ~= round(x / s) * s``).

Only integer, fp8_e4m3, MXFP4 and NVFP4 grids export here; the FP4 grids' groups must divide the layer width
(no override).

Mixtures of experts are written one linear per expert under the names the serving engines read
(:func:`signround.export.moe_names.serving_name`: Mixtral's ``block_sparse_moe.experts.{e}.w1/w3/w2``, the
module tree's ``mlp.experts.{e}.{gate,up,down}_proj`` elsewhere); the routers stay float and are listed in
``ignore``. gpt-oss is refused before tuning: no reader loads its experts one linear per expert.

With one scheme the single config group targets ``Linear`` (vLLM lets that class target stand for its
``FusedMoE`` too). With several, dense layers are targeted by name and each MoE layer by one regex,
``re:^<experts prefix>(?:\.\d+\.|$)`` on its serving name (e.g. ``re:^model\.layers\.3\.mlp\.experts(?:\.\d+\.|$)``),
in its experts' group: vLLM's ``CompressedTensorsMoEMethod.get_moe_method`` resolves a ``FusedMoE`` with prefix ``P``
by ``get_scheme_dict`` on ``P.0.gate_proj``, ``P.0.up_proj`` and ``P.0.down_proj`` (those words whatever the
checkpoint calls them, so Mixtral's ``w1/w3/w2`` names never match by name), each first checked against
``ignore`` and then matched against the targets by ``find_matched_target`` (exact name or ``re:`` ``re.match``,
then class name); the three must agree (vLLM releases before about 0.10.2 read only a ``Linear`` target for
MoE layers and cannot serve these). The regex matches those, the prefix, and every per-expert serving name
(signround's reader matches targets against those by ``re.match``). transformers 5.24 decompresses all experts with
one group, the first whose ``re:`` targets mention ``experts`` (``get_experts_scheme``), so it loads MoE layers at
one scheme only (a warning says so). A MoE layer kept float gets the same regex in ``ignore``.
Experts of one layer at different schemes are refused before tuning (:func:`check_moe`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from signround.config import ActScheme, QuantScheme
from signround.errors import SignRoundError
from signround.export.common import Planned, model_act, planned_from_model, quantized_layers
from signround.export.ct_schemes import FLOAT, FP4_FORMATS, INT, PACK, check_act, ct_format, input_args, weight_args
from signround.export.gptq import check_fused_experts
from signround.export.moe_names import serving_name
from signround.export.registry import Exporter, ExportFormat, ExportOptions, register_exporter
from signround.model.experts import UnfusedExperts
from signround.pack.bitpack import pack_nibbles
from signround.pack.packed import QuantLinear

log = logging.getLogger("signround")


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


def check_ct(
    model: nn.Module, planned: Sequence[Planned], allow_partial_groups: bool = False, act: ActScheme | None = None
) -> None:
    """Refuse what compressed-tensors cannot hold: a weight scheme and activation scheme ``act`` outside the
    table of :mod:`signround.export.ct_schemes`, (unless ``allow_partial_groups``, for the integer
    ``pack-quantized`` layout only) groups that do not divide a layer's input width, which stock readers fail
    on at the first forward, and mixtures of experts no reader loads (:func:`check_moe`)."""
    _ct()
    if act is not None:
        check_act(act)
    check_moe(model, planned)
    for p in planned:
        fmt = ct_format(p.scheme, act, p.name)
        g = p.scheme.group_size
        if g == -1 or p.in_features % g == 0:
            continue
        if fmt in FP4_FORMATS.values():
            raise SignRoundError(
                f"{fmt} needs whole blocks of {g}; {p.name} has input width {p.in_features}; keep that layer in "
                "float with --layer-config"
            )
        if fmt != PACK or act is not None or not allow_partial_groups:
            hint = _divisor_hint(p.in_features, g)
            fix = f"quantize with --group-size {hint}" if hint else "quantize with --group-size -1"
            also = ", or pass --allow-partial-groups to write it anyway" if fmt == PACK and act is None else ""
            raise SignRoundError(
                f"compressed-tensors readers (vLLM, transformers) cannot run group size {g} on {p.name} "
                f"(input width {p.in_features}); {fix}{also}"
            )


def check_moe(model: nn.Module, planned: Sequence[Planned]) -> None:
    """Refuse a mixture of experts no reader loads (gpt-oss) and a MoE layer whose experts do not share one
    scheme (vLLM serves a layer's experts as one ``FusedMoE`` with one scheme; the check
    :func:`signround.export.gptq.check_fused_experts` the GPTQ formats use); warn about asymmetric experts,
    which transformers 5.24 cannot load (its expert decompression, ``CompressedTensorsDequantize``, drops
    ``weight_zero_point``) and vLLM's WNA16 MoE methods refuse in most releases ("Only symmetric quantization is
    supported for MoE"; only its newest source reads zero points)."""
    if not any(isinstance(m, UnfusedExperts) for m in model.modules()):
        return
    check_fused_experts(model, planned, "compressed-tensors")
    asym = [p.name for p in planned if ".experts." in p.name and not p.scheme.sym and p.scheme.dtype.value == "int"]
    if asym:
        log.warning(
            "compressed-tensors: %d asymmetric expert layers (e.g. %s): transformers cannot load asymmetric MoE "
            "experts and most vLLM releases refuse them; quantize with --sym for an export every reader loads",
            len(asym),
            asym[0],
        )


def is_router(module: nn.Module) -> bool:
    """A mixture-of-experts router (transformers' ``*Router`` modules, as :mod:`signround.model.accounting`
    tells them): float, listed in ``ignore`` so no reader quantizes it."""
    return type(module).__name__.endswith("Router")


def fp4_tensors(layer: QuantLinear) -> dict[str, torch.Tensor]:
    """``weight_packed`` / ``weight_scale`` (/ ``weight_global_scale``) of an MXFP4 or NVFP4 layer."""
    codes = layer.codes()
    tensors = {"weight_packed": pack_nibbles(codes), "weight_scale": layer.scales.clone()}
    if layer.scheme.dtype.value == "nvfp4":
        tensors["weight_global_scale"] = 1.0 / layer.tensor_scale.float()
    if layer.bias is not None:
        tensors["bias"] = layer.bias.detach()
    return tensors


def layer_tensors(layer: QuantLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A layer's tensors in its :func:`signround.export.ct_schemes.ct_format` layout (module docstring), plus
    ``input_scale [1]`` float32 for static activations."""
    fmt = ct_format(layer.scheme, layer.act)
    if fmt in FP4_FORMATS.values():
        return fp4_tensors(layer)
    if fmt == FLOAT:  # our fp8 codes are float8_e4m3fn bit patterns
        tensors = {"weight": layer.codes().view(torch.float8_e4m3fn), "weight_scale": layer.scales.to(dtype)}
    else:
        bits = layer.scheme.bits
        offset = 2 ** (bits - 1)
        signed = (layer.codes().to(torch.int16) - offset).to(torch.int8)
        scales = layer.scales.to(dtype)
        if fmt == INT:
            tensors = {"weight": signed, "weight_scale": scales}
        else:
            pack_to_int32 = _ct()[0]
            tensors = {
                "weight_packed": pack_to_int32(signed, bits),
                "weight_scale": scales,
                "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),
            }
            if not layer.scheme.sym:
                zp = (layer.qzeros.to(torch.int16) - offset).to(torch.int8)
                tensors["weight_zero_point"] = pack_to_int32(zp, bits, packed_dim=0)
    if layer.act is not None and layer.act.granularity.is_static:
        tensors["input_scale"] = layer.input_scale.detach().float().reshape(1).clone()
    if layer.bias is not None:
        tensors["bias"] = layer.bias.detach()
    return tensors


def experts_target(prefix: str) -> str:
    """The config target of the MoE layer whose serving name is ``prefix`` (``model.layers.3.mlp.experts``): by
    ``re.match`` it matches ``prefix.{e}.<anything>``, the names vLLM resolves the layer's ``FusedMoE`` by
    (``prefix.0.gate_proj`` / ``up_proj`` / ``down_proj``) and every expert's serving name (signround's reader),
    and ``prefix`` itself (the ``FusedMoE`` prefix; transformers 5.24's fused experts module, which it matches
    harmlessly), but no other layer (``model.layers.30`` or ``shared_experts``)."""
    return "re:^" + re.escape(prefix) + r"(?:\.\d+\.|$)"


def _experts_of(model: nn.Module) -> dict[str, str]:
    """``{expert linear name: its MoE layer's experts module name}`` over the model's unfused experts."""
    return {
        f"{name}.{sub}": name
        for name, m in model.named_modules()
        if isinstance(m, UnfusedExperts)
        for sub, child in m.named_modules()
        if isinstance(child, (nn.Linear, QuantLinear))
    }


def ct_config(model: nn.Module, layers: dict[str, QuantLinear], rename: Callable[[str], str]) -> dict[str, Any]:
    """``quantization_config``: one config group per distinct scheme; float linears and routers go to
    ``ignore``. Module names pass through ``rename`` (the serving names, :func:`serving_names`). With one scheme
    the group targets ``Linear``; with several, dense layers are named and each MoE layer (its experts share
    one scheme, :func:`check_moe`) is one :func:`experts_target` regex, as vLLM resolves a ``FusedMoE``."""
    _, QuantizationArgs, QuantizationConfig, QuantizationScheme = _ct()
    experts = _experts_of(model)
    by_scheme: dict[tuple[QuantScheme, ActScheme | None], dict[str, None]] = {}  # -> its targets, in order
    for name, layer in layers.items():
        module = experts.get(name)
        target = rename(name) if module is None else experts_target(rename(module))
        by_scheme.setdefault((layer.scheme, layer.act), {})[target] = None
    groups = {}
    formats = set()
    for i, ((scheme, act), names) in enumerate(by_scheme.items()):
        targets = ["Linear"] if len(by_scheme) == 1 else list(names)
        fmt = ct_format(scheme, act)
        formats.add(fmt)
        if fmt in FP4_FORMATS.values():
            from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

            preset = PRESET_SCHEMES["NVFP4A16" if scheme.dtype.value == "nvfp4" else "MXFP4A16"]
            groups[f"group_{i}"] = QuantizationScheme(targets=targets, **preset, format=fmt)
            continue
        inputs = QuantizationArgs(**input_args(act)) if act is not None else None
        groups[f"group_{i}"] = QuantizationScheme(
            targets=targets, weights=QuantizationArgs(**weight_args(scheme)), input_activations=inputs, format=fmt
        )
    ignore = [rename(n) for n, m in model.named_modules() if type(m) is nn.Linear or is_router(m)]
    # A MoE layer kept float: vLLM checks ``ignore`` with the same ``prefix.0.gate_proj`` names (Mixtral's
    # per-expert ``w1`` entries never match them).
    quantized_moe = {experts[n] for n in layers if n in experts}
    for module in dict.fromkeys(experts.values()):
        if module not in quantized_moe:
            ignore.append(experts_target(rename(module)))
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head" not in ignore:
        ignore.append("lm_head")
    if len({layers[n].scheme for n in layers if n in experts}) > 1:
        log.warning(
            "compressed-tensors: MoE layers at several schemes; vLLM and signround's reader load them, "
            "transformers 5.24 decompresses every expert with one config group (get_experts_scheme)"
        )
    config = QuantizationConfig(
        config_groups=groups,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
        ignore=ignore,
    )
    return config.model_dump()


def serving_names(model: nn.Module) -> Callable[[str], str]:
    """Module or tensor name -> the name written (:func:`signround.export.moe_names.serving_name` for the
    model's ``config.model_type``)."""
    model_type = getattr(model.config, "model_type", "")
    return lambda name: serving_name(model_type, name)


def write_compressed_tensors(
    model: nn.Module, tokenizer: Any, folder: Path, allow_partial_groups: bool = False
) -> None:
    """Save ``model`` as an HF folder: each quantized layer's tensors replaced by :func:`layer_tensors`, every
    tensor under its serving name, ``config.json`` carrying :func:`ct_config`. (transformers' save then
    reverts its load-time renames, as for any model; none matches a serving name.)"""
    check_ct(model, planned_from_model(model), allow_partial_groups, model_act(model))
    layers = quantized_layers(model)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    rename = serving_names(model)
    state = model.state_dict()
    for name, layer in layers.items():
        for key in [k for k in state if k.startswith(name + ".")]:
            del state[key]
        state.update({f"{name}.{suffix}": t.contiguous() for suffix, t in layer_tensors(layer, dtype).items()})
    state = {rename(k): v for k, v in state.items()}
    native = model.config.quantization_config
    model.config.quantization_config = ct_config(model, layers, rename)
    try:
        model.save_pretrained(folder, state_dict=state)
    finally:
        model.config.quantization_config = native
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


@register_exporter(ExportFormat.COMPRESSED_TENSORS)
class CompressedTensorsExporter(Exporter):
    """compressed-tensors ``pack-quantized`` (and the FP4 variants); ``options.allow_partial_groups`` lets
    integer groups that do not divide a layer's width through."""

    def check(self, model: Any, planned: Sequence[Planned], options: ExportOptions) -> None:
        check_ct(model, planned, options.allow_partial_groups, options.act)

    def write(self, model: Any, tokenizer: Any, folder: Path, options: ExportOptions) -> None:
        write_compressed_tensors(model, tokenizer, folder, options.allow_partial_groups)
