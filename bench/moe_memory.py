"""Memory of a mixture-of-experts run (not a test): peak RSS and time of ``signround quantize`` on synthetic
Qwen3-MoE models with many experts (64 and 128, top-8) against a dense Qwen3 of the same total size (the
dense MLP's width is experts x expert width), all else equal.

Each run is its own process (peak RSS is its ``VmHWM``, from ``--report``). Random weights (seeded), SmolLM2's
tokenizer; only memory and time mean anything. Rows whose settings match are reused from ``--work``.

    .venv/bin/python bench/moe_memory.py --work bench/work/moe-memory
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, ROOT  # noqa: E402


def build(folder: Path, experts: int, hidden: int, expert_width: int, layers: int) -> Path:
    """A seeded random Qwen3-MoE (``experts`` > 0, top-8) or dense Qwen3 (``experts == 0``, MLP width
    ``expert_width``) saved with SmolLM2's tokenizer."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from signround.model.load import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    common = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True,
    )  # fmt: skip
    if experts:
        cfg = AutoConfig.for_model(
            "qwen3_moe", **common, num_experts=experts, num_experts_per_tok=8, moe_intermediate_size=expert_width,
            intermediate_size=expert_width, decoder_sparse_step=1, norm_topk_prob=True,
        )  # fmt: skip
    else:
        cfg = AutoConfig.for_model("qwen3", **common, intermediate_size=expert_width)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name or ".mlp.gate." in name:  # from_config leaves some of these at zero
                p.copy_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run(model: Path, out: Path, flags: list[str]) -> dict:
    report = out.with_suffix(".report.json")
    cmd = [str(ROOT / ".venv/bin/signround"), "quantize", "--model", str(model), "--output", str(out),
           "--report", str(report), "--quiet", *flags]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    r = json.loads(report.read_text())
    return {"peak_rss_gb": r["peak_rss_gb"], "seconds": r["seconds"], "wall_s": time.perf_counter() - t0,
            "command": shlex.join(cmd)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--total-width", type=int, default=8192, help="experts x expert width = dense MLP width")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "moe-memory"))
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    flags = ["--bits", "4", "--group-size", "128", "--iters", str(args.iters), "--nsamples", "16", "--seqlen", "256",
             "--batch-size", "4", "--dataset", str(DATA / "calib-c4.jsonl")]  # fmt: skip
    rows = []
    for experts in (0, 64, 128):
        width = args.total_width // max(experts, 1)
        name = f"{'dense' if not experts else f'moe{experts}'}-h{args.hidden}-w{width}-l{args.layers}"
        model = build(work / name, experts, args.hidden, width, args.layers)
        key = work / f"{name}-i{args.iters}.row.json"
        if key.is_file() and json.loads(key.read_text())["flags"] == flags:
            row = json.loads(key.read_text())
        else:
            row = {"model": name, "experts": experts, "expert_width": width, "flags": flags,
                   **run(model, work / f"{name}-out", flags)}  # fmt: skip
            key.write_text(json.dumps(row, indent=1))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "command"}))
    write(rows, args)


def write(rows: list[dict], args: argparse.Namespace) -> None:
    results = Path(args.results)
    results.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    dense = rows[0]
    lines = [
        "# Peak memory of a mixture-of-experts run against a dense model of the same size",
        "",
        f"Command: `.venv/bin/python bench/moe_memory.py {' '.join(sys.argv[1:])}`",
        "",
        f"Synthetic models (random weights), hidden {args.hidden}, {args.layers} layers; the MoE MLPs have "
        f"experts x expert width = {args.total_width} = the dense MLP's width (top-8 routing). signround flags: "
        f"`{' '.join(rows[0]['flags'])}`. Peak RSS is each process's VmHWM; times are ratios to the dense row "
        "from one run of this script (this VM's speed drifts).",
        "",
        "| model | experts | expert width | peak RSS GB | x dense | time x dense |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['experts']} | {r['expert_width']} | {r['peak_rss_gb']:.3f} | "
            f"{r['peak_rss_gb'] / dense['peak_rss_gb']:.2f} | {r['seconds'] / dense['seconds']:.2f} |"
        )
    results.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
