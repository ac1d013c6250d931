"""The whole run's config: :class:`QuantConfig`, validated as a whole."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from signround.config.choices import Derivation, ExpertUnits, ExportFormat, Method, Rotation
from signround.config.named import named_scheme
from signround.config.recipes import Recipe, recipe_spec
from signround.config.scheme import (
    LayerRule,
    QuantScheme,
    parse_candidates,
    parse_layer_config,
    parse_serve_bits,
    resolve_scheme,
)
from signround.config.stages import ActScheme, CalibConfig, ExportConfig, MixedSpec, TuneConfig, auto_drop_outliers
from signround.errors import SignRoundError


@dataclass(frozen=True)
class QuantConfig:
    """Everything that decides what a run produces (recorded in the checkpoint), validated as a whole: an
    option combination that cannot go together is refused here, so the CLI and the Python API refuse the
    same things with the same message.

    Attributes:
        scheme: the default scheme of every quantized linear: a :class:`QuantScheme`, or a name of
            :data:`signround.config.named.SCHEMES` (``"W4A16"``, ``"W8A8"``...: its weights, and its activations
            when ``act`` is None).
        layer_rules: per-layer overrides, later ones winning: rules, or ``{regex: {"bits": 8}}`` (a dict, JSON
            text or a .json path; ``null`` keeps a layer float) parsed over ``scheme``.
        tune: how rounding is learned (its ``drop_outliers`` None becomes the scheme's default,
            :func:`~signround.config.stages.auto_drop_outliers`). calib: which calibration tokens.
        serve_bits: Double Rounding: lower widths the checkpoint also serves (``"6,4,3,2"`` or a sequence).
        act: quantize every quantized linear's input (fake-quant). smooth: with ``act``, fold searched
            per-channel smoothing scales into the norms / up_proj first.
        rotate: a :class:`Rotation` (a bool reads as FOLDED / NONE). FOLDED folds a seeded randomized-Hadamard
            rotation of the residual stream and of each attention head's values into the float weights before
            quantizing (:mod:`signround.model.rotate`; LLaMA-style models; the result is an ordinary model,
            every format writes it). ONLINE also rotates down_proj's input at run time (native format only).
            Off by default: measured in bench/results/rotation.md.
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
    rotate: Rotation = Rotation.NONE
    mixed: MixedSpec | None = None
    format_search: tuple[QuantScheme, ...] = ()
    export: ExportConfig = field(default_factory=ExportConfig)

    @classmethod
    def from_recipe(
        cls,
        recipe: Recipe | str | None,
        *,
        tune: TuneConfig | dict[str, Any] | None = None,
        calib: CalibConfig | dict[str, Any] | None = None,
        **fields: Any,
    ) -> QuantConfig:
        """The config of a named recipe (:mod:`signround.config.recipes`; None: the default one): its steps,
        batch and step size in ``tune``, its samples and length in ``calib``. A dict for ``tune`` / ``calib``
        overrides the recipe's fields (``tune={"seed": 1}``); a :class:`TuneConfig` / :class:`CalibConfig`
        replaces them whole. ``fields`` are the other fields (``scheme="W4A16"``...)."""
        spec = recipe_spec(recipe)
        if not isinstance(tune, TuneConfig):
            tune = TuneConfig(**{**spec.tune_fields(), **(tune or {})})
        if not isinstance(calib, CalibConfig):
            calib = CalibConfig(**{**spec.calib_fields(), **(calib or {})})
        return cls(tune=tune, calib=calib, **fields)

    def __post_init__(self) -> None:
        if isinstance(self.scheme, str):  # a named scheme: its weights, and its activations unless act is given
            named = named_scheme(self.scheme)
            object.__setattr__(self, "scheme", named.weights)
            if self.act is None:
                object.__setattr__(self, "act", named.act)
        scheme = resolve_scheme(self.scheme)
        object.__setattr__(self, "scheme", scheme)
        if self.tune.drop_outliers is None:  # the scheme's default (auto-round's rule: on below 4 bits)
            object.__setattr__(self, "tune", replace(self.tune, drop_outliers=auto_drop_outliers(scheme.bits)))
        if not (isinstance(self.layer_rules, tuple) and all(isinstance(r, LayerRule) for r in self.layer_rules)):
            object.__setattr__(self, "layer_rules", parse_layer_config(self.layer_rules, scheme))
        object.__setattr__(self, "serve_bits", parse_serve_bits(self.serve_bits, scheme))
        object.__setattr__(self, "rotate", Rotation.of(self.rotate))
        if self.smooth and self.act is None:
            raise SignRoundError("--smooth balances weights against quantized activations; add --act-bits")
        if self.tune.holdout and self.tune.iters and self.tune.holdout >= self.calib.nsamples:
            raise SignRoundError(
                f"--holdout {self.tune.holdout} must leave at least one of the {self.calib.nsamples} calibration "
                "samples to tune on; lower it or raise --nsamples"
            )
        if self.tune.derivation is not Derivation.SHIFT and not self.serve_bits:
            raise SignRoundError(
                f"--derivation {self.tune.derivation.value} says how --serve-bits widths are derived; add "
                "--serve-bits (e.g. 4,2) or drop it"
            )
        if self.tune.nested:  # serve_bits is already an integer grid's (parse_serve_bits)
            extra = [b for b in self.tune.nested if b not in self.serve_bits]
            if extra:
                raise SignRoundError(
                    f"nested tuning tunes the widths the checkpoint serves; add {','.join(map(str, extra))} to "
                    "--serve-bits"
                )
            if self.tune.holdout:
                raise SignRoundError("--holdout judges the stored width alone; drop it or --nested")
        if self.mixed is not None and self.serve_bits:
            raise SignRoundError(
                "--serve-bits derives one width for every layer; drop it or the mixed-precision options"
            )
        if self.mixed is not None and scheme.dtype.is_float:
            raise SignRoundError(f"mixed precision chooses integer widths; drop --data-type {scheme.dtype.value}")
        formats = self.export.formats
        if self.act is not None and not all(f.stores_activations for f in formats):
            others = [f.value for f in formats if not f.stores_activations]
            raise SignRoundError(
                f"{', '.join(others)} cannot store quantized activations; use --format native or "
                "compressed-tensors for a model quantized with --act-bits"
            )
        if self.rotate is Rotation.ONLINE and formats != (ExportFormat.NATIVE,):
            others = [f.value for f in formats if f is not ExportFormat.NATIVE]
            raise SignRoundError(
                f"--rotate online rotates down_proj's input at run time, which {', '.join(others)} readers do not "
                "apply; use --format native, or --rotate folded"
            )
        if self.mixed is not None and self.mixed.experts is ExpertUnits.EXPERT and formats != (ExportFormat.NATIVE,):
            others = [f.value for f in formats if f is not ExportFormat.NATIVE]
            raise SignRoundError(
                f"{', '.join(others)} store all experts of a layer in one scheme; use --format native with "
                "--expert-units expert, or drop --expert-units"
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
        """Whether the run needs calibration data: SignRound, the clipping search, static activation scales or
        smoothing."""
        static = self.act is not None and (self.act.granularity.is_static or self.smooth)
        return self.tune.iters > 0 or self.tune.method is Method.SEARCH or static
