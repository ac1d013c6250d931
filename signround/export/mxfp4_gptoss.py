r"""gpt-oss in the layout of its original checkpoints (``openai/gpt-oss-20b`` / ``-120b``): MXFP4 experts,
everything else float. transformers (``Mxfp4HfQuantizer``) and vLLM (``gpt_oss.py`` with ``Mxfp4Config``)
read it; see docs/formats.md, "gpt-oss MXFP4".

Per MoE layer ``P = model.layers.{i}.mlp.experts`` (``E`` experts, hidden width ``H``, expert width ``I``):

* ``P.gate_up_proj_blocks`` uint8 ``[E, 2I, H/32, 16]``: row ``r`` is an output row of the fused gate/up
  projection, rows interleaved (``2j`` = gate row ``j``, ``2j+1`` = up row ``j``, the interleaving of
  transformers' float ``gate_up_proj [E, H, 2I]`` columns); the input dimension ``H`` cut into blocks of 32
  codes, 16 bytes each, the even input column in the low nibble. A code is e2m1: sign bit 3, exponent bits 2-1,
  mantissa bit 0 (readers' table ``+0, .5, 1, 1.5, 2, 3, 4, 6, -0, ..., -6``), ours unchanged.
* ``P.gate_up_proj_scales`` uint8 ``[E, 2I, H/32]``: E8M0 bytes, ``2^(byte - 127)``, ours unchanged.
* ``P.gate_up_proj_bias`` ``[E, 2I]`` (interleaved the same way), ``P.down_proj_bias`` ``[E, H]``: float.
* ``P.down_proj_blocks`` uint8 ``[E, H, I/32, 16]``, ``P.down_proj_scales`` uint8 ``[E, H, I/32]``.

A weight decodes to ``e2m1(code) * 2^(scale - 127)``, signround's MXFP4 value exactly: the codes and scales
are re-stacked, never requantized. Attention, routers, embeddings, norms, sinks and the head are written in
the model's dtype under transformers' gpt-oss names (the original checkpoints' names). ``config.json`` carries
``quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": [...]}`` with the original
checkpoints' list (attention, routers, embeddings, head; never the experts, which transformers converts
unless a pattern matches ``model.layers.{i}.mlp.experts``). vLLM's ``Mxfp4Config`` ignores that list: it runs
every ``FusedMoE`` in MXFP4 and every linear unquantized, so the format holds no other quantized layer.

Refused before tuning (:func:`check_gptoss_mxfp4`): a model that is not gpt-oss, experts not all MXFP4 (group
32), expert widths that are not whole blocks, any other quantized layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from signround.errors import SignRoundError
from signround.export.common import Planned, planned_from_model, write_hf_folder
from signround.export.registry import Exporter, ExportFormat, ExportOptions, register_exporter
from signround.model.experts import PROJECTIONS, UnfusedGptOssExperts, join_gate_up_bias
from signround.pack.bitpack import pack_nibbles
from signround.pack.packed import QuantLinear

FORMAT = "gpt-oss-mxfp4"
BLOCK = 32  # codes per E8M0 scale, along the input dimension
# What openai's gpt-oss checkpoints list: every float module, none of the experts.
MODULES_TO_NOT_CONVERT = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
KEEP_FLOAT = """--layer-config '{"self_attn": {"bits": 16}}'"""


def quantization_config() -> dict[str, Any]:
    """The ``quantization_config`` of gpt-oss's original MXFP4 checkpoints."""
    return {"quant_method": "mxfp4", "modules_to_not_convert": list(MODULES_TO_NOT_CONVERT)}


def experts_modules(model: nn.Module) -> dict[str, UnfusedGptOssExperts]:
    """``{name: experts module}`` of the model's unfused gpt-oss MoE layers, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, UnfusedGptOssExperts)}


def _expert_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {
        f"{name}.{e}.{proj}": getattr(expert, proj)
        for name, module in experts_modules(model).items()
        for e, expert in enumerate(module)
        for proj in PROJECTIONS
    }


def check_gptoss_mxfp4(model: nn.Module, planned: Sequence[Planned]) -> None:
    """Refuse what the gpt-oss MXFP4 layout cannot hold: another family, experts that are not all MXFP4 with
    blocks of 32 along a width that is whole blocks, and any other quantized layer (attention, the head)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type != "gpt_oss":
        raise SignRoundError(
            f"{FORMAT} writes gpt-oss models only (this one is {model_type or type(model).__name__}); "
            "use --format native or compressed-tensors"
        )
    experts = _expert_linears(model)
    if not experts:
        raise SignRoundError(f"{FORMAT}: this gpt-oss model has no unfused experts; load it with signround first")
    by_name = {p.name: p for p in planned}
    others = [n for n in by_name if n not in experts]
    if others:
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        raise SignRoundError(
            f"{FORMAT} stores only the experts quantized, but {others[0]}{more} would be quantized; keep them "
            f"float, e.g. attention with {KEEP_FLOAT}"
        )
    fix = f"quantize the experts with --data-type mxfp4 --group-size {BLOCK}"
    for name in experts:
        p = by_name.get(name)
        if p is None:
            raise SignRoundError(f"{FORMAT} stores every expert in MXFP4, but {name} stays float; {fix}")
        if p.scheme.dtype.value != "mxfp4" or p.scheme.group_size != BLOCK:
            raise SignRoundError(
                f"{FORMAT} stores experts in MXFP4 blocks of {BLOCK}; {name} is {p.scheme.name}; {fix}"
            )
        if p.in_features % BLOCK:
            raise SignRoundError(
                f"{FORMAT} needs whole blocks of {BLOCK}; {name} has input width {p.in_features}; use --format native"
            )


def pack_blocks(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes ``[..., rows, in]`` (uint8, 0..15) -> ``[..., rows, in / 32, 16]`` bytes, the even column
    in the low nibble."""
    packed = pack_nibbles(codes)
    return packed.reshape(*codes.shape[:-1], codes.shape[-1] // BLOCK, BLOCK // 2).contiguous()


def interleave_rows(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gate, up [E, I, ...]`` -> ``[E, 2I, ...]`` with gate row ``j`` at ``2j`` and up row ``j`` at ``2j + 1``."""
    return torch.stack([gate, up], dim=2).reshape(gate.shape[0], 2 * gate.shape[1], *gate.shape[2:])


def _stacked(module: UnfusedGptOssExperts, proj: str, what: str) -> torch.Tensor:
    layers = [getattr(expert, proj) for expert in module]
    if not all(isinstance(x, QuantLinear) for x in layers):
        raise SignRoundError(f"{FORMAT}: the {proj} layers of every expert must be quantized (MXFP4)")
    if what == "codes":
        return torch.stack([x.codes() for x in layers])
    if what == "scales":
        return torch.stack([x.scales for x in layers])
    return torch.stack([x.bias.detach() for x in layers])


def fused_tensors(module: UnfusedGptOssExperts) -> dict[str, torch.Tensor]:
    """The experts module's tensors in the original layout (names relative to the module, see the module
    docstring), from its per-expert MXFP4 codes and scales, unchanged."""
    gate_codes, up_codes = _stacked(module, "gate_proj", "codes"), _stacked(module, "up_proj", "codes")
    gate_scales, up_scales = _stacked(module, "gate_proj", "scales"), _stacked(module, "up_proj", "scales")
    return {
        "gate_up_proj_blocks": pack_blocks(interleave_rows(gate_codes, up_codes)),
        "gate_up_proj_scales": interleave_rows(gate_scales, up_scales).contiguous(),
        "gate_up_proj_bias": join_gate_up_bias(
            _stacked(module, "gate_proj", "bias"), _stacked(module, "up_proj", "bias")
        ),
        "down_proj_blocks": pack_blocks(_stacked(module, "down_proj", "codes")),
        "down_proj_scales": _stacked(module, "down_proj", "scales").contiguous(),
        "down_proj_bias": _stacked(module, "down_proj", "bias").contiguous(),
    }


def write_gptoss_mxfp4(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    """Save ``model`` in gpt-oss's original MXFP4 layout: each experts module's per-expert tensors replaced
    by :func:`fused_tensors`, the rest as transformers saves it, ``config.json`` with :func:`quantization_config`."""
    check_gptoss_mxfp4(model, planned_from_model(model))
    tensors = {name: fused_tensors(module) for name, module in experts_modules(model).items()}
    write_hf_folder(model, tokenizer, folder, tensors, quantization_config())


@register_exporter(ExportFormat.GPT_OSS_MXFP4)
class GptOssMxfp4Exporter(Exporter):
    """gpt-oss with MXFP4 experts as openai's checkpoints store them (transformers, vLLM)."""

    def check(self, model: Any, planned: Sequence[Planned], options: ExportOptions) -> None:
        check_gptoss_mxfp4(model, planned)

    def write(self, model: Any, tokenizer: Any, folder: Path, options: ExportOptions) -> None:
        write_gptoss_mxfp4(model, tokenizer, folder)
