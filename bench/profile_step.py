"""Where one SignRound step spends its time, and what fraction of the machine's matmul rate it reaches.

Times (median over steps) the parts of a tuning step on one decoder block of the model: batch gather,
fake quantization of all linears, forward, backward, and the signed update; measures the machine's float32
(and bfloat16) matmul rate on the block's own product shapes; and reports the step's achieved rate from an
analytic FLOP count (linears: 2·T·in·out forward, twice that backward; attention: 4·T·S·heads·head_dim
forward for causal scores and values, twice that backward).

    python bench/profile_step.py --tokens 8x256 --steps 20 [--amp] [--out bench/results/profile.md]

``--amp`` runs the forward under bfloat16 autocast (signround ``--amp``) and compares with the bfloat16 rate.
``--out`` appends the printed lines, with the command, to a markdown file.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call

from signround.calib.capture import block_output, capture_block_inputs
from signround.config import QuantScheme
from signround.model.blocks import block_linears, find_blocks, resolve_schemes
from signround.model.load import load_model
from signround.tune.optim import sign_step
from signround.tune.wrapper import TunableWeight


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 20) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * m * k * n * repeats / (time.perf_counter() - t0) / 1e9


def step_flops(block: torch.nn.Module, batch: int, seqlen: int, config) -> float:
    tokens = batch * seqlen
    linear = sum(2 * tokens * m.in_features * m.out_features for m in block_linears(block).values())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 4 * tokens * seqlen * config.num_attention_heads * head_dim / 2  # causal: half the scores
    return 3 * (linear + attention)  # backward: gradients for activations and for the (fake-quant) weights


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", default="8x256", help="batch x seqlen of one step")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--amp", action="store_true", help="forward under bfloat16 autocast, as signround --amp")
    p.add_argument("--out", default=None, help="append the result to this markdown file")
    args = p.parse_args()
    batch, seqlen = (int(x) for x in args.tokens.split("x"))
    model, _ = load_model(args.model)
    _, blocks = find_blocks(model)
    block = blocks[0]
    tokens = torch.randint(0, model.config.vocab_size, (batch * 2, seqlen), generator=torch.Generator().manual_seed(0))
    inputs, kwargs = capture_block_inputs(model, block, tokens)
    with torch.no_grad():
        targets = block_output(block(inputs, **kwargs))
    schemes = resolve_schemes("block", block, QuantScheme(bits=args.bits, group_size=args.group_size))
    linears = block_linears(block)
    tunables = {n: TunableWeight.from_linear(linears[n], s, learn=True) for n, s in schemes.items()}
    for prm in block.parameters():
        prm.requires_grad_(False)
    parts: dict[str, list[float]] = {k: [] for k in ("gather", "qdq", "forward", "backward", "update")}
    gen = torch.Generator().manual_seed(0)
    for _ in range(args.steps):
        t0 = time.perf_counter()
        idx = torch.randperm(inputs.shape[0], generator=gen)[:batch]
        x, y = inputs[idx], targets[idx]
        t1 = time.perf_counter()
        weights = {f"{n}.weight": t.fake_quant_weight(x.dtype) for n, t in tunables.items()}
        t2 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp):
            out = block_output(functional_call(block, weights, (x,), kwargs))
        loss = torch.nn.functional.mse_loss(out.float(), y)
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        sign_step([q for t in tunables.values() for q in t.params()], 1e-3)
        t5 = time.perf_counter()
        for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            parts[key].append(value)
    med = {k: statistics.median(v[2:]) for k, v in parts.items()}
    total = sum(med.values())
    flops = step_flops(block, batch, seqlen, model.config)
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    shapes = [(batch * seqlen, hidden, inter), (batch * seqlen, inter, hidden), (batch * seqlen, hidden, hidden)]
    fp32 = statistics.median(matmul_rate(*s, torch.float32) for s in shapes)
    bf16 = statistics.median(matmul_rate(*s, torch.bfloat16) for s in shapes)
    ref, ref_name = (bf16, "bfloat16") if args.amp else (fp32, "float32")
    mode = "bfloat16 autocast" if args.amp else "float32"
    lines = [f"one SignRound step ({mode}) on {args.model} block 0, W{args.bits}G{args.group_size}, "
             f"{batch} x {seqlen} tokens, {torch.get_num_threads()} threads"]  # fmt: skip
    lines += [f"  {k:<9} {v * 1e3:8.1f} ms  {100 * v / total:5.1f}%" for k, v in med.items()]
    lines.append(f"  total     {total * 1e3:8.1f} ms; {flops / 1e9:.1f} GFLOP -> {flops / total / 1e9:.0f} GFLOP/s")
    lines.append(f"machine matmul rate on the block's shapes: float32 {fp32:.0f} GFLOP/s, bfloat16 {bf16:.0f} GFLOP/s")
    lines.append(f"step reaches {100 * flops / total / 1e9 / ref:.0f}% of the {ref_name} matmul rate")
    print("\n".join(lines))
    if args.out:
        command = "python " + shlex.join(["bench/profile_step.py", *sys.argv[1:]])
        with Path(args.out).open("a") as f:
            f.write(f"\n`{command}`\n\n```\n" + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
