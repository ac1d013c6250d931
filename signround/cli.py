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
import shutil
import sys
import time
from pathlib import Path

from signround import dist
from signround.cli_args import build_parser
from signround.devices import check_cpu_compiler, compute_dtype, resolve_device
from signround.errors import SignRoundError

log = logging.getLogger("signround")


def _quantize(args: argparse.Namespace) -> int:
    import torch

    from signround import export
    from signround.api import check_low_memory, join_distributed, load_for_quantize, quantize_run
    from signround.cli_args import quant_config
    from signround.eval.ppl import perplexity, resolve_text
    from signround.export.atomic import check_output
    from signround.model.load import load_model
    from signround.pipeline import RunOptions
    from signround.runstate import refuse_unresumed, run_dir_for

    # Validate everything cheap before loading anything.
    device = resolve_device(args.device)
    cfg = quant_config(args)
    if cfg.tune.torch_compile and device == "cpu":
        check_cpu_compiler()
    if args.low_memory:
        check_low_memory(cfg, args.model)
    state_dir = run_dir_for(args.output)
    options = RunOptions(device, not args.quiet, state_dir, args.resume, args.block_parallel)
    rank, _ = join_distributed(cfg, options, args.low_memory)
    check_output(args.output, args.overwrite)
    refuse_unresumed(state_dir, args.resume)  # fail before loading anything
    check_dataset(cfg.calib.dataset, cfg.calib.data_dir)
    if args.eval_ppl:
        resolve_text(args.eval_ppl, args.data_dir)  # found (or fetched) before hours of tuning, not after
    torch.manual_seed(args.seed)
    model, tokenizer, stream = load_for_quantize(args.model, compute_dtype(args.dtype, device), args.low_memory, cfg)
    if rank != 0 and not args.block_parallel:  # rank 0 alone keeps the run state
        options = dataclasses.replace(options, state_dir=None)
    result = quantize_run(model, tokenizer, cfg, None, options, stream)
    if rank != 0:  # rank 0 writes the output and the report
        dist.finish()
        return 0
    # a --low-memory run freed each block once persisted: the native writer reads them back from the run folder
    written = export.ExportOptions(cfg.export.allow_partial_groups, stream if args.low_memory else None)
    out = export.save(model, tokenizer, args.output, cfg.export.formats, overwrite=args.overwrite, options=written)
    shutil.rmtree(state_dir, ignore_errors=True)  # the output is complete; the run state is no longer needed
    if result.plan.allocation is not None:
        print(result.plan.allocation.table())
    print(result.report.summary())
    print(result.plan.weights.summary())
    print(f"saved {out}")
    summary = result.to_dict()
    if args.eval_ppl:
        if stream is not None:  # the blocks were freed; the saved checkpoint is a fraction of the float size
            model, tokenizer = load_model(args.output)
        ppl = perplexity(model, tokenizer, args.eval_ppl, seqlen=args.eval_seqlen, max_windows=args.eval_max_windows,
                         progress=not args.quiet, data_dir=args.data_dir)  # fmt: skip
        print(f"perplexity ({args.eval_ppl}, {ppl.windows} windows x {ppl.seqlen} tokens): {ppl.ppl:.4f}")
        summary["ppl"] = ppl.to_dict()
    if args.report:
        Path(args.report).write_text(json.dumps(summary, indent=2))
    dist.finish()
    return 0


def check_dataset(dataset: str | None, data_dir: str | None = None) -> None:
    """Fail fast on calibration data that cannot be found (a named data set or hub id is read here, once,
    into the ``datasets`` cache when it comes from the hub)."""
    if dataset is not None and not Path(dataset).expanduser().is_file():
        from signround.calib.data import load_texts

        load_texts(dataset, data_dir)


def _export(args: argparse.Namespace) -> int:
    from signround import export
    from signround.export.atomic import check_output
    from signround.model.load import load_model

    formats = export.parse_formats(args.format)
    check_output(args.output, args.overwrite)
    model, tokenizer = load_model(args.model, bits=args.bits)
    options = export.ExportOptions(allow_partial_groups=args.allow_partial_groups)
    out = export.save(model, tokenizer, args.output, formats, overwrite=args.overwrite, options=options)
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
        resolve_text(ppl_text, args.data_dir)
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
            data_dir=args.data_dir,
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
