"""What a quantized weight is: :class:`QuantScheme`, the named presets, per-layer rules, and the parsing of
the options that derive schemes from a base one (``--serve-bits``, ``--format-search``)."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from signround.errors import SignRoundError
from signround.formats import DType, get_format

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
