"""The ``signround`` command line's argument parser: one ``_add_*`` per subcommand, flags mirroring config
fields one to one, and :func:`quant_config`, which turns ``quantize``'s flags into the :class:`QuantConfig`
a Python user would build (:mod:`signround.cli` runs it)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from signround.config import (
    ActDType,
    ActGranularity,
    Derivation,
    DType,
    ExpertUnits,
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
from signround.errors import SignRoundError


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a model's weights and save a checkpoint")
    p.add_argument("--model", required=True, help="HF folder, .gguf file, hub id, or alias (smollm2-135m)")
    p.add_argument(
        "--scheme",
        default=None,
        metavar="NAME",
        help="a named scheme, as auto-round and llm-compressor name them: W4A16, W3A16, W2A16, W8A16, W8A8, W4A8, "
        "W4A4, W4AFP8, FP8_DYNAMIC, FP8, MXFP4A16, NVFP4A16 (weights, and activations for the W?A8/A4/FP8 names); "
        "explicit flags override its fields",
    )
    p.add_argument(
        "--bits",
        type=int,
        default=None,
        help="weight bits, 2..8 (default 4; implied by a floating-point --data-type or a gguf --format)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="weights per scale along the input dim; -1 = per channel (default 128; mxfp4, q4_k: 32; nvfp4, q2_k, "
        "q6_k: 16)",
    )
    p.add_argument(
        "--sym", action="store_true", help="symmetric full-range grid (default: asymmetric, or what --format implies)"
    )
    p.add_argument(
        "--data-type",
        choices=[d.value for d in DType],
        default=None,
        help="weight number format (default int, or what --format implies); the others fix their own width and "
        "symmetry: fp* / mxfp4 / nvfp4 floating-point grids, bitmod = per-group mixture of 4-bit grids, "
        "q4_k / q2_k / q6_k = llama.cpp's K-quant structures, for --format gguf:q4_k|q2_k|q6_k|q4_k_m "
        "(docs/formats.md); --dtype is the model's compute dtype",
    )
    p.add_argument(
        "--serve-bits",
        default=None,
        metavar="B,B,...",
        help="Double Rounding: lower widths this checkpoint also serves (e.g. 6,4,3,2 with --bits 8); "
        "`signround eval --bits 4` derives one",
    )
    p.add_argument(
        "--nested",
        action="store_true",
        help="tune the --serve-bits widths too (nested precision): each step's loss covers the stored codes and "
        "the codes derived from them at every served width, so each served width is good, not only the widest",
    )
    p.add_argument(
        "--derivation",
        choices=[d.value for d in Derivation],
        default=Derivation.SHIFT.value,
        help="how the --serve-bits widths derive from the stored codes: shift = round(c / 2^(B-b)) (Double "
        "Rounding's; asymmetric grids lose their top codes), range = round(c (2^b-1) / (2^B-1)) on asymmetric "
        "grids (the whole range kept; 8/4/2 nest exactly). Recorded in the checkpoint",
    )
    p.add_argument(
        "--method",
        choices=[m.value for m in Method],
        default="signround",
        help="signround (learned rounding), rtn (nearest, weights alone), search (calibrated clip search, no steps)",
    )
    p.add_argument(
        "--recipe",
        choices=[r.value for r in Recipe],
        default=None,
        help="tuning budget, filling what --iters/--nsamples/--seqlen/--batch-size/--lr leave unset: fast = 50 "
        "steps; default = 200 steps on 128 x 2048 tokens, batch 8; best = 1000 steps on 512 x 2048",
    )
    p.add_argument("--iters", type=int, default=None, help="SignRound steps per block (0 = RTN; recipe's: 200)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration sequences (recipe's: 128)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per calibration sequence (recipe's: 2048)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (recipe's: 8)")
    p.add_argument("--lr", type=float, default=None, help="rounding step size (recipe's: 1/iters)")
    p.add_argument("--minmax-lr", type=float, default=None, help="clipping step size (default = lr)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--dataset",
        default=None,
        help="calibration data: c4, pile-10k, wikitext2 (a data folder's file, else the hub), a "
        ".txt/.jsonl/.json/.parquet file, or an HF dataset id; none = data-free",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="data folder searched first for named data sets (default $SIGNROUND_DATA), then ../shared/data",
    )
    p.add_argument(
        "--layer-config", default=None, help='per-layer overrides, JSON or .json file: {"down_proj": {"bits": 8}}'
    )
    p.add_argument("--use-last", action="store_true", help="keep each block's last step instead of its best")
    p.add_argument(
        "--holdout",
        type=int,
        default=0,
        metavar="N",
        help="hold N calibration samples out of each block's tuning batches; a block the steps made worse on "
        "them keeps its starting rounding (default 0: off)",
    )
    p.add_argument(
        "--loss",
        choices=[v.value for v in Loss],
        default="relative",
        help="tuning objective: per-token error relative to the float output (default) or auto-round's plain MSE",
    )
    p.add_argument(
        "--drop-outliers",
        type=float,
        default=None,
        metavar="FRACTION",
        help="leave the largest FRACTION of each step's squared output errors out of the tuning loss "
        "(auto-round's outlier-suppressed loss; default: 0.001 below 4 bits, else 0; 0 turns it off)",
    )
    p.add_argument(
        "--init",
        choices=[v.value for v in Init],
        default="search",
        help="clipping start: a grid search weighted by the inputs' mean square (default) or unclipped (none)",
    )
    p.add_argument(
        "--expert-min-tokens",
        type=int,
        default=64,
        metavar="N",
        help="mixture of experts: an expert routed fewer calibration tokens than N is starved (default 64)",
    )
    p.add_argument(
        "--starved-experts",
        choices=[v.value for v in StarvedExperts],
        default="own",
        help="what a starved expert gets: tuned alone on every calibration token (own, default), the clipping "
        "search on every token and no steps (init), or tuned with the block on its few tokens (block)",
    )
    p.add_argument(
        "--routing",
        choices=[v.value for v in Routing],
        default="teacher",
        help="mixture of experts: while tuned, experts follow the float model's routing of the same tokens "
        "(teacher, default) or the student's own (student, auto-round's way)",
    )
    p.add_argument(
        "--amp",
        action="store_true",
        help="tuning steps under bfloat16 autocast (faster on GPUs and CPUs with avx512_bf16/AMX, slower on others)",
    )
    p.add_argument(
        "--enable-torch-compile",
        action="store_true",
        help="compile the tuning steps' quantize-dequantize (integer grids) with torch.compile (about 15 s of "
        "compiling; needs a C++ compiler on the CPU); on a 2-core CPU steps ran 4-9%% faster, "
        "a 200-iteration run no faster",
    )
    _add_mixed_args(p)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="compute dtype of the model (auto: bfloat16 on CUDA, float32 on CPU, where it is faster)",
    )
    p.add_argument("--output", required=True, help="output folder (written atomically)")
    _add_format_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run (its state is kept in OUTPUT.signround-run)"
    )
    p.add_argument(
        "--fp-inputs",
        action="store_true",
        help="tune each block on the float model's inputs instead of the quantized model's (blocks independent)",
    )
    p.add_argument(
        "--block-parallel",
        action="store_true",
        help="under torchrun: ranks tune disjoint blocks (needs --fp-inputs); default: ranks split each batch",
    )
    p.add_argument(
        "--low-memory",
        action="store_true",
        help="never hold the whole model: build it on the meta device and load one block at a time from the "
        "safetensors files (HF folders; native format; see docs/operations.md)",
    )
    p.add_argument(
        "--eval-ppl", default=None, metavar="TEXT", help="after quantizing, perplexity on wikitext2, c4, ptb or a file"
    )
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-max-windows", type=int, default=None)
    p.add_argument("--report", default=None, metavar="PATH", help="write the run report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_mixed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mixed precision (per-layer bits chosen for a size budget; see docs/mixed.md)")
    g.add_argument("--avg-bits", type=float, default=None, help="average bits per weight, scales and zeros included")
    g.add_argument(
        "--target-size", default=None, help="size of the whole checkpoint, e.g. 60MB (float parts at 16 bits)"
    )
    g.add_argument("--bit-options", default="2,3,4,8", help="widths a layer may take (default 2,3,4,8)")
    g.add_argument("--alloc-solver", choices=[s.value for s in Solver], default="ilp", help="integer program or greedy")
    g.add_argument(
        "--sensitivity",
        choices=[s.value for s in Sensitivity],
        default="block",
        help="block: block-output error weighted by the loss gradient (default); block-mse: unweighted; "
        "fisher: weight-space Fisher proxy",
    )
    g.add_argument("--sensitivity-nsamples", type=int, default=32, help="calibration sequences for sensitivities")
    g.add_argument(
        "--expert-units",
        choices=[u.value for u in ExpertUnits],
        default="layer",
        help="mixture of experts: layer (default): all experts of a layer share one width, as vLLM and GGUF store "
        "them; expert: a width per expert (native format only)",
    )
    a = p.add_argument_group(
        "activations (simulated in signround's evaluation; stored by the native and compressed-tensors formats)"
    )
    a.add_argument("--act-bits", type=int, default=None, help="quantize every quantized linear's input: 8 or 4 bits")
    a.add_argument("--act-dtype", choices=[d.value for d in ActDType], default=None, help="default int")
    a.add_argument(
        "--act-granularity",
        choices=[g.value for g in ActGranularity],
        default=None,
        help="token: dynamic per-token scales (default); channel: static per-channel scales from calibration; "
        "tensor: one static scale per layer from calibration (compressed-tensors / vLLM static activations)",
    )
    a.add_argument(
        "--act-clip",
        type=float,
        default=None,
        help="per-token activations: scale each token by this fraction of its absmax (e.g. 0.9, QuaRot's "
        "activation clipping; native format only); default 1",
    )
    a.add_argument(
        "--smooth",
        action="store_true",
        help="move activation outliers into the weights (per-channel scales folded into the norms / up_proj, "
        "strength searched per layer group on calibration data)",
    )
    a.add_argument(
        "--rotate",
        nargs="?",
        const="folded",
        default="none",
        choices=[r.value for r in Rotation],
        help="fold a seeded randomized-Hadamard rotation (residual stream, attention values per head) into the "
        "float weights first, spreading outlier channels (QuaRot-style; LLaMA-style models; off by default); "
        "`--rotate online` also rotates down_proj's input at run time (native format only)",
    )
    p.add_argument(
        "--format-search",
        default=None,
        metavar="DTYPE,DTYPE,...",
        help="per layer, the data type of least activation-weighted rounding error among these (one width), "
        "e.g. fp4_e2m1,fp4_e1m2,fp4_e3m0 (LLM-FP4) or int,fp4_e2m1; native format only",
    )


def _add_format_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format",
        default="native",
        help="checkpoint format(s), comma-separated: native, auto_round, gptq, compressed-tensors, gpt-oss-mxfp4, "
        "gguf:<type>; several formats give one subfolder each (see docs/formats.md)",
    )
    p.add_argument(
        "--allow-partial-groups",
        action="store_true",
        help="compressed-tensors and auto_round: write groups that do not divide a layer's width (their stock and "
        "CPU readers cannot run them)",
    )


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="convert a signround checkpoint to other formats without re-tuning")
    p.add_argument("--model", required=True, help="a signround checkpoint (or, for gguf:f16, a float model)")
    p.add_argument(
        "--bits", type=int, default=None, help="serve a quantized checkpoint at fewer bits (Double Rounding)"
    )
    p.add_argument("--output", required=True, help="output folder (written atomically)")
    _add_format_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--quiet", action="store_true")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a float model or a quantized checkpoint")
    p.add_argument("--model", required=True, help="HF folder, signround checkpoint, .gguf file, hub id or alias")
    p.add_argument(
        "--ppl", default=None, help="wikitext2, c4, ptb or a path to a text file (default wikitext2 without --tasks)"
    )
    p.add_argument(
        "--tasks", default=None, help="zero-shot tasks through lm-eval, comma-separated, e.g. piqa,winogrande"
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N items of each task")
    p.add_argument(
        "--data-dir",
        default=None,
        help="data folder searched first for named texts and for tasks/ (default $SIGNROUND_DATA, then "
        "../shared/data); a folder of task files also works",
    )
    p.add_argument(
        "--bits", type=int, default=None, help="serve a quantized checkpoint at fewer bits (Double Rounding)"
    )
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per forward pass (tasks use at least 8)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available); float32 on either")
    p.add_argument(
        "--json", default=None, metavar="PATH", help='write {"ppl": ..., "windows": ..., "seqlen": ..., "tasks": [...]}'
    )
    p.add_argument("--quiet", action="store_true")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="greedy text generation from a float or quantized model (any format)")
    p.add_argument("--model", required=True, help="HF folder, signround/auto-round/GPTQ/compressed-tensors/GGUF")
    p.add_argument("--prompt", required=True)
    p.add_argument(
        "--bits", type=int, default=None, help="serve a quantized checkpoint at fewer bits (Double Rounding)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--quiet", action="store_true")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``signround: error: ...``, exit 2) instead of the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"signround: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="signround", description="SignRound weight quantization for causal LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_quantize(sub)
    _add_export(sub)
    _add_eval(sub)
    _add_generate(sub)
    return parser


def quant_config(args: argparse.Namespace) -> Any:
    """The :class:`~signround.config.QuantConfig` of ``quantize``'s flags (validated: a combination the
    config refuses is refused here with the same message as in the Python API)."""
    from signround.config import (
        ActScheme,
        CalibConfig,
        ExportConfig,
        QuantConfig,
        TuneConfig,
        fill_from_recipe,
        implied_scheme,
    )
    from signround.config.named import named_scheme

    named = named_scheme(args.scheme) if args.scheme else None
    fields = {"bits": args.bits, "group_size": args.group_size, "sym": True if args.sym else None,
              "dtype": args.data_type}  # fmt: skip
    labels = {}
    # the name fills what the flags left unset (not under another --data-type: that grid fixes its own fields)
    if named is not None and args.data_type in (None, named.weights.dtype.value):
        for name, value in named.weights.to_dict().items():
            if fields[name] is None:
                fields[name], labels[name] = value, f"--scheme {args.scheme}"
    # a format that stores one grid (gguf:q4_0, gguf:q4_k_m, ...) fills the fields left unset, refuses contradictions
    scheme = implied_scheme(args.format, **fields, labels=labels)
    if args.nested and not args.serve_bits:
        raise SignRoundError("--nested tunes the widths the checkpoint serves; add --serve-bits (e.g. 4,2)")
    budget = fill_from_recipe(args.recipe, iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen,
                              batch_size=args.batch_size, lr=args.lr)  # fmt: skip
    tune = TuneConfig(
        method=args.method, iters=budget["iters"], lr=budget["lr"], minmax_lr=args.minmax_lr,
        batch_size=budget["batch_size"],
        use_best=not args.use_last, seed=args.seed, amp=args.amp, quant_inputs=not args.fp_inputs,
        loss=args.loss, init=args.init, torch_compile=args.enable_torch_compile,
        expert_min_tokens=args.expert_min_tokens, starved_experts=args.starved_experts, routing=args.routing,
        holdout=args.holdout, drop_outliers=args.drop_outliers,
        nested=(args.serve_bits or "") if args.nested else (), derivation=args.derivation,
    )  # fmt: skip
    act = None
    base = named.act if named is not None else None
    given = (args.act_bits, args.act_dtype, args.act_granularity)
    if args.act_clip is not None and base is None and all(v is None for v in given):
        raise SignRoundError("--act-clip clips quantized activations; add --act-bits (e.g. 4) or drop --act-clip")
    if base is not None or any(v is not None for v in given):
        bits = args.act_bits
        if bits is None and base is not None and args.act_dtype is None:
            bits = base.bits
        act = ActScheme(
            bits=bits,
            dtype=args.act_dtype or (base.dtype.value if base else "int"),
            granularity=args.act_granularity or (base.granularity.value if base else "token"),
            clip=args.act_clip if args.act_clip is not None else 1.0,
        )
    return QuantConfig(
        scheme=scheme,
        layer_rules=args.layer_config,
        tune=tune,
        calib=CalibConfig(
            dataset=args.dataset,
            nsamples=budget["nsamples"],
            seqlen=budget["seqlen"],
            seed=args.seed,
            data_dir=args.data_dir,
        ),
        serve_bits=args.serve_bits,
        act=act,
        smooth=args.smooth,
        rotate=args.rotate,
        mixed=_mixed_spec(args),
        format_search=args.format_search,
        export=ExportConfig(formats=args.format, allow_partial_groups=args.allow_partial_groups),
    )


def _mixed_spec(args: argparse.Namespace) -> Any:
    """The :class:`MixedSpec` of ``--avg-bits``/``--target-size``, or None when neither is given."""
    if args.avg_bits is None and args.target_size is None:
        return None
    from signround.config import MixedSpec
    from signround.mixed.budget import parse_size

    try:
        options = tuple(int(b) for b in args.bit_options.split(",") if b.strip())
    except ValueError:
        raise SignRoundError(
            f"--bit-options {args.bit_options!r} must be comma-separated integers like 2,3,4,8"
        ) from None
    return MixedSpec(
        bit_options=options,
        avg_bits=args.avg_bits,
        target_bytes=parse_size(args.target_size) if args.target_size is not None else None,
        solver=args.alloc_solver,
        sensitivity=args.sensitivity,
        nsamples=args.sensitivity_nsamples,
        experts=args.expert_units,
    )
