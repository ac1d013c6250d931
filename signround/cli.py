"""Command line: a thin shim over the public API. Flags mirror config fields one to one.

    signround quantize --model smollm2-135m --bits 4 --group-size 128 --output out/smollm2-w4g128
    signround eval --model out/smollm2-w4g128 --ppl wikitext2 --max-windows 20 --json ppl.json

User errors print ``signround: error: <one line>`` and exit with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from signround import dist
from signround.cli_args import build_parser
from signround.errors import SignRoundError

log = logging.getLogger("signround")


def _act_scheme(args: argparse.Namespace):
    """The :class:`ActScheme` of ``--act-*``, or None when activations stay float."""
    from signround.config import ActScheme

    if args.act_bits is None and args.act_dtype is None and args.act_granularity is None:
        return None
    return ActScheme(bits=args.act_bits, dtype=args.act_dtype or "int", granularity=args.act_granularity or "token")


def _mixed_spec(args: argparse.Namespace):
    """The :class:`MixedSpec` of ``--avg-bits``/``--target-size``, or None when neither is given."""
    if args.avg_bits is None and args.target_size is None:
        return None
    from signround.mixed import MixedSpec, parse_size

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
    )


def check_cpu_compiler() -> None:
    """``--enable-torch-compile`` on the CPU: inductor builds C++; fail before loading anything without one.

    Raises:
        SignRoundError: no working C++ compiler (``g++``/``clang++``, or ``$CXX``).
    """
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception:  # noqa: BLE001 - inductor raises its own InvalidCxxCompiler or an OSError
        raise SignRoundError(
            "--enable-torch-compile on the CPU needs a C++ compiler (install g++ or set CXX), or drop the flag"
        ) from None


def resolve_device(spec: str | None) -> str:
    """``--device``: ``cpu``, ``cuda`` or ``cuda:N``; None means CUDA when it is available, else the CPU.

    Raises:
        SignRoundError: not a device torch knows, another kind, or a CUDA device this process cannot see.
    """
    import torch

    if spec is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise SignRoundError(f"--device {spec!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SignRoundError(f"--device {spec}: this torch sees no CUDA device; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise SignRoundError(f"--device {spec}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif dev.type != "cpu":
        raise SignRoundError(f"--device {spec}: signround runs on cpu or cuda")
    return str(dev)


def compute_dtype(name: str, device: str | None):
    """The model dtype for ``--dtype``: ``auto`` is bfloat16 on CUDA and float32 on CPU (bfloat16 matmuls are
    faster on CPUs with avx512_bf16/AMX, but tuning quality in bfloat16 on CPU is not measured yet)."""
    import torch

    if name == "auto":
        cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        return torch.bfloat16 if cuda else torch.float32
    return getattr(torch, name)


def _quantize(args: argparse.Namespace) -> int:
    import torch

    from signround import export
    from signround.config import CalibConfig, QuantConfig, QuantScheme, TuneConfig, parse_layer_config
    from signround.eval.ppl import perplexity
    from signround.export.atomic import check_output
    from signround.model.load import load_model
    from signround.pipeline import plan, run
    from signround.runstate import refuse_unresumed, run_dir_for

    # Validate everything cheap before loading anything.
    args.device = resolve_device(args.device)
    scheme = QuantScheme(
        bits=args.bits, group_size=args.group_size, sym=True if args.sym else None, dtype=args.data_type
    )
    tune = TuneConfig(
        method=args.method,
        iters=args.iters,
        lr=args.lr,
        minmax_lr=args.minmax_lr,
        batch_size=args.batch_size,
        use_best=not args.use_last,
        seed=args.seed,
        amp=args.amp,
        quant_inputs=not args.fp_inputs,
        loss=args.loss,
        init=args.init,
        torch_compile=args.enable_torch_compile,
    )
    if tune.torch_compile and args.device == "cpu":
        check_cpu_compiler()
    cfg = QuantConfig(
        scheme=scheme,
        layer_rules=parse_layer_config(args.layer_config, scheme),
        tune=tune,
        calib=CalibConfig(dataset=args.dataset, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed),
        serve_bits=args.serve_bits,
        act=_act_scheme(args),
        smooth=args.smooth,
    )
    mixed = _mixed_spec(args)
    if mixed is not None and cfg.serve_bits:
        raise SignRoundError("--serve-bits derives one width for every layer; drop it or the mixed-precision options")
    if mixed is not None and scheme.dtype.is_float:
        raise SignRoundError(f"mixed precision chooses integer widths; drop --data-type {scheme.dtype.value}")
    formats = export.parse_formats(args.format)
    if cfg.act is not None:
        export.refuse_activations(formats)
    if mixed is not None and any(f.startswith("gguf") for f in formats):
        raise SignRoundError(
            "gguf formats store one width for every layer; drop gguf from --format for a mixed-precision run "
            "(auto_round, gptq, compressed-tensors and native keep per-layer bits)"
        )
    search = None
    if args.format_search is not None:
        from signround.mixed.formats import parse_candidates

        search = parse_candidates(args.format_search, scheme)
        if mixed is not None or cfg.serve_bits:
            raise SignRoundError(
                "--format-search chooses the grid per layer; drop --avg-bits/--target-size/--serve-bits"
            )
    if args.low_memory:
        _check_low_memory(args, mixed, search, formats)
    rank, _ = _check_distributed(args)
    check_output(args.output, args.overwrite)
    state_dir = run_dir_for(args.output)
    refuse_unresumed(state_dir, args.resume)  # fail before loading anything
    if args.dataset is not None and not Path(args.dataset).expanduser().is_file():
        from signround.calib.data import load_texts

        load_texts(args.dataset)  # fails fast on a missing file
    torch.manual_seed(args.seed)
    whole = mixed is not None or search is not None or (args.dataset is None and cfg.needs_calibration)
    model, tokenizer, stream = _load_for_quantize(args, whole_model_pass=whole)
    tokens = alloc = None
    if mixed is not None or search is not None:  # both choose per-layer schemes from calibration data
        from signround.pipeline import resolve_tokens
        from signround.runstate import RunState

        tokens = RunState.saved_tokens(state_dir) if args.resume else None
        if tokens is None:
            tokens = resolve_tokens(model, tokenizer, cfg.calib, None)
    if mixed is not None:
        from signround.mixed import allocate_bits

        alloc = allocate_bits(model, tokens, cfg, mixed, progress=not args.quiet)
        print(alloc.table())
        cfg = dataclasses.replace(cfg, layer_rules=cfg.layer_rules + alloc.rules())
    choice = None
    if search is not None:
        from signround.mixed.formats import choose_formats

        choice = choose_formats(model, tokens, search)
        log.info("format search: %s", ", ".join(f"{k} x{v}" for k, v in choice.counts().items()))
        cfg = dataclasses.replace(cfg, layer_rules=cfg.layer_rules + choice.rules())
    from signround.export.gguf_kquant import KQUANTS, MIXES, format_rules

    for qtype in [f.split(":", 1)[1] for f in formats if f.split(":", 1)[-1] in (*KQUANTS, *MIXES)]:
        rules = format_rules(plan(model, cfg), qtype, int(model.config.num_hidden_layers))
        if rules:  # the mix's per-layer types, then the fallbacks for rows llama.cpp cannot hold as K-quants
            log.info("gguf:%s: per-layer types and fallbacks: %s", qtype,
                     ", ".join(f"{r.pattern.rstrip('$')}: {r.scheme.name}" for r in rules))  # fmt: skip
            cfg = dataclasses.replace(cfg, layer_rules=cfg.layer_rules + rules)
    export.check_formats(model, plan(model, cfg), formats, allow_partial_groups=args.allow_partial_groups)
    log.info("quantizing %s to %s with %s (%d iters)", args.model, scheme.name, tune.method.value, tune.iters)
    report = run(
        model,
        tokenizer,
        cfg,
        data=tokens,
        device=args.device,
        progress=not args.quiet and rank == 0,
        state_dir=state_dir if rank == 0 or args.block_parallel else None,
        resume=args.resume,
        stream=stream,
        block_parallel=args.block_parallel,
    )
    if rank != 0:  # rank 0 writes the output and the report
        dist.finish()
        return 0
    if alloc is not None:
        model.config.quantization_config["mixed_precision"] = alloc.to_config()
    if choice is not None:
        model.config.quantization_config["format_search"] = choice.to_config()
    out = export.save(
        model, tokenizer, args.output, formats, overwrite=args.overwrite, allow_partial_groups=args.allow_partial_groups
    )
    shutil.rmtree(state_dir, ignore_errors=True)  # the output is complete; the run state is no longer needed
    print(report.summary())
    print(f"saved {out}")
    result = {
        "seconds": report.seconds,
        "peak_rss_gb": report.peak_rss_gb,
        **({} if report.peak_gpu_gb is None else {"peak_gpu_gb": report.peak_gpu_gb}),
        "scheme": scheme.name,
        "blocks": [vars(b) for b in report.blocks],
    }
    if alloc is not None:
        result["mixed_precision"] = {**alloc.to_config(), "sensitivity_seconds": alloc.seconds}
    if choice is not None:
        result["format_search"] = choice.to_config()
    if args.eval_ppl:
        if stream is not None:  # the blocks were freed; the saved checkpoint is a fraction of the float size
            model, tokenizer = load_model(args.output)
        ppl = perplexity(
            model,
            tokenizer,
            args.eval_ppl,
            seqlen=args.eval_seqlen,
            max_windows=args.eval_max_windows,
            progress=not args.quiet,
        )
        print(f"perplexity ({args.eval_ppl}, {ppl.windows} windows x {ppl.seqlen} tokens): {ppl.ppl:.4f}")
        result["ppl"] = ppl.to_dict()
    if args.report:
        Path(args.report).write_text(json.dumps(result, indent=2))
    dist.finish()
    return 0


def _check_distributed(args: argparse.Namespace) -> tuple[int, int]:
    """Join the torchrun process group, if any, and refuse what multi-process tuning does not support."""
    if not args.block_parallel and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    rank, size = dist.init_from_env()
    if args.block_parallel and size == 1:
        raise SignRoundError("--block-parallel splits blocks across processes; launch with torchrun --nproc_per_node N")
    if args.block_parallel and not args.fp_inputs:
        raise SignRoundError("--block-parallel needs blocks tuned on float inputs; add --fp-inputs")
    if size > 1 and (args.resume or args.low_memory):
        raise SignRoundError("multi-process tuning cannot --resume or stream (--low-memory) yet; run one process")
    if size > 1 and not args.block_parallel and args.batch_size < size:
        raise SignRoundError(f"--batch-size {args.batch_size} cannot be split over {size} processes; use >= {size}")
    return rank, size


def _load_for_quantize(args: argparse.Namespace, whole_model_pass: bool) -> tuple[Any, Any, Any]:
    """``(model, tokenizer, stream)`` for a quantize run. A float HF safetensors folder (the built-in alias
    included) is built on the meta device and each block read when its turn comes (``stream``; with
    ``--low-memory`` it is also freed once persisted), so the run never holds the whole float model nor a
    memory map of it. Runs that need the whole model first (mixed precision, format search, calibration
    text generated by the model), other sources (GGUF, hub ids, checkpoints transformers converts) and
    quantized checkpoints load whole, as ``load_model`` does."""
    from signround.model.lazy import load_skeleton
    from signround.model.load import load_model, read_quantization_config, resolve_model

    dtype = compute_dtype(args.dtype, args.device)
    if args.low_memory:
        model, tokenizer, stream = load_skeleton(resolve_model(args.model), dtype)
        model.signround_stream = stream  # the native writer reads the finished blocks back from the run folder
        return model, tokenizer, stream
    folder = Path(resolve_model(args.model))
    on_demand = (
        not whole_model_pass
        and (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
        and read_quantization_config(folder) is None
    )
    if on_demand:
        try:
            return load_skeleton(folder, dtype, keep=True)
        except SignRoundError as exc:  # e.g. names transformers maps on load; its loader knows them
            log.debug("loading %s whole: %s", folder, exc)
    model, tokenizer = load_model(args.model, dtype=dtype)
    return model, tokenizer, None


def _check_low_memory(args: argparse.Namespace, mixed: Any, search: Any, formats: list[str]) -> None:
    """``--low-memory`` streams blocks from safetensors and writes the native format block by block."""
    if formats != ["native"]:
        raise SignRoundError(
            "--low-memory writes the native format; drop --format and convert the checkpoint with "
            "`signround export --format ...` (it loads only the quantized model)"
        )
    if mixed is not None or search is not None:
        raise SignRoundError(
            "--low-memory cannot run the whole-model sensitivity pass of --avg-bits/--target-size/"
            "--format-search; drop one of them"
        )
    if str(args.model).endswith(".gguf"):
        raise SignRoundError("--low-memory reads HF safetensors folders; convert the .gguf to a folder first")


def _export(args: argparse.Namespace) -> int:
    from signround import export
    from signround.export.atomic import check_output
    from signround.model.load import load_model

    formats = export.parse_formats(args.format)
    check_output(args.output, args.overwrite)
    model, tokenizer = load_model(args.model, bits=args.bits)
    out = export.save(
        model, tokenizer, args.output, formats, overwrite=args.overwrite, allow_partial_groups=args.allow_partial_groups
    )
    print(f"saved {out} ({', '.join(formats)})")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from signround.model.load import load_model
    from signround.pack.packed import dequantized_weights

    if args.max_new_tokens < 1:
        raise SignRoundError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model, tokenizer = load_model(args.model, bits=args.bits)
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise SignRoundError("this tokenizer has no chat template; drop --chat")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = args.prompt
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not args.chat).input_ids
    with torch.no_grad(), dequantized_weights(model):
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    print(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from signround.eval.harness import evaluate_tasks, format_scores, parse_tasks
    from signround.eval.ppl import perplexity, resolve_text
    from signround.model.load import load_model

    # Fail fast on bad options before loading the model.
    ppl_text = args.ppl if args.ppl or args.tasks else "wikitext2"
    if ppl_text:
        resolve_text(ppl_text)
    tasks = parse_tasks(args.tasks) if args.tasks else []
    device = resolve_device(args.device)
    if args.json:
        parent = Path(args.json).expanduser().parent
        if not parent.is_dir():
            raise SignRoundError(f"folder {parent} for --json does not exist")
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, bits=args.bits)
    model.to(device)
    result: dict = {}
    if ppl_text:
        ppl = perplexity(
            model,
            tokenizer,
            ppl_text,
            seqlen=args.seqlen,
            max_windows=args.max_windows,
            batch_size=args.batch_size,
            progress=not args.quiet,
        )
        print(
            f"perplexity ({ppl_text}, {ppl.windows} windows x {ppl.seqlen} tokens): {ppl.ppl:.4f}  "
            f"[{time.perf_counter() - t0:.1f} s]"
        )
        result.update(ppl.to_dict())
    if tasks:
        scores = evaluate_tasks(
            model, tokenizer, tasks, limit=args.limit, data=args.data_dir, batch_size=max(args.batch_size, 8)
        )
        print(format_scores(scores))
        result["tasks"] = [vars(s) for s in scores]
        result["average_acc"] = sum(s.acc for s in scores) / len(scores)
        result["limit"] = args.limit
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already reported in one line)
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    for noisy in ("transformers", "accelerate", "lm_eval", "lm-eval", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' own "Loading weights" bars
    try:
        commands = {"quantize": _quantize, "export": _export, "eval": _eval, "generate": _generate}
        return commands[args.command](args)
    except SignRoundError as exc:
        print(f"signround: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("signround: interrupted; nothing was written to the output folder", file=sys.stderr)
        return 130
    except MemoryError:
        print("signround: error: out of memory; lower --nsamples, --seqlen or --batch-size", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
