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
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_recipe_args, config_name, parse_configs, recipe_from, signround_eval, signround_quantize  # noqa: E402,I001


def window_args(args: argparse.Namespace) -> list[str]:
    return ["--max-windows", str(args.max_windows)] if args.max_windows else []


def float_row(args: argparse.Namespace, work: Path) -> dict:
    ppl = signround_eval(
        args.model, work / "float.json", ["--ppl", "wikitext2", "--seqlen", str(args.eval_seqlen), *window_args(args)]
    )
    return {
        "config": "float",
        "tool": "float",
        "ppl": ppl["ppl"],
        "eval_windows": ppl["windows"],
        "quant_seconds": None,
        "peak_rss_gb": None,
        "iters": 0,
    }


def quant_row(args: argparse.Namespace, work: Path, bits: int, group: int, method: str) -> dict:
    name = config_name(bits, group, args.sym)
    iters = args.iters if method == "signround" else 0
    flags = ["--eval-ppl", "wikitext2", "--eval-seqlen", str(args.eval_seqlen)]
    flags += ["--eval-max-windows", str(args.max_windows)] if args.max_windows else []
    r = signround_quantize(recipe_from(args), bits, group, args.sym, method, iters, work / f"{name}-{method}", flags)
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
        f"Model `{args.model}`; calibration `{Path(args.dataset).name}` "
        f"({args.nsamples} samples x {args.seqlen} tokens, batch "
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
    add_recipe_args(p)
    p.add_argument("--sym", action="store_true")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--name", default="smollm2")
    p.add_argument("--work", default=None, help="folder for checkpoints (default: a temporary folder)")
    p.add_argument("--tabulate-only", action="store_true", help="only tabulate rows already finished in --work")
    args = p.parse_args()
    # --tabulate-only only re-renders rows the same command produced; it is not part of that command.
    command = "python bench/quality.py " + shlex.join(a for a in sys.argv[1:] if a != "--tabulate-only")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="signround-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = [float_row(args, work)]

    def flush() -> None:
        (results / f"{args.name}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
        (results / f"{args.name}.md").write_text(render(rows, args, command))

    flush()
    for bits, group in parse_configs(args.configs):
        for method in ("rtn", "signround"):
            report = work / f"{config_name(bits, group, args.sym)}-{method}.json"
            if args.tabulate_only and not report.is_file():
                print(f"not run yet (left out of the table): {report.name}")
                continue
            rows.append(quant_row(args, work, bits, group, method))
            flush()
    print(render(rows, args, command))


if __name__ == "__main__":
    main()
