"""Which compressed-tensors layout a layer's weight scheme and the run's activation scheme map to, and the
``QuantizationArgs`` fields that describe them; the exporter (:mod:`signround.export.ct`) writes the tensors.

What vLLM serves (its ``CompressedTensorsConfig._get_scheme_from_parts``), and so what is accepted here:

==========================  ==============================  ======================  =========================
weights                     input activations               ``format``              vLLM scheme
==========================  ==============================  ======================  =========================
int 2..8, any symmetry      none                            ``pack-quantized``      WNA16
int8 symmetric, per channel int8 per token / per tensor     ``int-quantized``       W8A8Int8
int4 symmetric, groups      int8 per token                  ``int-quantized``       W4A8Int (CPU kernels)
int4 symmetric, groups 128  fp8 e4m3 per token              ``pack-quantized``      W4A8Fp8 (Hopper only)
fp8 e4m3, per channel       none, fp8 per token / tensor    ``float-quantized``     W8A16Fp8 / W8A8Fp8
mxfp4 / nvfp4               none                            ``m/nvfp4-pack-quant.`` W4A16Fp4
==========================  ==============================  ======================  =========================

Activations are symmetric, 8-bit, with no zero point; per token means dynamic (a scale per token at run
time, nothing stored), per tensor means static (one calibrated ``input_scale [1]`` per layer). signround's
static *per-channel* scales and its 4-bit activations have no compressed-tensors reader and are refused, as is
everything else outside the table, each with a one-line reason and what to use instead.
"""

from __future__ import annotations

from typing import Any

from signround.config import ActGranularity, ActScheme, QuantScheme
from signround.errors import SignRoundError

PACK = "pack-quantized"
INT = "int-quantized"
FLOAT = "float-quantized"
FP4_FORMATS = {"mxfp4": "mxfp4-pack-quantized", "nvfp4": "nvfp4-pack-quantized"}


def check_act(act: ActScheme) -> None:
    """Refuse an activation scheme compressed-tensors (as vLLM reads it) cannot hold."""
    if act.bits != 8 or act.dtype.value not in ("int", "fp8_e4m3"):
        raise SignRoundError(
            f"compressed-tensors stores 8-bit activations (int8 or fp8_e4m3, per token or per tensor); {act.name} "
            "needs --format native"
        )
    if act.clip != 1.0:
        raise SignRoundError(
            f"compressed-tensors' readers scale each token by its own absmax; activations clipped at {act.clip:g} "
            "need --format native (or drop --act-clip)"
        )
    if act.granularity is ActGranularity.CHANNEL:
        raise SignRoundError(
            "compressed-tensors has no static per-channel activation scales; use --act-granularity tensor (one "
            "static scale per layer) or token (dynamic), or --format native"
        )


def ct_format(scheme: QuantScheme, act: ActScheme | None, name: str = "a layer") -> str:
    """The compressed-tensors ``format`` of a layer with weight ``scheme`` and input ``act`` (the module
    docstring's table); a one-line error naming ``name`` for a combination no reader serves."""
    dtype = scheme.dtype.value
    if dtype in FP4_FORMATS:
        if act is not None:
            raise SignRoundError(
                f"compressed-tensors stores {dtype} weights with 16-bit activations only; {name} has {act.name} "
                "(drop the activation options, or use --format native)"
            )
        return FP4_FORMATS[dtype]
    if dtype == "fp8_e4m3":
        if scheme.group_size != -1:
            raise SignRoundError(
                f"compressed-tensors stores fp8 weights with one scale per output channel; {name} has groups of "
                f"{scheme.group_size} (quantize with --group-size -1)"
            )
        if act is not None and act.dtype.value != "fp8_e4m3":
            raise SignRoundError(
                f"vLLM serves fp8 weights with fp8 activations; {name} has {act.name} (use --act-dtype fp8_e4m3)"
            )
        return FLOAT
    if dtype != "int":
        raise SignRoundError(
            f"compressed-tensors stores int, fp8_e4m3, mxfp4 and nvfp4 grids; {name} uses {dtype} (use --format native)"
        )
    if act is None:
        return PACK
    if not scheme.sym:
        raise SignRoundError(
            f"vLLM's W8A8 / W4A8 kernels take symmetric weights; {name} is asymmetric (quantize with --sym)"
        )
    if act.dtype.value == "fp8_e4m3":
        if scheme.bits != 4 or scheme.group_size != 128 or act.granularity is not ActGranularity.TOKEN:
            raise SignRoundError(
                f"with fp8 activations compressed-tensors serves int weights as W4A8 (4-bit, groups of 128, "
                f"per-token activations); {name} is {scheme.name} with {act.name}"
            )
        return PACK
    if scheme.bits == 8:
        if scheme.group_size != -1:
            raise SignRoundError(
                f"vLLM's int8 W8A8 kernels take one weight scale per output channel; {name} has groups of "
                f"{scheme.group_size} (quantize with --group-size -1)"
            )
        return INT
    if scheme.bits == 4:
        if act.granularity is not ActGranularity.TOKEN:
            raise SignRoundError(
                f"vLLM's int W4A8 kernels quantize activations per token; {name} has {act.name} (use "
                "--act-granularity token)"
            )
        return INT
    raise SignRoundError(
        f"with int8 activations compressed-tensors serves 8-bit (W8A8) or 4-bit (W4A8) int weights; {name} is "
        f"{scheme.bits}-bit"
    )


def weight_args(scheme: QuantScheme) -> dict[str, Any]:
    """``QuantizationArgs`` fields of an int or fp8 weight scheme (the FP4 grids use the library's presets)."""
    channel = scheme.group_size == -1
    return {
        "num_bits": scheme.bits,
        "type": "float" if scheme.dtype.value == "fp8_e4m3" else "int",
        "symmetric": scheme.sym,
        "strategy": "channel" if channel else "group",
        "group_size": None if channel else scheme.group_size,
    }


def input_args(act: ActScheme) -> dict[str, Any]:
    """``QuantizationArgs`` fields of the input activations: symmetric, dynamic per token or static per tensor."""
    dynamic = act.granularity is ActGranularity.TOKEN
    return {
        "num_bits": act.bits,
        "type": "int" if act.dtype.value == "int" else "float",
        "symmetric": True,
        "strategy": "token" if dynamic else "tensor",
        "dynamic": dynamic,
    }


def act_from_args(args: dict[str, Any] | None) -> ActScheme | None:
    """The :class:`ActScheme` of a checkpoint's ``input_activations`` (None: none); a one-line error for what
    signround cannot run (asymmetric, other widths, groups)."""
    if not args:
        return None
    kind, bits, strategy = args.get("type", "int"), int(args.get("num_bits", 8)), args.get("strategy", "token")
    dynamic = bool(args.get("dynamic", strategy == "token"))
    if not args.get("symmetric", True) or strategy not in ("token", "tensor") or dynamic != (strategy == "token"):
        raise SignRoundError(
            f"signround runs symmetric per-token (dynamic) or per-tensor (static) input activations; this "
            f"checkpoint has {kind} {strategy} {'dynamic' if dynamic else 'static'} "
            f"{'symmetric' if args.get('symmetric', True) else 'asymmetric'} ones"
        )
    dtype = "int" if kind == "int" else "fp8_e4m3" if bits == 8 else None
    if dtype is None:
        raise SignRoundError(f"signround cannot run {bits}-bit float input activations from a checkpoint")
    return ActScheme(bits=bits, dtype=dtype, granularity="token" if dynamic else "tensor")
