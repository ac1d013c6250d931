"""signround's own readers of the formats other tools write (auto-round, GPTQ v1/v2, compressed-tensors
``pack-quantized``, ``int-quantized``, ``float-quantized``), so ``signround eval`` / ``generate`` take any
of them without those tools installed.

Each reader decodes a layer's tensors back to codes ``[out, in]``, scales and zero points ``[out, G]`` and
builds a :class:`~signround.pack.packed.QuantLinear`; the layouts are in docs/formats.md. Verification of
our *writers* never uses these readers (it uses the third-party ones); these exist for convenience.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from signround.config import QuantScheme
from signround.errors import SignRoundError
from signround.export.ct_schemes import act_from_args
from signround.export.moe_names import serving_name
from signround.pack.bitpack import pack_int32, unpack_bitstream
from signround.pack.packed import QuantLinear

AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # logical column j of an 8-group is stored in slot AWQ_ORDER[j]
FOREIGN_METHODS = ("auto-round", "gptq", "compressed-tensors")


def _layer(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group: int, sym: bool, bias):
    """QuantLinear from codes ``[out, in]``, scales/zeros ``[out, G]``; symmetric only when every zero point
    is the constant ``2^(bits-1)`` our symmetric layers assume."""
    if int(codes.max()) >= 2**bits or int(zeros.min()) < 0 or int(zeros.max()) >= 2**bits:
        raise SignRoundError(f"codes or zero points out of the {bits}-bit range; the checkpoint is corrupt")
    sym = sym and bool((zeros == 2 ** (bits - 1)).all())
    scheme = QuantScheme(bits=bits, group_size=group, sym=sym)
    return QuantLinear.from_codes(codes.to(torch.uint8), scales.float(), zeros, scheme, bias)


def _gptq_layer(t: dict[str, torch.Tensor], out: int, inp: int, bits: int, group: int, sym: bool, offset: int, awq):
    scales = t["scales"].t()  # [out, G]
    groups = scales.shape[1]
    if awq:  # [in, out*b/32] along the output dimension, AWQ's interleave inside each 8 columns
        if bits != 4:
            raise SignRoundError(f"AWQ packing holds 4-bit codes only, this checkpoint says {bits}")
        order = torch.tensor(AWQ_ORDER)

        def unshuffle(x: torch.Tensor) -> torch.Tensor:
            rows, n = x.shape
            return x.reshape(rows, n // 8, 8)[:, :, order].reshape(rows, n)

        codes = unshuffle(unpack_bitstream(t["qweight"], bits, out)).t()
        zeros = unshuffle(unpack_bitstream(t["qzeros"], bits, out)).t()
    else:  # GPTQ: [in*b/32, out] along the input dimension
        codes = unpack_bitstream(t["qweight"].t().contiguous(), bits, inp)
        zeros = unpack_bitstream(t["qzeros"], bits, out).t()
    zeros = (zeros.to(torch.int64) + offset) & (2**bits - 1) if offset else zeros.to(torch.int64)
    g_idx = t.get("g_idx")
    g = inp if group == -1 else group
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(inp) // g):
        raise SignRoundError("this GPTQ checkpoint reorders its groups (desc_act); signround cannot read it")
    if groups != -(-inp // g):
        raise SignRoundError(f"scales have {groups} groups where group size {group} gives {-(-inp // g)}")
    return _layer(codes, scales, zeros, bits, group, sym, t.get("bias"))


def _ct_fp4_layer(t: dict[str, torch.Tensor], out: int, inp: int, args: dict[str, Any]):
    """An MXFP4 (uint8 E8M0 scales, block 32) or NVFP4 (e4m3 scales, block 16, global scale) layer."""
    packed = t["weight_packed"]
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(out, inp)
    nvfp4 = "weight_global_scale" in t
    scheme = QuantScheme(dtype="nvfp4" if nvfp4 else "mxfp4")
    if int(args.get("group_size") or 0) != scheme.group_size:
        raise ValueError(
            f"{scheme.dtype.value} needs group size {scheme.group_size}, config says {args.get('group_size')}"
        )
    layer = QuantLinear(inp, out, scheme, "bias" in t, torch.float32)
    layer.qweight.copy_(pack_int32(codes, 4))
    layer.scales.copy_(t["weight_scale"])
    if nvfp4:  # the reader divides by the global scale; signround multiplies by its reciprocal
        layer.tensor_scale.copy_(1.0 / t["weight_global_scale"].float().reshape(1))
    if "bias" in t:
        layer.bias.data.copy_(t["bias"])
    return layer


def _ct_fp8_layer(t: dict[str, torch.Tensor], out: int, inp: int, scales: torch.Tensor, group_size: int):
    """A ``float-quantized`` layer: float8_e4m3fn ``weight`` (our code bit patterns) and per-row scales."""
    if group_size != -1:
        raise ValueError(f"fp8 weights in groups of {group_size}; signround reads per-channel or per-tensor scales")
    layer = QuantLinear(inp, out, QuantScheme(dtype="fp8_e4m3", group_size=-1), "bias" in t, torch.float32)
    layer.qweight.copy_(pack_int32(t["weight"].view(torch.uint8), 8))
    layer.scales.copy_(scales.to(torch.float16))  # exact for signround's own files (float16 scales)
    if "bias" in t:
        layer.bias.data.copy_(t["bias"])
    return layer


def _ct_int_layer(t: dict[str, torch.Tensor], out: int, inp: int, scales: torch.Tensor, args: dict[str, Any]):
    """A ``pack-quantized`` (``weight_packed``) or ``int-quantized`` (int8 ``weight``) layer: signed values
    ``code - 2^(b-1)``, zero points (packed along the output dimension when the weight is) likewise."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    bits, sym = int(args["num_bits"]), bool(args.get("symmetric", True))
    group_size = int(args["group_size"]) if args.get("strategy") == "group" else -1
    packed = "weight_packed" in t
    if not packed and t["weight"].dtype != torch.int8:
        raise ValueError(f"weight of dtype {t['weight'].dtype} beside a weight_scale; expected int8 or float8_e4m3fn")
    signed = unpack_from_int32(t["weight_packed"], bits, torch.Size([out, inp])) if packed else t["weight"]
    off = 2 ** (bits - 1)
    zeros = torch.full(scales.shape, off, dtype=torch.int64)
    if "weight_zero_point" in t:
        zp = t["weight_zero_point"]
        if packed:
            zp = unpack_from_int32(zp, bits, torch.Size([out, scales.shape[1]]), packed_dim=0)
        zeros = zp.reshape(out, -1).expand(out, scales.shape[1]).to(torch.int64) + off
    return _layer(signed.to(torch.int64) + off, scales, zeros, bits, group_size, sym, t.get("bias"))


def _ct_layer(t: dict[str, torch.Tensor], out: int, inp: int, group: dict[str, Any]):
    """A compressed-tensors layer from its tensors ``t`` and config group (``weights``, ``input_activations``):
    ``pack-quantized`` (``weight_packed``), ``int-quantized`` (int8 ``weight``), ``float-quantized`` (float8
    ``weight``) or the FP4 layouts; per-tensor weight scales are spread over the rows, and quantized input
    activations become the layer's :class:`~signround.config.ActScheme` (with ``input_scale`` when static)."""
    args = group["weights"]
    if args.get("type") == "float" and int(args.get("num_bits", 0)) == 4:
        return _ct_fp4_layer(t, out, inp, args)
    s = t["weight_scale"]
    scales = s.reshape(1, 1).expand(out, 1).contiguous() if s.numel() == 1 else s.reshape(out, -1)
    if "weight_packed" not in t and t["weight"].dtype == torch.float8_e4m3fn:
        group_size = int(args["group_size"]) if args.get("strategy") == "group" else -1
        layer = _ct_fp8_layer(t, out, inp, scales, group_size)
    else:
        layer = _ct_int_layer(t, out, inp, scales, args)
    act = act_from_args(group.get("input_activations"))
    if act is not None:
        layer.set_act(act, t["input_scale"].float().reshape(1) if act.granularity.is_static else None)
    return layer


def _override(name: str, qc: dict[str, Any], base: dict[str, Any]) -> dict[str, Any] | None:
    """A layer's scheme after auto-round ``extra_config`` / GPTQModel ``dynamic`` overrides (None: float)."""
    scheme = dict(base)
    extra = qc.get("extra_config") or {}
    for key, value in extra.items():
        if key == name or re.search(key, name):
            scheme.update({k: value[k] for k in ("bits", "group_size", "sym") if k in value})
    for key, value in (qc.get("dynamic") or {}).items():
        sign, _, pattern = key.partition(":") if key[:2] in ("+:", "-:") else ("+", "", key)
        if re.match(pattern, name):
            if sign == "-":
                return None
            scheme.update({k: value[k] for k in ("bits", "group_size", "sym") if k in value})
    return None if scheme.get("bits", 16) >= 16 else scheme


def _ct_group(name: str, qc: dict[str, Any], module: nn.Module) -> dict[str, Any]:
    """The config group whose targets match layer ``name`` (exact name, class name, or ``re:`` match)."""
    for group in qc.get("config_groups", {}).values():
        for target in group.get("targets", []):
            hit = (
                target == name
                or target == type(module).__name__
                or (target.startswith("re:") and re.match(target[3:], name))
            )
            if hit:
                return group
    raise SignRoundError(f"{name} has packed weights but no config group targets it; the config is corrupt")


def replace_foreign_layers(
    model: nn.Module, qc: dict[str, Any], state: dict[str, torch.Tensor], model_type: str = ""
) -> None:
    """Swap every linear whose packed tensors are in ``state`` for a QuantLinear, popping those tensors.

    ``state`` is keyed by module-tree names (:func:`signround.export.moe_names.module_name` of the checkpoint's);
    compressed-tensors' targets and GPTQ's ``dynamic`` rules name modules as the checkpoint does, so a layer is
    matched against them by its serving name (``config.model_type`` ``model_type``: Mixtral's
    ``block_sparse_moe.experts.{e}.w1``); auto-round's ``extra_config`` names its module tree, as auto-round
    writes it."""
    method = qc.get("quant_method")
    packing = qc.get("packing_format", "")
    awq = "awq" in packing or method == "awq"
    if method == "gptq":
        offset = 0 if qc.get("checkpoint_format", "gptq") == "gptq_v2" else 1
    else:
        offset = 1 if "gptq" in packing else 0
    base = {k: qc[k] for k in ("bits", "group_size", "sym") if k in qc}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        keys = ("weight_packed", "weight_scale") if method == "compressed-tensors" else ("qweight",)
        if not any(f"{name}.{key}" in state for key in keys):
            continue
        t = {k[len(name) + 1 :]: state.pop(k) for k in [k for k in state if k.startswith(name + ".")]}
        out, inp = module.out_features, module.in_features
        served = name if method == "auto-round" else serving_name(model_type, name)
        try:
            if method == "compressed-tensors":
                layer = _ct_layer(t, out, inp, _ct_group(served, qc, module))
            else:
                s = _override(served, qc, base)
                if s is None:
                    raise SignRoundError(f"{served} has packed weights but its config keeps it in float")
                bits, group, sym = int(s["bits"]), int(s["group_size"]), bool(s.get("sym"))
                layer = _gptq_layer(t, out, inp, bits, group, sym, offset, awq)
        except (KeyError, RuntimeError, ValueError) as exc:
            why = f"{type(exc).__name__}: {exc}"
            raise SignRoundError(f"cannot decode {name} ({why}); the checkpoint is corrupt") from None
        parent_name, _, child = name.rpartition(".")
        if layer.bias is not None:
            layer.bias.data = layer.bias.data.to(module.weight.dtype)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        state.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})  # loaded with the rest
