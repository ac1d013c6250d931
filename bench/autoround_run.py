"""Run intel auto-round (the reference SignRound) on a model, for side-by-side benchmarks.

Runs inside the bench-only environment (bench/.venv-bench, see bench/requirements-bench.txt), never as a
dependency of signround. It quantizes with auto-round's own code and writes the *fake-quantized* model
(weights replaced by auto-round's dequantized values) as a plain float HF folder, so that signround's
evaluation code scores both tools' models with the same ruler. A JSON report gives wall time and peak RSS.

    bench/.venv-bench/bin/python bench/autoround_run.py --model ~/.cache/signround/smollm2-135m \
        --bits 4 --group-size 128 --iters 50 --nsamples 128 --seqlen 256 --output /tmp/ar-w4g128
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="float HF model folder")
    p.add_argument("--bits", type=int, default=4)
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
    p.add_argument(
        "--amp", action="store_true", help="auto-round's bfloat16 autocast (its default where bf16 is supported)"
    )
    args = p.parse_args()

    from auto_round import AutoRound  # imported late: only the bench environment has it

    texts = [json.loads(line)["text"] for line in Path(args.dataset).read_text().splitlines() if line.strip()]
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    t0 = time.perf_counter()
    # amp=False (default here) keeps auto-round in float32 like signround; --amp gives its bf16 autocast.
    ar = AutoRound(
        model,
        tokenizer,
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym,
        iters=args.iters,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        dataset=texts,
        amp=args.amp,
    )
    ar.quantize()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    model = model.to(torch.float32)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    Path(args.report).write_text(
        json.dumps(
            {
                "seconds": seconds,
                "peak_rss_gb": peak,
                "tool": "auto-round",
                "amp": args.amp,
                "version": __import__("auto_round").__version__,
            },
            indent=2,
        )
    )
    print(f"auto-round done in {seconds:.1f} s, peak RSS {peak:.2f} GB -> {args.output}")


if __name__ == "__main__":
    main()
