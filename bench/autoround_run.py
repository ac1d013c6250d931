"""Run intel auto-round (the reference SignRound) on a model, for side-by-side benchmarks.

Runs inside the bench-only environment (bench/.venv-bench, see bench/requirements-bench.txt), never as a
dependency of signround. It quantizes with auto-round's own code and writes the *fake-quantized* model
(weights replaced by auto-round's dequantized values) as a plain float HF folder, so that signround's
evaluation code scores both tools' models with the same ruler. A JSON report gives wall time and peak RSS.

    bench/.venv-bench/bin/python bench/autoround_run.py --model ~/.cache/signround/smollm2-135m \
        --bits 4 --group-size 128 --iters 50 --nsamples 128 --seqlen 256 --output /tmp/ar-w4g128

With ``--auto-scheme AVG_BITS`` the uniform ``--bits`` is replaced by auto-round's own mixed-precision search
(``auto_round.auto_scheme.AutoScheme``, method "default" = delta-loss scoring + DP allocation) over integer
weight-only options at ``--bit-options`` bits, each with ``--group-size`` and ``--sym`` as in the uniform path.
auto-round's ``avg_bits`` counts a 16-bit scale and a bits-wide zero point per group (the zero point even for
--sym, unlike signround's budget) over the decoder linears it quantizes; lm_head and the embeddings stay float
and are outside the budget. The report then gains ``layer_bits`` (the bits auto-round gave each quantized
decoder linear) and ``auto_scheme`` (its settings, the search time and the average bits of the codes alone).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# Layers that must get the same bits (they read the same input; LLaMA-style names, matched inside each
# decoder block by auto-round's parse_shared_layers; patterns that match nothing are ignored).
SHARED_LAYERS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("mlp.gate_proj", "mlp.up_proj"),
)


def calibration_subset(texts: list[str], tokenizer, seqlen: int, nsamples: int) -> list[str]:
    """The texts auto-round calibrates on when given ``texts`` as a list: the first ``nsamples`` with at
    least ``seqlen`` tokens (shorter ones are skipped by its calibration loop)."""
    kept = []
    for text in texts:
        if len(kept) == nsamples:
            break
        if len(tokenizer(text, truncation=True, max_length=seqlen)["input_ids"]) >= seqlen:
            kept.append(text)
    return kept


def auto_scheme(args: argparse.Namespace, bit_options: list[int]):
    """auto-round's AutoScheme for ``--auto-scheme``: one integer weight-only option per bit width, and
    the search calibrated with the script's nsamples / seqlen / batch size."""
    from auto_round.auto_scheme import AutoScheme
    from auto_round.schemes import QuantizationScheme

    options = [
        QuantizationScheme(bits=b, group_size=args.group_size, sym=args.sym, data_type="int", act_bits=16)
        for b in bit_options
    ]
    return AutoScheme(
        avg_bits=args.auto_scheme,
        options=options,
        shared_layers=[list(group) for group in SHARED_LAYERS],
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        # keep the float32 weights in RAM: with True, auto-round drops block weights during the search
        # and reloads them from the checkpoint files (in the checkpoint's dtype) afterwards
        low_cpu_mem_usage=False,
    )


def decided_bits(ar) -> dict[str, int]:
    """{layer name: bits} for every quantized decoder linear, from the per-layer config auto-round
    resolved (``ar.layer_config``, written by its post_init and used by quantize)."""
    blocks = tuple(f"{name}." for group in ar.quant_block_list for name in group)
    return {
        name: int(cfg["bits"])
        for name, cfg in sorted(ar.layer_config.items())
        if name.startswith(blocks) and cfg.get("bits", 16) < 16
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="float HF model folder")
    p.add_argument("--bits", type=int, default=4, help="uniform weight bits (ignored with --auto-scheme)")
    p.add_argument(
        "--auto-scheme",
        type=float,
        default=None,
        metavar="AVG_BITS",
        help="mixed precision by auto-round's AutoScheme at this average (incl. scale/zero overhead)",
    )
    p.add_argument("--bit-options", default="2,3,4,8", help="bit widths AutoScheme chooses from")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--sym", action="store_true")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dataset", required=True, help="calibration .jsonl with a 'text' field")
    p.add_argument("--output", required=True)
    p.add_argument("--report", required=True)
    p.add_argument("--no-save", action="store_true", help="skip writing the model (timing runs)")
    p.add_argument(
        "--amp", action="store_true", help="auto-round's bfloat16 autocast (its default where bf16 is supported)"
    )
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="enable_torch_compile=False (auto-round compiles its block forward and quantize-dequantize by default)",
    )
    args = p.parse_args()

    from auto_round import AutoRound  # imported late: only the bench environment has it

    texts = [json.loads(line)["text"] for line in Path(args.dataset).read_text().splitlines() if line.strip()]
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tmp = tempfile.TemporaryDirectory()
    dataset, report = texts, {}
    if args.auto_scheme is None:
        quant = dict(bits=args.bits, group_size=args.group_size, sym=args.sym)
    else:
        bit_options = sorted({int(b) for b in args.bit_options.split(",")})
        quant = dict(scheme=auto_scheme(args, bit_options))
        # AutoScheme only takes a dataset name or a .json/.jsonl path (it refuses a list of texts), and
        # that dataset also feeds the quantization. Writing the texts the uniform path would use keeps
        # the same calibration samples (auto-round shuffles a file's lines, so only their order differs,
        # and it feeds file samples without the attention mask it builds for a list of texts).
        dataset = str(Path(tmp.name) / "calib.jsonl")
        subset = calibration_subset(texts, tokenizer, args.seqlen, args.nsamples)
        Path(dataset).write_text("".join(json.dumps({"text": t}) + "\n" for t in subset))
        # auto-round pins 8-bit asymmetric options to symmetric unless the export can serve W8 asym; the
        # output here is a fake-quantized float model, so keep every option as --sym says.
        os.environ.setdefault("AR_ALLOW_W8_ASYM", "1")
        # auto-round caches the search's layer scores under ~/.cache/auto_round, keyed by the model folder's
        # base name; a throwaway cache keeps every run's search real (and timed) and leaves nothing behind.
        os.environ["AR_AUTO_SCHEME_CACHE"] = tmp.name
        report["auto_scheme"] = {
            "avg_bits": args.auto_scheme,
            "options": bit_options,
            "group_size": args.group_size,
            "sym": args.sym,
            "method": "default",
            "shared_layers": [list(group) for group in SHARED_LAYERS],
        }
    t0 = time.perf_counter()
    # amp=False (default here) keeps auto-round in float32 like signround; --amp gives its bf16 autocast.
    ar = AutoRound(
        model,
        tokenizer,
        **quant,
        iters=args.iters,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        dataset=dataset,
        amp=args.amp,
        **({"enable_torch_compile": False} if args.no_compile else {}),
    )
    if args.auto_scheme is not None:
        ar.post_init()  # runs the AutoScheme search (quantize() would otherwise), which dominates this span
        report["auto_scheme"]["search_seconds"] = time.perf_counter() - t0
    ar.quantize()
    seconds = time.perf_counter() - t0
    peak = peak_rss_gb()
    # torch's CUDA allocator peak (auto-round tunes on cuda:0 when torch sees a GPU), as signround reports it
    peak_gpu = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None
    tmp.cleanup()
    if args.auto_scheme is not None:
        report["layer_bits"] = decided_bits(ar)
        numel = {name: model.get_submodule(name).weight.numel() for name in report["layer_bits"]}
        code_bits = sum(bits * numel[name] for name, bits in report["layer_bits"].items())
        report["auto_scheme"]["weight_avg_bits"] = code_bits / sum(numel.values())  # scale/zero not counted
    if not args.no_save:
        model = model.to(torch.float32)
        model.save_pretrained(args.output)
        tokenizer.save_pretrained(args.output)
    Path(args.report).write_text(
        json.dumps(
            {
                "seconds": seconds,
                "peak_rss_gb": peak,
                **({} if peak_gpu is None else {"peak_gpu_gb": peak_gpu}),
                "tool": "auto-round",
                "amp": args.amp,
                "torch_compile": bool(getattr(ar, "enable_torch_compile", None)),
                "version": __import__("auto_round").__version__,
                **report,
            },
            indent=2,
        )
    )
    print(f"auto-round done in {seconds:.1f} s, peak RSS {peak:.2f} GB -> {args.output}")


def peak_rss_gb() -> float:
    """``VmHWM`` in GB (as signround's report): ``ru_maxrss`` would include the launching process's peak,
    which Linux carries into a child across fork and exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


if __name__ == "__main__":
    main()
