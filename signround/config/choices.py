"""Every string option of a run as an enum defined once: each accepts its value, and compares, hashes,
formats and JSON-encodes as it (so code and files written for the bare strings read it unchanged)."""

from __future__ import annotations

import enum
from typing import Any

from signround.errors import SignRoundError
from signround.formats.fp import E2M1, E4M3


class _Choice(str, enum.Enum):
    """A string option: equal to, hashed, JSON-encoded and formatted (``str()``, f-strings) as its value, so
    that code written for the bare strings it replaces reads it unchanged."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Method(_Choice):
    """How rounding is decided: learned (SignRound), round-to-nearest from the weights alone (RTN), or
    round-to-nearest after the calibrated clipping search and no steps (``search``, see
    :mod:`signround.tune.search`)."""

    SIGNROUND = "signround"
    RTN = "rtn"
    SEARCH = "search"


class Recipe(_Choice):
    """A named tuning budget: steps, samples, batch and step size (see :mod:`signround.config.recipes`)."""

    FAST = "fast"
    DEFAULT = "default"
    BEST = "best"


class Loss(_Choice):
    """The block-output error SignRound tunes against (see :attr:`TuneConfig.loss`)."""

    RELATIVE = "relative"
    MSE = "mse"


class Init(_Choice):
    """Where the clipping factors start (see :attr:`TuneConfig.init`)."""

    SEARCH = "search"
    NONE = "none"


class StarvedExperts(_Choice):
    """What an expert routed too few calibration tokens gets (see :attr:`TuneConfig.starved_experts`)."""

    OWN = "own"
    INIT = "init"
    BLOCK = "block"


class Routing(_Choice):
    """Which routing a mixture-of-experts block's student follows while tuned (see :attr:`TuneConfig.routing`)."""

    STUDENT = "student"
    TEACHER = "teacher"


class ExpertUnits(_Choice):
    """Which expert linears of a mixture of experts share one width in a mixed-precision allocation (see
    :attr:`MixedSpec.experts` and :mod:`signround.mixed.units`)."""

    LAYER = "layer"  # gate, up and down of all experts of a layer: what vLLM and GGUF can serve (default)
    EXPERT = "expert"  # per expert, gate+up and down: native format only


class ActDType(_Choice):
    """Number format of quantized activations (see :class:`ActScheme`)."""

    INT = "int"
    FP8_E4M3 = "fp8_e4m3"
    FP4_E2M1 = "fp4_e2m1"

    @property
    def implied_bits(self) -> int | None:
        """Bits fixed by the element format (None for ``int``, whose width is free)."""
        return {ActDType.INT: None, ActDType.FP8_E4M3: E4M3.bits, ActDType.FP4_E2M1: E2M1.bits}[self]


class ActGranularity(_Choice):
    """Which activations share a scale (see :class:`ActScheme`)."""

    TOKEN = "token"  # one scale per token, from its absmax at run time (dynamic)
    CHANNEL = "channel"  # one calibrated scale per input channel (static, ``input_scale [in]``)
    TENSOR = "tensor"  # one calibrated scale per layer (static, ``input_scale [1]``)

    @property
    def is_static(self) -> bool:
        """Scales calibrated once and stored (``input_scale``), not computed per token at run time."""
        return self is not ActGranularity.TOKEN


class Derivation(_Choice):
    """How a lower width's codes derive from the stored ones (Double Rounding,
    :mod:`signround.formats.double_rounding`), recorded as ``quantization_config.derivation``."""

    SHIFT = "shift"  # round(c / 2^(B-b)): the Double Rounding paper's; asymmetric grids lose their top codes
    RANGE = "range"  # round(c (2^b-1) / (2^B-1)) on asymmetric grids: the whole range kept (8 -> 4 -> 2 nests)


class Rotation(_Choice):
    """What ``--rotate`` folds into the float model (:mod:`signround.model.rotate`)."""

    NONE = "none"
    FOLDED = "folded"  # residual stream and values per head, all absorbed: an ordinary model, every format
    ONLINE = "online"  # also down_proj's input, rotated at run time: the native format only

    def __bool__(self) -> bool:  # ``if config.rotate:`` reads as "some rotation", as the bool it replaced
        return self is not Rotation.NONE

    @classmethod
    def of(cls, value: Any) -> Rotation:
        """A mode from a flag or config value: a bool (True is FOLDED), None (NONE), or a mode name."""
        if isinstance(value, bool) or value is None:
            return cls.FOLDED if value else cls.NONE
        try:
            return cls(value)
        except ValueError:
            raise SignRoundError(
                f"unknown rotation {value!r}; choose one of {', '.join(m.value for m in cls)}"
            ) from None


class Solver(_Choice):
    """How mixed precision solves for per-layer bits: exactly (scipy's HiGHS integer program) or greedily."""

    ILP = "ilp"
    GREEDY = "greedy"


class Sensitivity(_Choice):
    """How mixed precision measures a layer's sensitivity to its width (see :mod:`signround.mixed`)."""

    BLOCK = "block"
    BLOCK_MSE = "block-mse"
    FISHER = "fisher"


def _choice(kind: type[enum.Enum], value: Any, what: str) -> Any:
    """``kind(value)``, or a one-line error naming the choices."""
    try:
        return kind(value)
    except ValueError:
        raise SignRoundError(f"unknown {what} {value!r}; use {' or '.join(k.value for k in kind)}") from None


GGUF_PREFIX = "gguf:"
# The gguf K-quant types and mixes (the keys of signround.export.gguf_kquant's KQUANTS and MIXES, which a test
# holds equal): their files need per-layer types the plan adds before tuning.
GGUF_KQUANTS = ("q4_k", "q2_k", "q6_k", "q3_k")
GGUF_MIXES = ("q4_k_m",)  # gguf types whose layers mix two K-quant types (llama.cpp's Q4_K_M)


class ExportFormat(_Choice):
    """A checkpoint format a run is written in (``--format``); the key of the exporter registry
    (:mod:`signround.export`). Values are the names users type."""

    NATIVE = "native"
    AUTO_ROUND = "auto_round"
    GPTQ = "gptq"
    COMPRESSED_TENSORS = "compressed-tensors"
    GGUF_F16 = "gguf:f16"
    GGUF_Q8_0 = "gguf:q8_0"
    GGUF_Q4_0 = "gguf:q4_0"
    GGUF_Q4_1 = "gguf:q4_1"
    GGUF_Q4_K = "gguf:q4_k"
    GGUF_Q2_K = "gguf:q2_k"
    GGUF_Q6_K = "gguf:q6_k"
    GGUF_Q3_K = "gguf:q3_k"
    GGUF_Q4_K_M = "gguf:q4_k_m"
    GPT_OSS_MXFP4 = "gpt-oss-mxfp4"  # gpt-oss with MXFP4 experts, as its original checkpoints

    @property
    def is_gguf(self) -> bool:
        return self.value.startswith(GGUF_PREFIX)

    @property
    def gguf_type(self) -> str | None:
        """The GGUF type (``q4_k_m`` for ``gguf:q4_k_m``); None for the other formats."""
        return self.value[len(GGUF_PREFIX) :] if self.is_gguf else None

    @property
    def is_kquant(self) -> bool:
        """A GGUF K-quant type or mix (:mod:`signround.export.gguf_kquant`): the format changes the layer plan
        (``gguf_kquant.format_rules``: a mix's upgraded layers, and the fallback grid of rows that are not a
        multiple of 256 weights)."""
        return self.gguf_type in GGUF_KQUANTS or self.gguf_type in GGUF_MIXES

    @property
    def is_mix(self) -> bool:
        """A GGUF mix of two K-quant types (``gguf:q4_k_m``: Q4_K with some layers Q6_K)."""
        return self.gguf_type in GGUF_MIXES

    @property
    def stores_activations(self) -> bool:
        """Whether the format stores activation quantization (the native format any :class:`ActScheme`;
        compressed-tensors the schemes vLLM serves, checked by its exporter)."""
        return self in (ExportFormat.NATIVE, ExportFormat.COMPRESSED_TENSORS)

    @property
    def subfolder(self) -> str:
        """Folder name when several formats are written: ``gguf:q4_k_m`` -> ``gguf-q4_k_m``."""
        return self.value.replace(":", "-")
