"""Frozen, validated configuration for every stage of a run.

``QuantScheme`` says what a quantized weight is (bits, group size, symmetry); ``TuneConfig`` says how
the rounding is learned; ``CalibConfig`` says which calibration tokens are used. All are immutable and
validated at construction, so a bad value fails before any work starts.
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


class Method(str, enum.Enum):
    """How rounding is decided: learned (SignRound) or round-to-nearest."""

    SIGNROUND = "signround"
    RTN = "rtn"


class DType(str, enum.Enum):
    """Number format of a quantized weight; a key of the format registry."""

    INT = "int"


MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class QuantScheme:
    """How one linear layer's weight is quantized.

    Attributes:
        bits: integer width, 2..8.
        group_size: number of consecutive input-dimension weights sharing one scale (and zero point);
            -1 means one group per output channel (the whole row). A group size that does not divide
            the layer's input width gets a zero-padded last group (as auto-round does).
        sym: symmetric "full range" grid (the larger-magnitude extreme maps to -2^(bits-1)) when True,
            asymmetric min/max grid with an integer zero point when False.
        dtype: number format; only integers for now.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    dtype: DType = DType.INT

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise SignRoundError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {self.bits!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise SignRoundError(f"bits={self.bits} is out of range; use {MIN_BITS}..{MAX_BITS}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
            raise SignRoundError(f"group size must be an integer, got {self.group_size!r}")
        if self.group_size != -1 and self.group_size < 8:
            raise SignRoundError(
                f"group size {self.group_size} is not supported; use -1 (per channel) or 8 or more (e.g. 32, 64, 128)"
            )
        object.__setattr__(self, "dtype", DType(self.dtype))

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
        return f"W{self.bits}{g}-{'sym' if self.sym else 'asym'}"


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
            rules.append(LayerRule(pattern, QuantScheme.from_dict({**base.to_dict(), **value})))
        else:
            raise SignRoundError(f"--layer-config value for {pattern!r} must be an object or null")
    return tuple(rules)


@dataclass(frozen=True)
class TuneConfig:
    """How rounding and clipping are learned. Defaults are auto-round's.

    Attributes:
        method: ``signround`` (learned) or ``rtn`` (round to nearest, no tuning).
        iters: signed-gradient steps per block (0 means RTN).
        lr: step size of the rounding offsets; ``None`` means 1/iters.
        minmax_lr: step size of the clipping factors; ``None`` means ``lr``.
        batch_size: calibration samples per step.
        use_best: keep the parameters of the lowest-loss step (else the last).
        seed: seeds batch sampling.
        amp: run each tuning step's forward and backward under bfloat16 autocast (matmuls in bfloat16;
            weights, rounding parameters, targets and the loss stay float32), as auto-round's ``amp``.
    """

    method: Method = Method.SIGNROUND
    iters: int = 200
    lr: float | None = None
    minmax_lr: float | None = None
    batch_size: int = 8
    use_best: bool = True
    seed: int = 42
    amp: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", Method(self.method))
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


@dataclass(frozen=True)
class QuantConfig:
    """Everything that decides what a run produces (recorded in the checkpoint)."""

    scheme: QuantScheme = field(default_factory=QuantScheme)
    layer_rules: tuple[LayerRule, ...] = ()
    tune: TuneConfig = field(default_factory=TuneConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
