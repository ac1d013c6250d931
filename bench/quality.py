"""Quality benchmark (not a test): wikitext-2 perplexity of float, RTN and SignRound on one model.

Every quantization runs as its own ``signround quantize`` process, so its wall time and peak RSS are its
own; every model is scored by the same ``signround`` perplexity code. Results are written after every row
(``bench/results/<name>.json`` and ``.md``), so an interrupted run keeps what it finished.

    python bench/quality.py                          # the full recipe: iters 200, 128 x 256, all windows
    python bench/quality.py --iters 50 --max-windows 40 --name smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def sh(cmd: list[str]) -> None:
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=sys.stdout, stderr=subprocess.DEVNULL)


def float_row(args: argparse.Namespace, work: Path) -> dict:
    out = work / "float.json"
    # Rows already finished in --work are reused, so a stopped benchmark resumes where it was.
    if not out.is_file():
        # fmt: off
        sh([sys.executable, "-m", "signround.cli", "eval", "--model", args.model, "--ppl", "wikitext2",
            "--seqlen", str(args.eval_seqlen), "--json", str(out), "--quiet", *window_args(args)])
        # fmt: on
    ppl = json.loads(out.read_text())
    return {
        "config": "float",
        "tool": "float",
        "ppl": ppl["ppl"],
        "eval_windows": ppl["windows"],
        "quant_seconds": None,
        "peak_rss_gb": None,
        "iters": 0,
    }


def window_args(args: argparse.Namespace) -> list[str]:
    return ["--max-windows", str(args.max_windows)] if args.max_windows else []


def quant_row(args: argparse.Namespace, work: Path, bits: int, group: int, method: str) -> dict:
    name = f"W{bits}G{group}-{'sym' if args.sym else 'asym'}"
    report = work / f"{name}-{method}.json"
    iters = args.iters if method == "signround" else 0
    # fmt: off
    cmd = [sys.executable, "-m", "signround.cli", "quantize", "--model", args.model, "--bits", str(bits),
           "--group-size", str(group), "--method", method, "--iters", str(iters),
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size),
           "--seed", str(args.seed), "--dataset", args.dataset, "--output", str(work / f"{name}-{method}"),
           "--overwrite", "--quiet", "--eval-ppl", "wikitext2", "--eval-seqlen", str(args.eval_seqlen),
           "--report", str(report)]
    # fmt: on
    if args.sym:
        cmd.append("--sym")
    if args.max_windows:
        cmd += ["--eval-max-windows", str(args.max_windows)]
    if not report.is_file():
        sh(cmd)
    r = json.loads(report.read_text())
    return {
        "config": name,
        "tool": method,
        "ppl": r["ppl"]["ppl"],
        "eval_windows": r["ppl"]["windows"],
        "quant_seconds": r["seconds"],
        "peak_rss_gb": r["peak_rss_gb"],
        "iters": iters,
    }


def render(rows: list[dict], args: argparse.Namespace, command: str) -> str:
    fp = next((r["ppl"] for r in rows if r["tool"] == "float"), None)
    windows = rows[0]["eval_windows"] if rows else 0
    lines = [
        f"# {args.name}: wikitext-2 perplexity, float vs RTN vs SignRound",
        "",
        f"Command: `{command}`",
        "",
        f"Model `{args.model}`; calibration `{args.dataset}` ({args.nsamples} samples x {args.seqlen} tokens, batch "
        f"{args.batch_size}, seed {args.seed}); SignRound {args.iters} iterations per block, lr 1/iters. "
        f"Perplexity: wikitext-2 test, seqlen {args.eval_seqlen}, "
        f"{'all' if not args.max_windows else 'the first'} {windows} windows. CPU: {os.cpu_count()} cores, float32.",
        "",
        "| config | method | ppl | excess over float | gap closed vs RTN | quant s | peak RSS GB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        excess = "" if fp is None or r["tool"] == "float" else f"{r['ppl'] - fp:.3f}"
        closed = ""
        if r["tool"] == "signround" and fp is not None:
            rtn = next((x["ppl"] for x in rows if x["config"] == r["config"] and x["tool"] == "rtn"), None)
            if rtn is not None and rtn > fp:
                closed = f"{100 * (rtn - r['ppl']) / (rtn - fp):.0f}%"
        qs = "" if r["quant_seconds"] is None else f"{r['quant_seconds']:.0f}"
        rss = "" if r["peak_rss_gb"] is None else f"{r['peak_rss_gb']:.2f}"
        lines.append(f"| {r['config']} | {r['tool']} | {r['ppl']:.3f} | {excess} | {closed} | {qs} | {rss} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default=str(DATA / "calib-c4.jsonl"))
    p.add_argument("--configs", default="4:128,3:128,2:128", help="bits:group pairs")
    p.add_argument("--sym", action="store_true")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--name", default="smollm2")
    p.add_argument("--work", default=None, help="folder for checkpoints (default: a temporary folder)")
    args = p.parse_args()
    command = "python bench/quality.py " + shlex.join(sys.argv[1:])
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="signround-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = [float_row(args, work)]

    def flush() -> None:
        (results / f"{args.name}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
        (results / f"{args.name}.md").write_text(render(rows, args, command))

    flush()
    for pair in args.configs.split(","):
        bits, group = (int(x) for x in pair.split(":"))
        for method in ("rtn", "signround"):
            rows.append(quant_row(args, work, bits, group, method))
            flush()
    print(render(rows, args, command))


if __name__ == "__main__":
    main()
