"""Tuning speed on one LLaMA-3-8B-shaped decoder block: signround vs auto-round 0.16.1 (not a test).

Builds a one-block LLaMA model with 8B shapes (hidden 4096, intermediate 14336, 32 heads, 8 KV heads; random
weights: a timing, not a quality, run), then quantizes it with each tool at ``--iters`` N1 and N2 (after one
uncounted warm-up run at N1), on the same calibration texts. Each tool's rate is (N2 - N1) / (T2 - T1)
iterations per second, where T is the tool's own quantization wall time: the difference cancels what does
not scale with the iterations (loading, calibration, packing), so the rate is the tuning loop's alone. Both
tools run as they do by default on a GPU (signround: a bfloat16 model; auto-round: ``amp=True``). Also
measures this device's bfloat16 matrix-product rate, to say what fraction of it a tuning step reaches
(6 x params x tokens FLOPs per step: the forward, and the gradients of the inputs and of the weights;
attention products not counted).

    python bench/gpu_block_timing.py --tokenizer ~/.cache/signround/smollm2-135m --work /tmp/blk

Writes ``<results>/<name>.{md,json}`` (``--name``, default ``gpu-block-timing``). ``--tools
signround,signround-last,auto-round`` adds signround ``--use-last`` (no per-step host read of the loss on a GPU);
``auto-round-eager`` is auto-round with ``enable_torch_compile=False`` (it compiles by default, also on the CPU),
to tell how much of its step rate is compilation.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, ROOT, Recipe, autoround_quantize, machine, signround_quantize  # noqa: E402

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2),  # dry runs
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3),
}
# signround variants this script can time, with their extra CLI flags (auto-round runs on its own path)
TOOL_FLAGS = {"signround": [], "signround-last": ["--use-last"], "signround-compile": ["--enable-torch-compile"]}
# auto-round variants: extra flags of bench/autoround_run.py
AUTOROUND_FLAGS = {"auto-round": [], "auto-round-eager": ["--no-compile"]}
SHAPE_NAMES = {"8b": "LLaMA-8B-shaped", "tiny": "tiny (dry-run)", "smollm2": "SmolLM2-135M-shaped"}


def block_linear_weights(shape: str) -> int:
    """Weights in one block's seven linears: q and o ``[h, h]``, k and v ``[kv, h]``, gate, up and down
    ``[i, h]``, with ``kv = h / heads * kv_heads``."""
    d = SHAPES[shape]
    h, i = d["hidden_size"], d["intermediate_size"]
    kv = h // d["num_attention_heads"] * d["num_key_value_heads"]
    return 2 * h * h + 2 * kv * h + 3 * i * h


def build_block_model(folder: Path, tokenizer: str, shape: str, device: str) -> None:
    """A one-block LLaMA with ``shape`` and random weights, saved in bfloat16 with ``tokenizer`` (once)."""
    if (folder / "config.json").is_file():
        return
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    cfg = LlamaConfig(**SHAPES[shape], num_hidden_layers=1, vocab_size=len(tok), max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def matmul_tflops(n: int = 8192, reps: int = 20) -> float | None:
    """bfloat16 ``n^3`` matrix-product rate of this GPU through torch (random data; median of ``reps``);
    None without a GPU."""
    if not torch.cuda.is_available():
        return None
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="folder with a tokenizer (its vocabulary sizes the model)")
    p.add_argument("--dataset", default=str(DATA / "calib-c4.jsonl"))
    p.add_argument("--iters", default="10,110", help="N1,N2")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--work", required=True)
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--name", default="gpu-block-timing", help="file name stem of the results")
    p.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only for a dry run of the script")
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b", help="tiny: a dry run of the script")
    p.add_argument(
        "--tools",
        default="signround,auto-round",
        help="comma-separated: signround, signround-last (signround --use-last), auto-round, auto-round-eager "
        "(auto-round with enable_torch_compile=False)",
    )
    args = p.parse_args()
    tools = args.tools.split(",")
    if unknown := set(tools) - set(TOOL_FLAGS) - set(AUTOROUND_FLAGS):
        known = ", ".join([*TOOL_FLAGS, *AUTOROUND_FLAGS])
        raise SystemExit(f"unknown --tools {', '.join(sorted(unknown))}; choose from {known}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_block_timing needs a CUDA device (or --device cpu --shape tiny for a dry run)")
    n1, n2 = (int(x) for x in args.iters.split(","))
    work = Path(args.work) / args.shape  # runs are reused from here: one folder per shape
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "block-model"
    build_block_model(folder, args.tokenizer, args.shape, args.device)
    params = block_linear_weights(args.shape)
    peak = matmul_tflops()
    recipe = Recipe(str(folder), args.dataset, args.nsamples, args.seqlen, args.batch_size, 42)
    tokens = args.batch_size * args.seqlen
    rows = []
    gpu = args.device.startswith("cuda")
    for tool in tools:
        runs = {}
        try:
            # a first, uncounted run at N1 warms what a cold process pays once (page cache, kernel caches):
            # on the H200 auto-round's first run took 34 s at 10 iterations and its next 18 s at 110
            for iters, tag in ((n1, "warmup"), (n1, str(n1)), (n2, str(n2))):
                out = work / f"{tool}-{tag}"
                if tool in TOOL_FLAGS:
                    flags = ["--device", args.device, *TOOL_FLAGS[tool]]
                    rep = signround_quantize(recipe, args.bits, args.group_size, False, "signround", iters, out, flags)
                    shutil.rmtree(out, ignore_errors=True)
                else:  # auto-round tunes on cuda:0 when torch sees a GPU; amp is its default there
                    extra = ("--no-save", *AUTOROUND_FLAGS[tool])
                    rep = autoround_quantize(recipe, args.bits, args.group_size, False, iters, out, gpu, extra)
                if tag != "warmup":
                    runs[iters] = rep
                print(f"{tool} {tag} ({iters} iters): {rep['seconds']:.2f} s, peak GPU {rep.get('peak_gpu_gb')} GB")
        except subprocess.CalledProcessError as exc:  # keep the other tool's numbers; say which run failed
            print(f"{tool} failed: {exc}", file=sys.stderr, flush=True)
            continue
        step = (runs[n2]["seconds"] - runs[n1]["seconds"]) / (n2 - n1)
        rows.append(
            {
                "tool": tool,
                "seconds": {str(k): v["seconds"] for k, v in runs.items()},
                "step_ms": step * 1e3,
                "iters_per_s": 1 / step,
                "step_tflops": 6 * params * tokens / step / 1e12,
                "peak_gpu_gb": runs[n2].get("peak_gpu_gb"),
                "peak_rss_gb": runs[n2].get("peak_rss_gb"),
            }
        )
    info = {
        "command": "python bench/gpu_block_timing.py " + shlex.join(sys.argv[1:]),
        "gpu": torch.cuda.get_device_name() if gpu else f"none (run on {args.device})",
        "cpu": f"CPU: {machine()}; ",
        "torch": torch.__version__,
        "bf16_matmul_tflops": peak,
        "block_linear_params": params,
        "tokens_per_step": tokens,
        "shape": args.shape,
        "scheme": f"W{args.bits}G{args.group_size} asym",
        "nsamples": args.nsamples,
        "iters": [n1, n2],
        "tools": tools,
        "rows": rows,
    }
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{args.name}.json").write_text(json.dumps(info, indent=2) + "\n")
    (results / f"{args.name}.md").write_text(render(info))
    print(render(info))


def render(info: dict) -> str:
    by_tool = {r["tool"]: r for r in info["rows"]}
    peak = info["bf16_matmul_tflops"]
    lines = [
        f"# One {SHAPE_NAMES[info.get('shape', '8b')]} block: tuning speed, signround vs auto-round 0.16.1",
        "",
        f"Command: `{info['command']}`",
        "",
        f"GPU: {info['gpu']} (torch {info['torch']}); {info.get('cpu', '')}"
        "its bfloat16 8192^3 matrix-product rate here: "
        + ("not measured" if peak is None else f"{peak:.0f} TFLOP/s")
        + f". Block: {info['shape']} shape {SHAPES[info['shape']]} "
        f"({info['block_linear_params'] / 1e6:.1f} M linear weights), random weights; {info['scheme']}; "
        f"{info['nsamples']} calibration samples, {info['tokens_per_step']} tokens per step. Each tool quantized "
        f"at {info['iters'][0]} and {info['iters'][1]} iterations; the per-step time is the difference of its "
        "wall times over the difference of iterations. "
        + (
            "Both in float32 (their CPU defaults). "
            if info["gpu"].startswith("none")
            else "Both in their GPU defaults (signround: bfloat16 model; auto-round: amp). "
        )
        + "Step TFLOP/s counts 6 x weights x tokens (attention products not counted).",
        "",
        "| tool | wall s (N1 / N2) | ms per step | iterations/s | step TFLOP/s | of matmul rate | peak GPU GB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in info["rows"]:
        secs = " / ".join(f"{v:.1f}" for v in r["seconds"].values())
        if r["step_ms"] <= 0:  # wall time did not grow with the iterations: fixed costs varied between runs
            lines.append(f"| {r['tool']} | {secs} | not measured (T2 <= T1) | | | | |")
            continue
        gpu = "" if r["peak_gpu_gb"] is None else f"{r['peak_gpu_gb']:.2f}"
        lines.append(
            f"| {r['tool']} | {secs} | {r['step_ms']:.1f} | {r['iters_per_s']:.2f} | {r['step_tflops']:.1f} | "
            + ("" if peak is None else f"{r['step_tflops'] / peak:.0%}")
            + f" | {gpu} |"
        )
    if all(t in by_tool for t in ("signround", "auto-round")):
        n2 = str(info["iters"][1])
        sr_s, ar_s = by_tool["signround"]["seconds"][n2], by_tool["auto-round"]["seconds"][n2]
        lines += ["", f"Wall time at {n2} iterations, signround / auto-round: {sr_s / ar_s:.2f}."]
    last, best = by_tool.get("signround-last"), by_tool.get("signround")
    if last and best and last["step_ms"] > 0 and best["step_ms"] > 0:
        lines += ["", f"Time per step, signround --use-last / signround: {last['step_ms'] / best['step_ms']:.2f}."]
    missing = set(info.get("tools", ["signround", "auto-round"])) - set(by_tool)
    if missing:
        lines += ["", f"No rate for {', '.join(sorted(missing))}: its run failed (see the command's output)."]
    if missing or not {"signround", "auto-round"} <= set(by_tool):
        return "\n".join(lines) + "\n"
    sr, ar = by_tool["signround"], by_tool["auto-round"]
    if sr["step_ms"] <= 0 or ar["step_ms"] <= 0:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        f"Ratio signround / auto-round: time per step {sr['step_ms'] / ar['step_ms']:.2f}, "
        f"iterations per second {sr['iters_per_s'] / ar['iters_per_s']:.2f}"
        + (
            f", peak GPU memory {sr['peak_gpu_gb'] / ar['peak_gpu_gb']:.2f}."
            if sr["peak_gpu_gb"] and ar["peak_gpu_gb"]
            else "."
        ),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
