"""How each stage runs: activations (:class:`ActScheme`), tuning (:class:`TuneConfig`), calibration
(:class:`CalibConfig`), mixed precision (:class:`MixedSpec`) and export (:class:`ExportConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from signround.config.choices import (
    ActDType,
    ActGranularity,
    Derivation,
    ExpertUnits,
    ExportFormat,
    Init,
    Loss,
    Method,
    Routing,
    Sensitivity,
    Solver,
    StarvedExperts,
    _choice,
)
from signround.config.scheme import MAX_BITS, MIN_BITS, QuantScheme
from signround.errors import SignRoundError


@dataclass(frozen=True)
class ActScheme:
    """How the input of every quantized linear is quantized (fake-quant; see :mod:`signround.act.quant`).

    Attributes:
        bits: 2..8 for ``int`` (default 8); implied by ``fp8_e4m3`` (8) and ``fp4_e2m1`` (4).
        dtype: ``int`` (symmetric, restricted range), ``fp8_e4m3`` or ``fp4_e2m1`` (an :class:`ActDType`;
            its value is accepted and converted).
        granularity: ``token`` (one scale per token from its absmax, at run time), ``channel`` (one static
            scale per input channel, calibrated from the calibration data and stored as ``input_scale [in]``)
            or ``tensor`` (one static scale per layer, calibrated the same way, ``input_scale [1]``: what
            compressed-tensors and vLLM call static activations); an :class:`ActGranularity` or its value.
        clip: per-token clip ratio in (0, 1] (``token`` granularity only): each token's scale is ``clip`` times
            its absmax over the grid max, so the largest values saturate and the rest get a finer step (QuaRot's
            activation clipping, 0.9). 1.0 (default) is the plain absmax scale that vLLM's dynamic kernels use;
            a checkpoint with another ratio is served by the native format only. Static scales search their
            clip ratio per layer instead (:mod:`signround.act.calibrate`).
    """

    bits: int | None = None
    dtype: ActDType = ActDType.INT
    granularity: ActGranularity = ActGranularity.TOKEN
    clip: float = 1.0

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
            choices = ", ".join(g.value for g in ActGranularity)
            raise SignRoundError(f"activation granularity must be one of {choices}, got {self.granularity!r}") from None
        clip = self.clip
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0.0 < clip <= 1.0:
            raise SignRoundError(f"the activation clip ratio must be a number in (0, 1], got {clip!r}")
        if clip != 1.0 and granularity is not ActGranularity.TOKEN:
            raise SignRoundError(
                f"--act-clip applies to per-token activations; {granularity.value} scales search their clip ratio "
                "per layer (drop --act-clip)"
            )
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "granularity", granularity)
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "clip", float(clip))

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's ``activations`` record; ``clip`` only where it is not 1 (older readers ignore it)."""
        out: dict[str, Any] = {"bits": self.bits, "dtype": self.dtype.value, "granularity": self.granularity.value}
        return {**out, "clip": self.clip} if self.clip != 1.0 else out

    @property
    def name(self) -> str:
        clip = f"-clip{self.clip:g}" if self.clip != 1.0 else ""
        return f"A{self.bits}-{self.dtype.value}-{self.granularity.value}{clip}"


# The values, for argparse's choices
# auto-round's outlier-suppressed loss (its enable_alg_ext path) leaves this fraction out below 4 bits.
AUTO_DROP_OUTLIERS = 0.001
AUTO_DROP_BELOW_BITS = 4


def auto_drop_outliers(bits: int) -> float:
    """The default :attr:`TuneConfig.drop_outliers` of a run whose scheme is ``bits`` wide: 0.001 below 4 bits,
    else 0. Measured on SmolLM2-135M (bench/results/compare-peers.md): below 4 bits, dropping the largest 0.1%
    of the output errors lowered perplexity (W3G128-sym 35.97 -> 33.56, W2G128-asym 133.02 -> 127.74 at seed
    42, light budget)."""
    return AUTO_DROP_OUTLIERS if bits < AUTO_DROP_BELOW_BITS else 0.0


LOSSES = tuple(m.value for m in Loss)
INITS = tuple(m.value for m in Init)
STARVED = tuple(m.value for m in StarvedExperts)
ROUTINGS = tuple(m.value for m in Routing)


@dataclass(frozen=True)
class TuneConfig:
    """How rounding and clipping are learned. Defaults are auto-round's.

    Attributes:
        method: ``signround`` (learned), ``rtn`` (round to nearest from the weights alone, no calibration) or
            ``search`` (the calibrated clipping search of ``init="search"`` and no steps; ``iters`` is 0).
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
        expert_min_tokens: mixture of experts: an expert the float model routes fewer calibration tokens
            than this (top-k choices counted) is *starved*: the block's loss says little about it.
        starved_experts: what a starved expert gets. ``own`` (default): it is tuned alone, SignRound on its
            own output error with every calibration token's hidden state routed through it (the float
            model's inputs to the experts module; clipping search on them too); ``init``: the clipping
            search on every token's inputs and no steps; ``block``: nothing special, it is tuned with the
            block on the tokens routed to it. The run report lists the starved experts of each block.
        routing: mixture of experts: during a block's signed steps the student's experts get the float model's
            routing of the same tokens replayed (``teacher``, default: each expert is tuned on exactly the tokens
            and gate weights it serves in the float model; the quantized attention's error cannot flip a token
            to another expert during tuning) or are routed by their own (float) router on the student's hidden
            states (``student``: as the quantized model runs, auto-round's way). The final loss and the next
            block's inputs always use the student's own routing. Teacher routing gave the lower perplexity at
            both seeds measured on the upcycled SmolLM2 MoE (bench/results/moe-starved*.md: 25.74 vs 26.17 and
            25.70 vs 25.79, W3G128, 4 blocks), at about the same cost.
        holdout: calibration samples held out of the tuning batches (0: none, the default). With ``k > 0``,
            ``k`` samples (a seeded draw per block) are never stepped on; after the steps, the block's loss on
            them with the tuned rounding is compared with its loss at the start (the clipping search's
            rounding, plain rounding with ``init none``), and a block the steps made worse there keeps its
            start. The run report says which blocks did (``BlockReport.holdout``).
        drop_outliers: the fraction of each step's largest squared block-output errors (over the whole batch
            tensor, ``batch x seqlen x hidden``) left out of the tuning loss, so that a few extreme output
            elements do not steer the step (auto-round's outlier-suppressed loss: 0.001 in its
            ``enable_alg_ext`` path below 4 bits). The best step is chosen by the same loss; the losses the
            report gives (start, final, held-out) stay the full error. 0: nothing left out. None (the default):
            :func:`auto_drop_outliers` of the run's scheme, which :class:`~signround.config.QuantConfig` sets:
            0.001 below 4 bits, else 0 (a TuneConfig used on its own reads None as 0).
        nested: lower integer widths tuned together with the stored one (nested precision; the Double Rounding
            widths the checkpoint serves, ``--nested`` with ``--serve-bits``): every step's loss is the weighted
            mean of the block-output losses of the stored codes and of the codes derived at each width, each
            width weighted by one over its loss at the start of the steps (so each counts by its relative
            improvement). With ``quant_inputs`` each width's loss is on the inputs of the model served at that
            width (the pipeline carries one input tensor per width). Empty (the default): the stored width alone.
        derivation: how the served widths' codes derive from the stored ones (a :class:`Derivation`;
            :mod:`signround.formats.double_rounding`): ``shift`` (the default; the Double Rounding paper's
            ``round(c / 2^(B-b))``) or ``range`` (asymmetric grids keep their whole range:
            ``round(c (2^b-1) / (2^B-1))``). Recorded in the checkpoint as ``quantization_config.derivation``
            when it serves lower widths; the nested widths are tuned under it.
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
    expert_min_tokens: int = 64
    starved_experts: StarvedExperts = StarvedExperts.OWN
    routing: Routing = Routing.TEACHER
    holdout: int = 0
    drop_outliers: float | None = None
    nested: tuple[int, ...] = ()
    derivation: Derivation = Derivation.SHIFT

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", Method(self.method))
        object.__setattr__(self, "derivation", _choice(Derivation, self.derivation, "derivation"))
        nested = self.nested.split(",") if isinstance(self.nested, str) else self.nested
        try:
            widths = {int(b) for b in nested if str(b).strip()}
        except ValueError:
            raise SignRoundError(f"nested widths must be integers like 4,2; got {self.nested!r}") from None
        object.__setattr__(self, "nested", tuple(sorted(widths, reverse=True)))
        try:
            object.__setattr__(self, "starved_experts", StarvedExperts(self.starved_experts))
        except ValueError:
            raise SignRoundError(
                f"starved_experts must be one of {', '.join(STARVED)}, got {self.starved_experts!r}"
            ) from None
        try:
            object.__setattr__(self, "routing", Routing(self.routing))
        except ValueError:
            raise SignRoundError(f"routing must be one of {', '.join(ROUTINGS)}, got {self.routing!r}") from None
        if self.drop_outliers is not None and not 0 <= self.drop_outliers < 0.5:
            raise SignRoundError(f"drop_outliers is a fraction of the errors in [0, 0.5), got {self.drop_outliers}")
        if self.holdout < 0:
            raise SignRoundError(f"holdout must be >= 0 samples, got {self.holdout}")
        if self.expert_min_tokens < 0:
            raise SignRoundError(f"expert_min_tokens must be >= 0, got {self.expert_min_tokens}")
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
        if self.method is Method.SEARCH:
            if self.init is not Init.SEARCH:
                raise SignRoundError("method search is the clipping search with no steps: it needs init search")
            if self.nested or self.holdout:
                what = "nested widths are" if self.nested else "holdout judges"
                raise SignRoundError(f"method search takes no steps, and {what} for tuned blocks: use signround")
        if self.method in (Method.RTN, Method.SEARCH):
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
        dataset: a named data set (``c4``, ``pile-10k``, ``wikitext2``; :mod:`signround.calib.sources`), a
            local .txt/.jsonl/.json/.parquet path, an HF dataset id, or None for data-free calibration (the
            model generates its own text).
        nsamples: number of sequences.
        seqlen: tokens per sequence.
        seed: seeds shuffling and generation.
        data_dir: the data folder named data sets are looked for in first (``--data-dir``; default
            ``$SIGNROUND_DATA``), before ``../shared/data`` and the hub.
    """

    dataset: str | None = None
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 42
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if self.nsamples < 1:
            raise SignRoundError(f"nsamples must be >= 1, got {self.nsamples}")
        if self.seqlen < 8:
            raise SignRoundError(f"seqlen must be >= 8, got {self.seqlen}")


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
        experts: mixture of experts: ``layer`` (default) makes gate, up and down of all experts of a layer one
            allocation unit, one width, as vLLM and GGUF store them; ``expert`` gives each expert its own units
            (gate+up, and down), a checkpoint only the native format holds (other formats refuse it before tuning).
    """

    bit_options: tuple[int, ...] = (2, 3, 4, 8)
    avg_bits: float | None = None
    target_bytes: int | None = None
    solver: Solver = Solver.ILP
    sensitivity: Sensitivity = Sensitivity.BLOCK
    nsamples: int = 32
    experts: ExpertUnits = ExpertUnits.LAYER

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
        object.__setattr__(self, "experts", _choice(ExpertUnits, self.experts, "expert units"))
        if self.nsamples < 1:
            raise SignRoundError(f"sensitivity nsamples must be >= 1, got {self.nsamples}")


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
        allow_partial_groups: compressed-tensors and auto_round: write groups that do not divide a layer's
            width (their stock and CPU readers cannot run them; refused by default).
    """

    formats: tuple[ExportFormat, ...] = (ExportFormat.NATIVE,)
    allow_partial_groups: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", parse_formats(self.formats))
