"""GPTQ-layout exporters: ``auto_round`` (auto-round's own format) and ``gptq`` (GPTQ v1, as AutoGPTQ,
GPTQModel and transformers read it). Both are lossless re-layouts of the native codes; see docs/formats.md.

For a quantized linear ``P`` with weight ``[out, in]``, ``b`` bits, ``G = ceil(in / g)`` groups:

* ``P.qweight`` int32 ``[in * b / 32, out]``: column ``o`` holds row ``o``'s codes as one little-endian bit
  stream along the input dimension (:func:`signround.pack.bitpack.pack_bitstream`; 3-bit codes straddle
  words, 32 codes per 3 words).
* ``P.qzeros`` int32 ``[G, out * b / 32]``: zero points, bit stream along the output dimension. ``auto_round``
  stores the zero point itself (packing format ``"auto_round"``); ``gptq`` v1 stores ``zero - 1`` (the v1
  convention every GPTQ reader undoes by adding 1), so a group whose zero point is 0 cannot be written.
  Symmetric schemes store the constant ``2^(b-1)`` (``gptq``: ``2^(b-1) - 1``).
* ``P.scales`` float16 ``[G, out]`` (the transpose of the native scales; may be negative for symmetric).
* ``P.g_idx`` int32 ``[in]`` = ``i // g`` (``gptq`` only).
* ``P.bias``: unchanged.

Dequantized weight (both): ``W[o, i] = (code - zero) * scale`` with the group ``i // g``.

Mixtures of experts are written one layer per expert, ``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.*``:
the names vLLM's MoE loaders map onto their fused ``w13_*`` / ``w2_*`` parameters
(``FusedMoE.make_expert_params_mapping``, e.g. in qwen3_moe.py's ``load_weights``). Mixtral differs by reader:
``gptq`` writes the serving names (:func:`signround.export.moe_names.serving_name`,
``block_sparse_moe.experts.{e}.w1/w3/w2``, which vLLM's Mixtral loader and GPTQ Mixtral checkpoints use, config
names included); ``auto_round`` writes what auto-round 0.16.1 writes and reads on transformers 5.24
(``block_sparse_moe.experts.{e}.gate_proj``: transformers' save renames only the module). vLLM builds one quant method
per MoE layer, so every expert of a layer must have one scheme (checked before tuning), and the ``gptq``
``dynamic`` rule for a MoE layer names the layer (``model.layers.{i}.mlp.experts``, the prefix vLLM's
``get_dynamic_override`` is given) as well as its experts' linears.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from signround._version import __version__
from signround.config import QuantScheme
from signround.errors import SignRoundError
from signround.export.common import (
    Planned,
    default_scheme,
    float_linears_in_blocks,
    native_config,
    planned_from_model,
    quantized_layers,
    write_hf_folder,
)
from signround.export.moe_names import per_expert_unreadable, serving_name
from signround.export.registry import Exporter, ExportFormat, ExportOptions, register_exporter
from signround.model.experts import PROJECTIONS, UnfusedExperts
from signround.pack.bitpack import pack_bitstream
from signround.pack.packed import QuantLinear

log = logging.getLogger("signround")
VLLM_MOE_BITS = (4, 8)  # GPTQMarlinMoEMethod ("only supports int4 and int8"), MoeWNA16 (W4A16/W8A16)


def gptq_tensors(layer: QuantLinear, zero_offset: int, with_g_idx: bool) -> dict[str, torch.Tensor]:
    """The GPTQ-layout tensors of one layer; ``zero_offset`` is added to the stored zero points (v1: -1)."""
    bits, out, inp = layer.scheme.bits, layer.out_features, layer.in_features
    codes = layer.codes()  # [out, in]
    zeros = layer.zeros().to(torch.int64) + zero_offset  # [out, G]
    tensors = {
        "qweight": pack_bitstream(codes, bits).t().contiguous(),
        "qzeros": pack_bitstream(zeros.t().contiguous(), bits),
        "scales": layer.scales.t().contiguous(),
    }
    if with_g_idx:
        g = inp if layer.scheme.group_size == -1 else layer.scheme.group_size
        tensors["g_idx"] = torch.arange(inp, dtype=torch.int32) // g
    if layer.bias is not None:
        tensors["bias"] = layer.bias.detach()
    assert tensors["qweight"].shape == (inp * bits // 32, out)
    return tensors


def check_gptq_layout(model: nn.Module, planned: Sequence[Planned], fmt: str = "gptq") -> None:
    """Refuse layers the GPTQ layout cannot hold (checked before tuning by the CLI)."""
    for p in planned:
        if p.in_features % 32 or p.out_features % 32:
            raise SignRoundError(
                f"{fmt} packs 32 codes at a time; {p.name} is {p.out_features}x{p.in_features}, "
                "not a multiple of 32 in both dimensions; save it with --format native"
            )
        if p.scheme.dtype.value != "int":
            raise SignRoundError(f"{fmt} stores integer grids only; {p.name} uses {p.scheme.dtype.value}")
    check_fused_experts(model, planned, fmt)


def expert_schemes(model: nn.Module, planned: Sequence[Planned]) -> dict[str, dict[str, QuantScheme | None]]:
    """``{experts module: {expert linear: scheme, None when kept float}}`` for every MoE layer of ``model``."""
    schemes = {p.name: p.scheme for p in planned}
    return {
        name: {f"{name}.{e}.{proj}": schemes.get(f"{name}.{e}.{proj}") for e in range(len(m)) for proj in PROJECTIONS}
        for name, m in model.named_modules()
        if isinstance(m, UnfusedExperts)
    }


def warn_moe_widths(model: nn.Module, planned: Sequence[Planned], fmt: str) -> None:
    """Warn when MoE experts take a width vLLM's MoE kernels do not run (they hold 4- or 8-bit experts only;
    auto-round's own loader takes the others)."""
    odd = sorted(
        {s.bits for members in expert_schemes(model, planned).values() for s in members.values() if s is not None}
        - set(VLLM_MOE_BITS)
    )
    if odd:
        log.warning(
            "%s: MoE experts at %s bits; vLLM's MoE kernels take 4 or 8 bits only (give --bit-options 4,8, or "
            "--bits 4/8, for a checkpoint vLLM serves)",
            fmt,
            "/".join(map(str, odd)),
        )


def _describe(s: QuantScheme | None) -> str:
    return "float" if s is None else f"W{s.bits}G{s.group_size}{'sym' if s.sym else 'asym'}"


def check_fused_experts(model: nn.Module, planned: Sequence[Planned], fmt: str) -> None:
    """Refuse a MoE layer whose experts do not share one scheme: vLLM's ``FusedMoE`` holds gate+up and down of
    all experts of a layer at one width (one quant method per layer; auto-round checkpoints with differing
    ``extra_config`` entries under a layer are refused by its config parser). gpt-oss is refused: no reader
    loads its experts one linear per expert (:func:`signround.export.moe_names.per_expert_unreadable`; auto-round
    0.16.1 loads the tensors, equal to signround's weights, but its gpt-oss forward then gives other logits)."""
    experts = expert_schemes(model, planned)
    model_type = getattr(model.config, "model_type", "")
    if experts and (why := per_expert_unreadable(model_type)) is not None:
        other = "gpt-oss-mxfp4 (experts at --data-type mxfp4), gguf or native" if model_type == "gpt_oss" else "native"
        raise SignRoundError(f"{fmt} cannot store this {model_type} mixture of experts: {why}; use --format {other}")
    for module, members in experts.items():
        kinds = set(members.values())
        if len(kinds) > 1:
            seen = ", ".join(sorted(_describe(s) for s in kinds))
            raise SignRoundError(
                f"{fmt}: serving engines store all experts of a MoE layer with one scheme, but {module} mixes "
                f"{seen}; give its experts one width (mixed precision does by default) or save with --format native"
            )


def float_routers(model: nn.Module, block_prefix: str) -> list[str]:
    """MoE routers inside the blocks (transformers' ``*Router`` modules, e.g. Qwen3-MoE's ``mlp.gate``): kept
    float, and named so in the config, because readers that rebuild the experts as linears (auto-round's
    ``LinearQwen3MoeSparseMoeBlock``) make the router an ``nn.Linear`` and would otherwise expect it quantized."""
    return [
        n
        for n, m in model.named_modules()
        if n.startswith(block_prefix + ".") and type(m).__name__.endswith("Router") and hasattr(m, "weight")
    ]


def _module_regex(module: str) -> str:
    """Matches the MoE layer's own name (vLLM's FusedMoE prefix) and every linear inside it (GPTQModel,
    signround's reader)."""
    return "^" + re.escape(module) + r"(?:\.|$)"


def _scheme_fields(s: QuantScheme) -> dict[str, Any]:
    return {"bits": s.bits, "group_size": s.group_size, "sym": s.sym}


def _layer_regex(name: str) -> str:
    return "^" + name.replace(".", r"\.") + "$"


def _serving(model: nn.Module):
    """Module or tensor name -> the name written (unchanged except for Mixtral's experts and router)."""
    model_type = getattr(model.config, "model_type", "")
    return lambda name: serving_name(model_type, name)


def _write(model: nn.Module, tokenizer: Any, folder: Path, tensors: dict, config: dict[str, Any]) -> None:
    """:func:`write_hf_folder`; a mixture of experts has every tensor renamed to its serving name first (the
    state is given to transformers' save whole, so its own load-time renames are not reverted onto them)."""
    if not any(isinstance(m, UnfusedExperts) for m in model.modules()):
        write_hf_folder(model, tokenizer, folder, tensors, config)
        return
    rename = _serving(model)
    state = model.state_dict()
    for name, layer_tensors in tensors.items():
        for key in [k for k in state if k.startswith(name + ".")]:
            del state[key]
        state.update({f"{name}.{suffix}": t.contiguous() for suffix, t in layer_tensors.items()})
    native = model.config.quantization_config
    model.config.quantization_config = config
    try:
        model.save_pretrained(folder, state_dict={rename(k): v for k, v in state.items()})
    finally:
        model.config.quantization_config = native
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def auto_round_config(model: nn.Module) -> dict[str, Any]:
    """``quantization_config`` as auto-round 0.16 writes it for packing format ``auto_round``; layers whose
    scheme differs from the default (and float linears inside the blocks, as ``bits: 16``) go to
    ``extra_config``."""
    qc, base = native_config(model), default_scheme(model)
    prefix = qc.get("block_name_to_quantize", "model.layers")
    extra: dict[str, dict[str, Any]] = {}
    for name, layer in quantized_layers(model).items():
        if layer.scheme != base:
            extra[name] = {**_scheme_fields(layer.scheme), "data_type": "int"}
    for name in float_linears_in_blocks(model, prefix) + float_routers(model, prefix):
        extra[name] = {"bits": 16, "data_type": "float"}
    config = {
        "quant_method": "auto-round",
        "packing_format": "auto_round",
        **_scheme_fields(base),
        "data_type": "int",
        "block_name_to_quantize": prefix,
        "provider": f"signround {__version__}",
    }
    tuning = qc.get("tuning", {})
    for key in ("iters", "nsamples", "seqlen", "batch_size", "lr", "minmax_lr"):
        if key in tuning:
            config[key] = tuning[key]
    if extra:
        config["extra_config"] = extra
    return config


def gptq_config(model: nn.Module) -> dict[str, Any]:
    """``quantization_config`` of a GPTQ v1 checkpoint; per-layer overrides in GPTQModel's ``dynamic``
    (``"+:regex"`` overrides a layer's scheme, ``"-:regex"`` leaves it unquantized)."""
    qc, base, rename = native_config(model), default_scheme(model), _serving(model)
    prefix = qc.get("block_name_to_quantize", "model.layers")
    dynamic: dict[str, dict[str, Any]] = {}
    covered: set[str] = set()  # expert linears a whole-layer rule speaks for
    for module, members in expert_schemes(model, planned_from_model(model)).items():
        kinds = set(members.values())
        if len(kinds) != 1 or (scheme := next(iter(kinds))) == base:
            continue  # mixed layers are refused before tuning; the default scheme needs no rule
        key = ("-:" if scheme is None else "+:") + _module_regex(rename(module))
        dynamic[key] = {} if scheme is None else _scheme_fields(scheme)
        covered.update(members)
    for name, layer in quantized_layers(model).items():
        if layer.scheme != base and name not in covered:
            dynamic["+:" + _layer_regex(rename(name))] = _scheme_fields(layer.scheme)
    for name in float_linears_in_blocks(model, prefix) + float_routers(model, prefix):
        if name not in covered:
            dynamic["-:" + _layer_regex(rename(name))] = {}
    config = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        **_scheme_fields(base),
        "desc_act": False,
        "static_groups": False,
        "true_sequential": False,
        "lm_head": False,
        "damp_percent": 0.01,
        # no GPTQModel "meta" block: readers such as auto-round take its presence to mean a v2 checkpoint
        "provider": f"signround {__version__}",
    }
    if dynamic:
        config["dynamic"] = dynamic
    return config


def write_auto_round(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    """auto-round's ``auto_round`` packing: GPTQ layout, zero points stored as they are, no ``g_idx``."""
    check_gptq_layout(model, planned_from_model(model), "auto_round")
    tensors = {name: gptq_tensors(layer, 0, False) for name, layer in quantized_layers(model).items()}
    write_hf_folder(model, tokenizer, folder, tensors, auto_round_config(model))  # auto-round's names: see above


def write_gptq(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    """GPTQ v1: zero points stored minus one, ``g_idx`` present, ``desc_act`` false."""
    check_gptq_layout(model, planned_from_model(model), "gptq")
    tensors = {}
    for name, layer in quantized_layers(model).items():
        if not layer.scheme.sym and bool((layer.qzeros == 0).any()):
            n = int((layer.qzeros == 0).sum())
            raise SignRoundError(
                f"gptq (v1) stores zero points minus one and cannot hold a zero point of 0 ({n} groups of {name}); "
                "use --format auto_round, which GPTQ-layout readers such as auto-round load"
            )
        tensors[name] = gptq_tensors(layer, zero_offset=-1, with_g_idx=True)
    _write(model, tokenizer, folder, tensors, gptq_config(model))


def working_groups(planned: Sequence[Planned]) -> list[int]:
    """Group sizes (multiples of 32, and -1) that divide every planned layer's input width."""
    width = math.gcd(*(p.in_features for p in planned))
    return [g for g in range(32, width + 1, 32) if width % g == 0] + [-1]


def check_auto_round_groups(planned: Sequence[Planned], allow_partial_groups: bool = False) -> None:
    """Refuse groups that do not divide a layer's input width: auto-round 0.16.1's loader cannot run them.
    Its CPU backends (``auto_round:torch_zp``, ``auto_round_kernel_zp``) require ``in % group_size == 0``; such
    a layer falls back to its ``auto_round:fake`` backend, which expects a float weight and fails at the first
    forward; auto-round writes the same layout and fails on it the same way. Its CUDA Triton backends
    (``tritonv2``) build ``g_idx = i // g`` at run time and may take them (not run here), hence the override."""
    bad = [p for p in planned if p.scheme.group_size != -1 and p.in_features % p.scheme.group_size]
    if bad and not allow_partial_groups:
        p = bad[0]
        works = ", ".join(map(str, working_groups(planned)))
        raise SignRoundError(
            f"auto_round: auto-round's loader cannot run group size {p.scheme.group_size} on {p.name} (input width "
            f"{p.in_features}: its CPU backends need groups that divide it); quantize with --group-size one of "
            f"{works}, or pass --allow-partial-groups to write it anyway (for auto-round's CUDA Triton backend)"
        )


@register_exporter(ExportFormat.AUTO_ROUND)
class AutoRoundExporter(Exporter):
    """auto-round's ``auto_round`` packing (:func:`write_auto_round`); groups must divide every layer's width
    unless ``options.allow_partial_groups`` (:func:`check_auto_round_groups`)."""

    def check(self, model: Any, planned: Sequence[Planned], options: ExportOptions) -> None:
        check_gptq_layout(model, planned, self.format)
        check_auto_round_groups(planned, options.allow_partial_groups)
        warn_moe_widths(model, planned, self.format)

    def write(self, model: Any, tokenizer: Any, folder: Path, options: ExportOptions) -> None:
        write_auto_round(model, tokenizer, folder)


@register_exporter(ExportFormat.GPTQ)
class GPTQExporter(Exporter):
    """GPTQ v1 (:func:`write_gptq`)."""

    def check(self, model: Any, planned: Sequence[Planned], options: ExportOptions) -> None:
        check_gptq_layout(model, planned, self.format)
        warn_moe_widths(model, planned, self.format)

    def write(self, model: Any, tokenizer: Any, folder: Path, options: ExportOptions) -> None:
        write_gptq(model, tokenizer, folder)
