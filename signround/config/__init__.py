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

from signround.config.choices import (
    GGUF_KQUANTS,
    GGUF_MIXES,
    ActDType,
    ActGranularity,
    Derivation,
    ExpertUnits,
    ExportFormat,
    Init,
    Loss,
    Method,
    Recipe,
    Rotation,
    Routing,
    Sensitivity,
    Solver,
    StarvedExperts,
)
from signround.config.implied import implied_scheme
from signround.config.named import SCHEMES, NamedScheme, named_scheme
from signround.config.quant import QuantConfig
from signround.config.recipes import RECIPES, RecipeSpec, fill_from_recipe, recipe_spec
from signround.config.scheme import (
    DEFAULT_BITS,
    DEFAULT_GROUP_SIZE,
    MAX_BITS,
    MIN_BITS,
    PRESETS,
    W2A16,
    W2A16G64,
    W3A16,
    W4A16,
    W8A16,
    LayerRule,
    QuantScheme,
    parse_candidates,
    parse_layer_config,
    parse_serve_bits,
    resolve_scheme,
)
from signround.config.stages import ActScheme, CalibConfig, ExportConfig, MixedSpec, TuneConfig, parse_formats
from signround.formats import DType

__all__ = [
    "DEFAULT_BITS",
    "DEFAULT_GROUP_SIZE",
    "GGUF_KQUANTS",
    "GGUF_MIXES",
    "MAX_BITS",
    "MIN_BITS",
    "PRESETS",
    "W2A16",
    "W2A16G64",
    "W3A16",
    "W4A16",
    "W8A16",
    "ActDType",
    "ActGranularity",
    "ActScheme",
    "CalibConfig",
    "DType",
    "ExpertUnits",
    "ExportConfig",
    "ExportFormat",
    "Init",
    "StarvedExperts",
    "Routing",
    "LayerRule",
    "Loss",
    "Method",
    "MixedSpec",
    "QuantConfig",
    "QuantScheme",
    "RECIPES",
    "Recipe",
    "RecipeSpec",
    "fill_from_recipe",
    "recipe_spec",
    "Sensitivity",
    "Derivation",
    "Rotation",
    "Solver",
    "TuneConfig",
    "parse_candidates",
    "parse_formats",
    "implied_scheme",
    "SCHEMES",
    "NamedScheme",
    "named_scheme",
    "parse_layer_config",
    "parse_serve_bits",
    "resolve_scheme",
]
