"""vLLM serving check (not a test; needs a CUDA GPU and the ``vllm`` package): SmolLM2-135M exported by signround
in the formats vLLM serves, each loaded by ``vllm.LLM`` as it is, its perplexity (from prompt log-probabilities
on the same wikitext-2 windows) and greedy generations set beside signround's own. Writes
bench/results/serving-<gpu>.{md,json}.

    python bench/serving_vllm.py --work /tmp/serve --max-windows 20

Checkpoints are round-to-nearest (``--iters 0``: the point is reader agreement, not tuning quality), each written
by one ``signround quantize --format native,<format>`` run: compressed-tensors W4G64-sym (``pack-quantized``,
vLLM's WNA16), GPTQ W4G64-sym, and the activation schemes (W8A8 int8, FP8_DYNAMIC, FP8 static) as
compressed-tensors. signround scores the native folder in float32 on the GPU; vLLM runs its own kernels in
``--dtype`` (bfloat16 by default), so perplexities agree to the few-percent level of that precision, and greedy
texts to their first divergence. The number reported per format is vLLM's and signround's perplexity and the
count of matching leading generated tokens.

Not run yet: this project's GPU machines carry no vLLM and reach no network, and vLLM's wheels are larger than
what a call can carry (bench/results/NOTES.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, ROOT, git_commit, sh  # noqa: E402

CHECKS = [  # (label, quantize flags, exported format)
    ("W4G64-sym", ["--bits", "4", "--group-size", "64", "--sym"], "compressed-tensors"),
    ("W4G64-sym", ["--bits", "4", "--group-size", "64", "--sym"], "gptq"),
    ("W8A8", ["--scheme", "W8A8"], "compressed-tensors"),
    ("FP8_DYNAMIC", ["--scheme", "FP8_DYNAMIC"], "compressed-tensors"),
    ("FP8", ["--scheme", "FP8"], "compressed-tensors"),
]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "In 1905, Albert Einstein"]


def vllm_scores(folder: Path, windows: list[list[int]], dtype: str, new_tokens: int) -> dict:
    """vLLM's perplexity of ``windows`` (token ids) and its greedy continuations of :data:`PROMPTS`."""
    import math

    from vllm import LLM, SamplingParams

    llm = LLM(model=str(folder), dtype=dtype, max_model_len=len(windows[0]) + 8, enforce_eager=True,
              gpu_memory_utilization=0.5)  # fmt: skip
    outs = llm.generate([{"prompt_token_ids": w} for w in windows], SamplingParams(max_tokens=1, prompt_logprobs=0))
    nll, count = 0.0, 0
    for w, out in zip(windows, outs, strict=True):
        for pos in range(1, len(w)):  # position 0 has no context
            nll -= out.prompt_logprobs[pos][w[pos]].logprob
            count += 1
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=new_tokens))
    return {"ppl": math.exp(nll / count), "generations": [g.outputs[0].token_ids for g in greedy]}


def ours(folder: Path, windows: list[list[int]], new_tokens: int) -> dict:
    import torch

    from signround.eval.ppl import window_nll
    from signround.model.load import load_model

    model, tokenizer = load_model(str(folder))
    model.to("cuda").eval()
    ids = torch.tensor(windows)
    nll = window_nll(model, ids, progress=False)
    gens = []
    for prompt in PROMPTS:
        x = tokenizer(prompt, return_tensors="pt").input_ids.to("cuda")
        out = model.generate(x, do_sample=False, max_new_tokens=new_tokens, attention_mask=torch.ones_like(x),
                             pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        gens.append(out[0, x.shape[1] :].tolist())
    return {"ppl": float(torch.exp(nll.sum() / (ids.numel() - ids.shape[0]))), "generations": gens}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--work", required=True)
    p.add_argument("--max-windows", type=int, default=20)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    import torch

    from signround.eval.ppl import tokenize_windows
    from signround.model.load import load_model

    gpu = torch.cuda.get_device_name(0)
    import vllm

    _, tokenizer = load_model(args.model)
    text = (DATA / "wikitext2-test.raw").read_text(encoding="utf-8")
    windows = tokenize_windows(text, tokenizer, args.seqlen, args.max_windows).tolist()
    work = Path(args.work)
    rows = []
    for label, flags, fmt in CHECKS:
        out = work / f"{label}-{fmt}"
        if not out.exists():
            sh([sys.executable, "-m", "signround.cli", "quantize", "--model", args.model, *flags, "--iters", "0",
                "--format", f"native,{fmt}", "--output", str(out), "--device", "cuda", "--quiet"])  # fmt: skip
        mine = ours(out / "native", windows, args.new_tokens)
        row = {"label": label, "format": fmt, "signround_ppl": mine["ppl"]}
        try:
            served = vllm_scores(out / fmt, windows, args.dtype, args.new_tokens)
        except Exception as exc:  # a reader that refuses the folder is a result, recorded with its error
            row["vllm_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        else:
            row["vllm_ppl"] = served["ppl"]
            row["greedy_common_tokens"] = [
                common_prefix(a, b) for a, b in zip(mine["generations"], served["generations"], strict=True)
            ]
        rows.append(row)
        print(json.dumps(row), flush=True)
    name = "serving-" + gpu.lower().replace("nvidia ", "").replace(" ", "-")
    command = "python bench/serving_vllm.py " + " ".join(sys.argv[1:])
    meta = {"command": command, "commit": git_commit(), "gpu": gpu, "vllm": vllm.__version__,
            "windows": len(windows), "seqlen": args.seqlen, "dtype": args.dtype}  # fmt: skip
    Path(args.results, name + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# vLLM {vllm.__version__} serves signround's exports: SmolLM2-135M on {gpu}", "",
             f"Command: `{command}` (commit {meta['commit']}). RTN checkpoints; {len(windows)} wikitext-2 windows of "
             f"{args.seqlen}; vLLM in {args.dtype}, signround in float32. Greedy: matching leading tokens of "
             f"{args.new_tokens}, per prompt.", "",
             "| checkpoint | format | signround ppl | vLLM ppl | greedy tokens in common |",
             "|---|---|---:|---:|---|"]  # fmt: skip
    for r in rows:
        served = f"{r['vllm_ppl']:.3f}" if "vllm_ppl" in r else f"fails: {r['vllm_error']}"
        common = ", ".join(map(str, r.get("greedy_common_tokens", []))) or "-"
        lines.append(f"| {r['label']} | {r['format']} | {r['signround_ppl']:.3f} | {served} | {common} |")
    Path(args.results, name + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as exc:
        sys.exit(f"a signround run failed: {exc}")
