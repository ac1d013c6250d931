"""Frozen, validated configuration for every stage of a run.

``QuantScheme`` says what a quantized weight is (bits, group size, symmetry); ``TuneConfig`` says how
the rounding is learned; ``CalibConfig`` says which calibration tokens are used. All are immutable and
validated at construction, so a bad value fails before any work starts.

``DType`` (the weight data types) is defined in :mod:`signround.formats.dtype` and re-exported here; what a
data type fixes (width, block size, symmetry) is its registered format's. The string options are enums
(:class:`Loss`, :class:`Init`, :class:`ActDType`, :class:`ActGranularity`) that accept their values and
compare, hash, format and JSON-encode as them.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from signround.errors import SignRoundError
from signround.formats import DType, get_format
from signround.formats.fp import E2M1, E4M3


class Method(str, enum.Enum):
    """How rounding is decided: learned (SignRound) or round-to-nearest."""

    SIGNROUND = "signround"
    RTN = "rtn"


class _Choice(str, enum.Enum):
    """A string option: equal to, hashed, JSON-encoded and formatted (``str()``, f-strings) as its value, so
    that code written for the bare strings it replaces reads it unchanged."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Loss(_Choice):
    """The block-output error SignRound tunes against (see :attr:`TuneConfig.loss`)."""

    RELATIVE = "relative"
    MSE = "mse"


class Init(_Choice):
    """Where the clipping factors start (see :attr:`TuneConfig.init`)."""

    SEARCH = "search"
    NONE = "none"


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

    TOKEN = "token"
    CHANNEL = "channel"


MIN_BITS, MAX_BITS = 2, 8
DEFAULT_BITS, DEFAULT_GROUP_SIZE = 4, 128


def _parse_dtype(value: Any) -> DType:
    try:
        return DType(value)
    except ValueError:
        choices = ", ".join(d.value for d in DType)
        raise SignRoundError(f"unknown weight dtype {value!r}; choose one of {choices}") from None


def _resolve_bits(dtype: DType, bits: Any) -> int:
    implied = get_format(dtype).implied_bits
    if bits is None:
        return implied if implied is not None else DEFAULT_BITS
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise SignRoundError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    if implied is not None and bits != implied:
        raise SignRoundError(
            f"{dtype.value} has {implied} bits per weight, not {bits}; drop --bits or use --bits {implied}"
        )
    if not MIN_BITS <= bits <= MAX_BITS:
        raise SignRoundError(f"bits={bits} is out of range; use {MIN_BITS}..{MAX_BITS}")
    return bits


def _resolve_group_size(dtype: DType, group_size: Any) -> int:
    fixed = get_format(dtype).fixed_group_size
    if group_size is None:
        return fixed if fixed is not None else DEFAULT_GROUP_SIZE
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise SignRoundError(f"group size must be an integer, got {group_size!r}")
    if fixed is not None and group_size != fixed:
        raise SignRoundError(
            f"{dtype.value} uses blocks of {fixed} weights, not {group_size}; "
            f"drop --group-size or use --group-size {fixed}"
        )
    if group_size != -1 and group_size < 8:
        raise SignRoundError(
            f"group size {group_size} is not supported; use -1 (per channel) or 8 or more (e.g. 32, 64, 128)"
        )
    return group_size


def _resolve_sym(dtype: DType, sym: Any) -> bool:
    fixed = get_format(dtype).fixed_sym
    if sym is None:
        return False if fixed is None else fixed  # a free grid is asymmetric by default
    if not isinstance(sym, bool):
        raise SignRoundError(f"sym must be true or false, got {sym!r}")
    if fixed is not None and sym != fixed:
        # every format that fixes its grid fixes sym=True, so the refused value is false
        raise SignRoundError(f"{dtype.value} fixes its own grid (no symmetric/asymmetric choice); drop sym=false")
    return sym


@dataclass(frozen=True)
class QuantScheme:
    """How one linear layer's weight is quantized.

    ``None`` fields are filled at construction from ``dtype`` (so after construction every field is set):
    ``QuantScheme()`` is W4G128 asymmetric int, ``QuantScheme(dtype="fp8_e4m3")`` is 8-bit, group 128,
    symmetric, ``QuantScheme(dtype="mxfp4")`` is 4-bit, group 32, symmetric.

    Attributes:
        bits: integer width, 2..8 (default 4) for ``int``; implied by a floating-point dtype (fp4 = 4,
            fp6 = 6, fp8 = 8), where another value is an error.
        group_size: number of consecutive input-dimension weights sharing one scale (and zero point);
            -1 means one group per output channel (the whole row). A group size that does not divide
            the layer's input width gets a zero-padded last group (as auto-round does). Default 128;
            fixed by ``mxfp4`` (32) and ``nvfp4`` (16), where another value is an error.
        sym: symmetric "full range" integer grid (the larger-magnitude extreme maps to -2^(bits-1)) when
            True, asymmetric min/max grid with an integer zero point when False (the default for ``int``).
            Floating-point grids are sign-magnitude: always True, and False is an error.
        dtype: number format (see :class:`DType`).
    """

    bits: int | None = None
    group_size: int | None = None
    sym: bool | None = None
    dtype: DType = DType.INT

    def __post_init__(self) -> None:
        dtype = _parse_dtype(self.dtype)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "bits", _resolve_bits(dtype, self.bits))
        object.__setattr__(self, "group_size", _resolve_group_size(dtype, self.group_size))
        object.__setattr__(self, "sym", _resolve_sym(dtype, self.sym))

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym, "dtype": self.dtype.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantScheme:
        unknown = set(data) - {"bits", "group_size", "sym", "dtype"}
        if unknown:
            raise SignRoundError(f"unknown scheme field(s) {sorted(unknown)}; use bits, group_size, sym, dtype")
        return cls(**data)

    def replace(self, **changes: Any) -> QuantScheme:
        return dataclasses.replace(self, **changes)

    @property
    def name(self) -> str:
        g = "C" if self.group_size == -1 else f"G{self.group_size}"
        if self.dtype.is_float:
            return f"W{self.bits}{g}-{self.dtype.value}"
        return f"W{self.bits}{g}-{'sym' if self.sym else 'asym'}"


# Named weight-only schemes (auto-round's and llm-compressor's names): ``QuantConfig(scheme=W4A16)`` or
# ``QuantConfig(scheme="W4A16")``.
W4A16 = QuantScheme(bits=4, group_size=128, sym=True)
W3A16 = QuantScheme(bits=3, group_size=128, sym=True)
W2A16 = QuantScheme(bits=2, group_size=128, sym=True)
W2A16G64 = QuantScheme(bits=2, group_size=64, sym=True)
W8A16 = QuantScheme(bits=8, group_size=128, sym=True)
PRESETS: dict[str, QuantScheme] = {
    "W4A16": W4A16,
    "W3A16": W3A16,
    "W2A16": W2A16,
    "W2A16G64": W2A16G64,
    "W8A16": W8A16,
}


def resolve_scheme(value: QuantScheme | str | None) -> QuantScheme:
    """A scheme, a preset name from :data:`PRESETS`, or None (W4G128 asymmetric)."""
    if value is None:
        return QuantScheme()
    if isinstance(value, str):
        if value not in PRESETS:
            raise SignRoundError(f"unknown preset {value!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[value]
    if not isinstance(value, QuantScheme):
        raise SignRoundError(f"scheme must be a QuantScheme or a preset name, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class LayerRule:
    """A per-layer override: layers whose qualified name matches ``pattern`` (a regex, searched) get
    ``scheme``; ``scheme=None`` keeps them in full precision."""

    pattern: str
    scheme: QuantScheme | None

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise SignRoundError(f"layer pattern {self.pattern!r} is not a valid regex: {exc}") from None


def parse_layer_config(spec: str | dict[str, Any] | None, base: QuantScheme) -> tuple[LayerRule, ...]:
    """Turn ``{"pattern": {"bits": 8}}`` (a dict, a JSON string or a JSON file path) into rules.

    Each value is a partial scheme applied on top of ``base``; the value ``null`` or
    ``{"bits": 16}`` keeps matching layers in full precision.
    """
    if spec is None or spec == "":
        return ()
    data: Any = spec
    if isinstance(spec, str):
        path = Path(spec)
        text = path.read_text() if path.suffix == ".json" and path.is_file() else spec
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SignRoundError(f"--layer-config is neither a JSON object nor a .json file: {exc.msg}") from None
    if not isinstance(data, dict):
        raise SignRoundError('--layer-config must be a JSON object like {"mlp.down_proj": {"bits": 8}}')
    rules = []
    for pattern, value in data.items():
        if value is None or (isinstance(value, dict) and value.get("bits") in (16, 32)):
            rules.append(LayerRule(pattern, None))
        elif isinstance(value, dict):
            rules.append(LayerRule(pattern, QuantScheme.from_dict({**_inherited(base, value), **value})))
        else:
            raise SignRoundError(f"--layer-config value for {pattern!r} must be an object or null")
    return tuple(rules)


def _inherited(base: QuantScheme, override: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``base`` a per-layer override keeps. An override that changes the dtype keeps only
    the group size (when the new dtype does not fix it): bits and symmetry follow from the new dtype."""
    if "dtype" not in override or _parse_dtype(override["dtype"]) is base.dtype:
        return base.to_dict()
    if get_format(_parse_dtype(override["dtype"])).fixed_group_size is not None:
        return {}
    return {"group_size": base.group_size}


@dataclass(frozen=True)
class ActScheme:
    """How the input of every quantized linear is quantized (fake-quant; see :mod:`signround.act.quant`).

    Attributes:
        bits: 2..8 for ``int`` (default 8); implied by ``fp8_e4m3`` (8) and ``fp4_e2m1`` (4).
        dtype: ``int`` (symmetric, restricted range), ``fp8_e4m3`` or ``fp4_e2m1`` (an :class:`ActDType`;
            its value is accepted and converted).
        granularity: ``token`` (one scale per token from its absmax, at run time) or ``channel`` (one static
            scale per input channel, calibrated from the calibration data and stored as ``input_scale``); an
            :class:`ActGranularity` or its value.
    """

    bits: int | None = None
    dtype: ActDType = ActDType.INT
    granularity: ActGranularity = ActGranularity.TOKEN

    def __post_init__(self) -> None:
        try:
            dtype = ActDType(self.dtype)
        except ValueError:
            choices = [d.value for d in ActDType]
            raise SignRoundError(f"unknown activation dtype {self.dtype!r}; choose one of {choices}") from None
        implied = dtype.implied_bits
        bits = self.bits if self.bits is not None else (implied or 8)
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise SignRoundError(f"activation bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
        if implied is not None and bits != implied:
            raise SignRoundError(f"{dtype.value} activations are {implied}-bit; use --act-bits {implied} or drop it")
        try:
            granularity = ActGranularity(self.granularity)
        except ValueError:
            raise SignRoundError(f"activation granularity must be token or channel, got {self.granularity!r}") from None
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "granularity", granularity)
        object.__setattr__(self, "bits", bits)

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "dtype": self.dtype.value, "granularity": self.granularity.value}

    @property
    def name(self) -> str:
        return f"A{self.bits}-{self.dtype.value}-{self.granularity.value}"


# The values, for argparse's choices
LOSSES = tuple(m.value for m in Loss)
INITS = tuple(m.value for m in Init)


@dataclass(frozen=True)
class TuneConfig:
    """How rounding and clipping are learned. Defaults are auto-round's.

    Attributes:
        method: ``signround`` (learned) or ``rtn`` (round to nearest, no tuning).
        iters: signed-gradient steps per block (0 means RTN).
        lr: step size of the rounding offsets; ``None`` means 1/iters.
        minmax_lr: step size of the clipping factors; ``None`` means ``lr``.
        batch_size: calibration samples per step.
        use_best: keep the parameters of the step with the lowest batch loss (auto-round's rule; default),
            else the last step's (no copy of the tuned tensors is taken then). Neither wins consistently on
            perplexity: the last step scores lower on the whole calibration set in every block measured, yet
            the model's perplexity was better with it at 50 iterations and worse at 200 (bench/results/NOTES.md).
        seed: seeds batch sampling.
        amp: run each tuning step's forward and backward under bfloat16 autocast (matmuls in bfloat16;
            weights, rounding parameters, targets and the loss stay float32), as auto-round's ``amp``.
        quant_inputs: tune each block on the quantized model's inputs (the default; auto-round's
            ``enable_quanted_input``), else on the float model's, which makes blocks independent of each
            other (``--fp-inputs``; required by block-parallel tuning).
        loss: the block-output error tuned against. ``relative`` (default): per token, the mean squared
            error over the hidden dimension divided by the float output's mean square, averaged over tokens,
            so that the few tokens with massive activations (the attention-sink position) do not outweigh
            all others; ``mse``: the plain mean squared error of the paper and auto-round
            (bench/results/NOTES.md has the measurements behind the default).
        init: where the clipping factors start. ``search`` (default): per group, the shrink ratio of the
            extremes (1.0 down to 0.5) with the least weight error weighted by the inputs' mean square,
            measured on the calibration inputs (llama.cpp's imatrix idea, :mod:`signround.tune.init`);
            ``none``: unclipped (factors 1), as auto-round.
        torch_compile: run the tuning steps' integer-grid quantize-dequantize (``--data-type int``, the
            default; the other data types stay eager) through ``torch.compile`` (one fused loop
            for its forward and one for its backward instead of about 20 passes over each weight; about 20 s
            of compilation once per process, a C++ compiler on the CPU); the forward's values are the
            eager ones bit for bit, the clipping gradients' group sums may differ in the last bits, so a run
            may tune to a slightly different result. Off by default: on a 2-core CPU the steps ran 4-9%
            faster, a whole run took 0.92 of the eager time at 50 iterations and 1.05 at 200, within the
            machine's drift (bench/results/NOTES.md). auto-round's
            ``enable_torch_compile`` compiles more: its block forward as well.
    """

    method: Method = Method.SIGNROUND
    iters: int = 200
    lr: float | None = None
    minmax_lr: float | None = None
    batch_size: int = 8
    use_best: bool = True
    seed: int = 42
    amp: bool = False
    quant_inputs: bool = True
    loss: Loss = Loss.RELATIVE
    init: Init = Init.SEARCH
    torch_compile: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", Method(self.method))
        try:
            object.__setattr__(self, "loss", Loss(self.loss))
        except ValueError:
            raise SignRoundError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}") from None
        try:
            object.__setattr__(self, "init", Init(self.init))
        except ValueError:
            raise SignRoundError(f"init must be one of {', '.join(INITS)}, got {self.init!r}") from None
        if self.iters < 0:
            raise SignRoundError(f"iters must be >= 0, got {self.iters}")
        if self.method is Method.RTN:
            object.__setattr__(self, "iters", 0)
        if self.batch_size < 1:
            raise SignRoundError(f"batch size must be >= 1, got {self.batch_size}")
        for name in ("lr", "minmax_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise SignRoundError(f"{name} must be > 0, got {value}")

    @property
    def effective_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1.0 / max(self.iters, 1)

    @property
    def effective_minmax_lr(self) -> float:
        return self.minmax_lr if self.minmax_lr is not None else self.effective_lr


@dataclass(frozen=True)
class CalibConfig:
    """Which calibration tokens are used.

    Attributes:
        dataset: a local .txt/.jsonl/.parquet path, an HF dataset name, or None for data-free
            calibration (the model generates its own text).
        nsamples: number of sequences.
        seqlen: tokens per sequence.
        seed: seeds shuffling and generation.
    """

    dataset: str | None = None
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 42

    def __post_init__(self) -> None:
        if self.nsamples < 1:
            raise SignRoundError(f"nsamples must be >= 1, got {self.nsamples}")
        if self.seqlen < 8:
            raise SignRoundError(f"seqlen must be >= 8, got {self.seqlen}")


class Solver(str, enum.Enum):
    """How mixed precision solves for per-layer bits: exactly (scipy's HiGHS integer program) or greedily."""

    ILP = "ilp"
    GREEDY = "greedy"


class Sensitivity(str, enum.Enum):
    """How mixed precision measures a layer's sensitivity to its width (see :mod:`signround.mixed`)."""

    BLOCK = "block"
    BLOCK_MSE = "block-mse"
    FISHER = "fisher"


@dataclass(frozen=True)
class MixedSpec:
    """What a mixed-precision allocation aims for.

    Attributes:
        bit_options: the widths a layer may take (2..8).
        avg_bits: average bits per quantized weight, scale and zero overhead included; or
        target_bytes: the size of the whole checkpoint (float parts at 16 bits per value).
        solver: ``ilp`` (exact, scipy's HiGHS) or ``greedy``.
        sensitivity: ``block`` (measured block-output error weighted by the loss gradient, default),
            ``block-mse`` (unweighted block-output error) or ``fisher`` (weight-space proxy).
        nsamples: calibration sequences used to measure sensitivities.
    """

    bit_options: tuple[int, ...] = (2, 3, 4, 8)
    avg_bits: float | None = None
    target_bytes: int | None = None
    solver: Solver = Solver.ILP
    sensitivity: Sensitivity = Sensitivity.BLOCK
    nsamples: int = 32

    def __post_init__(self) -> None:
        opts = tuple(sorted(set(int(b) for b in self.bit_options)))
        if not opts:
            raise SignRoundError("--bit-options is empty; give widths like 2,3,4,8")
        for b in opts:
            QuantScheme(bits=b)  # validates the range
        object.__setattr__(self, "bit_options", opts)
        if (self.avg_bits is None) == (self.target_bytes is None):
            raise SignRoundError("give exactly one of --avg-bits and --target-size")
        object.__setattr__(self, "solver", _choice(Solver, self.solver, "allocation solver"))
        object.__setattr__(self, "sensitivity", _choice(Sensitivity, self.sensitivity, "sensitivity"))
        if self.nsamples < 1:
            raise SignRoundError(f"sensitivity nsamples must be >= 1, got {self.nsamples}")


def _choice(kind: type[enum.Enum], value: Any, what: str) -> Any:
    """``kind(value)``, or a one-line error naming the choices."""
    try:
        return kind(value)
    except ValueError:
        raise SignRoundError(f"unknown {what} {value!r}; use {' or '.join(k.value for k in kind)}") from None


GGUF_MIXES = ("q4_k_m",)  # gguf types whose layers mix K-quant types (llama.cpp's Q4_K_M)
GGUF_KQUANTS = ("q4_k", "q2_k", "q6_k", "q3_k")


class ExportFormat(str, enum.Enum):
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

    @property
    def gguf_type(self) -> str | None:
        """``gguf:q4_k_m`` -> ``q4_k_m``; None for the other formats."""
        return self.value[len("gguf:") :] if self.value.startswith("gguf:") else None

    @property
    def gguf_mix(self) -> str | None:
        """The gguf type, when the file's layer types follow from the type itself (K-quants need fallbacks for
        rows that are not a multiple of 256; mixes upgrade some layers): the plan adds those rules."""
        qtype = self.gguf_type
        return qtype if qtype in GGUF_KQUANTS or qtype in GGUF_MIXES else None

    @property
    def subfolder(self) -> str:
        """Folder name when several formats are written: ``gguf:q4_k_m`` -> ``gguf-q4_k_m``."""
        return self.value.replace(":", "-")


def parse_formats(spec: Any) -> tuple[ExportFormat, ...]:
    """``"native,auto_round"`` (or a sequence of names) -> formats; unknown or repeated names are refused."""
    names = (
        [f.strip() for f in spec.split(",")] if isinstance(spec, str) else [str(getattr(f, "value", f)) for f in spec]
    )
    names = [n for n in names if n]
    choices = ", ".join(sorted(f.value for f in ExportFormat))
    if not names:
        raise SignRoundError(f"--format is empty; choose from {choices}")
    for n in names:
        if n not in {f.value for f in ExportFormat}:
            raise SignRoundError(f"unknown format {n!r}; choose from {choices}")
    if len(set(names)) != len(names):
        raise SignRoundError(f"--format lists a format twice: {','.join(names)}")
    return tuple(ExportFormat(n) for n in names)


@dataclass(frozen=True)
class ExportConfig:
    """The formats a run is written in (checked before tuning) and their options.

    Attributes:
        formats: ``"native,gguf:q4_0"``, a sequence of names or :class:`ExportFormat` values.
        allow_partial_groups: compressed-tensors: write groups that do not divide a layer's width (stock
            readers cannot run them).
    """

    formats: tuple[ExportFormat, ...] = (ExportFormat.NATIVE,)
    allow_partial_groups: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", parse_formats(self.formats))


@dataclass(frozen=True)
class QuantConfig:
    """Everything that decides what a run produces (recorded in the checkpoint), validated as a whole: an
    option combination that cannot go together is refused here, so the CLI and the Python API refuse the
    same things with the same message.

    Attributes:
        scheme: the default scheme of every quantized linear (a :class:`QuantScheme` or a preset name).
        layer_rules: per-layer overrides, later ones winning: rules, or ``{regex: {"bits": 8}}`` (a dict, JSON
            text or a .json path; ``null`` keeps a layer float) parsed over ``scheme``.
        tune: how rounding is learned. calib: which calibration tokens.
        serve_bits: Double Rounding: lower widths the checkpoint also serves (``"6,4,3,2"`` or a sequence).
        act: quantize every quantized linear's input (fake-quant). smooth: with ``act``, fold searched
            per-channel smoothing scales into the norms / up_proj first.
        mixed: choose each layer's bits for a size budget (:class:`MixedSpec`); ``scheme`` then gives the
            group size and symmetry.
        format_search: per layer, the grid of least activation-weighted error among these data types of one
            width (``"fp4_e2m1,fp4_e1m2"`` or a sequence; parsed into schemes over ``scheme``).
        export: the formats the run is written in (:class:`ExportConfig`); their layer mixes and checks are
            part of the plan.
    """

    scheme: QuantScheme = field(default_factory=QuantScheme)
    layer_rules: tuple[LayerRule, ...] = ()
    tune: TuneConfig = field(default_factory=TuneConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    serve_bits: tuple[int, ...] = ()
    act: ActScheme | None = None
    smooth: bool = False
    mixed: MixedSpec | None = None
    format_search: tuple[QuantScheme, ...] = ()
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        scheme = resolve_scheme(self.scheme)
        object.__setattr__(self, "scheme", scheme)
        if not (isinstance(self.layer_rules, tuple) and all(isinstance(r, LayerRule) for r in self.layer_rules)):
            object.__setattr__(self, "layer_rules", parse_layer_config(self.layer_rules, scheme))
        object.__setattr__(self, "serve_bits", parse_serve_bits(self.serve_bits, scheme))
        if self.smooth and self.act is None:
            raise SignRoundError("--smooth balances weights against quantized activations; add --act-bits")
        if self.mixed is not None and self.serve_bits:
            raise SignRoundError(
                "--serve-bits derives one width for every layer; drop it or the mixed-precision options"
            )
        if self.mixed is not None and scheme.dtype.is_float:
            raise SignRoundError(f"mixed precision chooses integer widths; drop --data-type {scheme.dtype.value}")
        formats = self.export.formats
        if self.act is not None and formats != (ExportFormat.NATIVE,):
            others = [f.value for f in formats if f is not ExportFormat.NATIVE]
            raise SignRoundError(
                f"{', '.join(others)} cannot store quantized activations; use --format native for a model "
                "quantized with --act-bits"
            )
        if self.mixed is not None and any(f.gguf_type for f in formats):
            raise SignRoundError(
                "gguf formats store one width for every layer; drop gguf from --format for a mixed-precision run "
                "(auto_round, gptq, compressed-tensors and native keep per-layer bits)"
            )
        if self.format_search is not None and self.format_search != ():
            object.__setattr__(self, "format_search", parse_candidates(self.format_search, scheme))
            if self.mixed is not None or self.serve_bits:
                raise SignRoundError(
                    "--format-search chooses the grid per layer; drop --avg-bits/--target-size/--serve-bits"
                )
        else:
            object.__setattr__(self, "format_search", ())

    @property
    def needs_calibration(self) -> bool:
        """Whether the run needs calibration data: SignRound, static activation scales or smoothing."""
        static = self.act is not None and (self.act.granularity is ActGranularity.CHANNEL or self.smooth)
        return self.tune.iters > 0 or static


def parse_candidates(value: Any, base: QuantScheme) -> tuple[QuantScheme, ...]:
    """``"fp4_e2m1,fp4_e1m2"`` (or a sequence of names or schemes) -> schemes of one width (``base``'s group
    size unless the format fixes one, ``base``'s symmetry for ``int``).

    Raises:
        SignRoundError: fewer than two candidates, an unknown name, or mixed widths.
    """
    if isinstance(value, str):
        items: list[Any] = [n.strip() for n in value.split(",") if n.strip()]
    else:
        items = [v for v in value if not isinstance(v, str) or v.strip()]
    if len(items) < 2:
        raise SignRoundError(f"--format-search needs at least two data types, e.g. fp4_e2m1,fp4_e1m2; got {value!r}")
    schemes = []
    for item in items:
        if isinstance(item, QuantScheme):
            schemes.append(item)
            continue
        name = str(getattr(item, "value", item)).strip()
        if name not in {d.value for d in DType}:
            raise SignRoundError(
                f"unknown data type {name!r} in --format-search; choose from {[d.value for d in DType]}"
            )
        dtype = DType(name)
        bits = dtype.implied_bits or base.bits
        group = dtype.fixed_group_size or base.group_size
        sym = True if dtype.is_float else base.sym
        schemes.append(QuantScheme(bits=bits, group_size=group, sym=sym, dtype=dtype))
    widths = {s.bits for s in schemes}
    if len(widths) > 1:
        raise SignRoundError(f"--format-search compares grids of one width; got {sorted(widths)} bits")
    return tuple(schemes)


def parse_serve_bits(value: Any, scheme: QuantScheme) -> tuple[int, ...]:
    """Double Rounding's lower precisions (``"6,4,3,2"`` or a sequence) -> a sorted tuple, each in
    ``2..scheme.bits - 1``; only integer grids derive lower widths (see :mod:`signround.pack.derive`)."""
    if value is None or value == "" or value == ():
        return ()
    try:
        items = [int(b) for b in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        raise SignRoundError(f"--serve-bits takes widths like 6,4,3,2, got {value!r}") from None
    if scheme.dtype is not DType.INT:
        raise SignRoundError(
            f"--serve-bits derives integer grids; drop it or use --data-type int, not {scheme.dtype.value}"
        )
    bad = [b for b in items if not 2 <= b < scheme.bits]
    if bad:
        raise SignRoundError(f"--serve-bits must be below --bits {scheme.bits} and at least 2, got {bad}")
    return tuple(sorted(set(items), reverse=True))
