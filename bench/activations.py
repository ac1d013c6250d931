"""Activation-quantization benchmark (not a test): W8A8, W4A8, W4A4 (INT and FP activations), with and
without smoothing, RTN vs SignRound, against float and weight-only W4.

Every model is quantized by the signround CLI (native format) and scored by signround's perplexity code
(wikitext-2 test, seqlen 2048, the first ``--max-windows`` windows). Finished rows in ``--work`` are reused.

    python bench/activations.py --work /tmp/bench/work --iters 50 --nsamples 32 --batch-size 4 --max-windows 20
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_recipe_args, cached_signround, recipe_from, signround_eval  # noqa: E402

# (label, weight bits, activation flags); weights are INT G128 asymmetric throughout
CONFIGS = [
    ("W4 (weight-only)", 4, ()),
    ("W8A8 int token", 8, ("--act-bits", "8")),
    ("W4A8 int token", 4, ("--act-bits", "8")),
    ("W4A8 int channel", 4, ("--act-bits", "8", "--act-granularity", "channel")),
    ("W4A8 fp8_e4m3 token", 4, ("--act-dtype", "fp8_e4m3")),
    ("W4A4 int token", 4, ("--act-bits", "4")),
    ("W4A4 fp4_e2m1 token", 4, ("--act-dtype", "fp4_e2m1")),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(p, iters=50)
    p.add_argument("--work", required=True)
    p.add_argument("--max-windows", type=int, default=20)
    p.add_argument("--methods", default="rtn,signround")
    p.add_argument("--only", default=None, help="comma-separated labels to run (default all)")
    p.add_argument("--smooth", choices=["both", "no", "yes"], default="both", help="smoothing rows to run")
    p.add_argument(
        "--cached-only", action="store_true", help="table only the rows already finished in --work (run nothing new)"
    )
    args = p.parse_args()
    command = "python " + shlex.join(["bench/activations.py", *sys.argv[1:]])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recipe = recipe_from(args)
    windows = ["--max-windows", str(args.max_windows)]
    only = set(args.only.split(",")) if args.only else None
    float_ppl = signround_eval(args.model, work / f"float-ppl{args.max_windows}.json", windows)["ppl"]
    rows = []
    for label, bits, act in CONFIGS:
        if only is not None and label not in only:
            continue
        options = {"both": (False, True), "no": (False,), "yes": (True,)}[args.smooth]
        for smooth in options if act else (False,):
            for method in args.methods.split(","):
                tag = label.replace(" ", "_").replace("(", "").replace(")", "") + ("-smooth" if smooth else "")
                out = work / f"act-{tag}-{method}"
                report = out.with_name(out.name + ".json")
                if args.cached_only and not out.with_name(f"{out.name}-ppl{args.max_windows}.json").is_file():
                    continue
                iters = args.iters if method == "signround" else 0
                # fmt: off
                cmd = [sys.executable, "-m", "signround.cli", "quantize", "--model", recipe.model, "--bits", str(bits),
                       "--group-size", "128", "--method", method, "--iters", str(iters), *recipe.flags(), *act,
                       *(["--smooth"] if smooth else []), "--output", str(out), "--overwrite", "--quiet",
                       "--report", str(report)]
                # fmt: on
                r = cached_signround(cmd, report, recipe.dataset)
                ppl = signround_eval(str(out), out.with_name(f"{out.name}-ppl{args.max_windows}.json"), windows)["ppl"]
                rows.append(
                    {"config": label, "smooth": smooth, "method": method, "ppl": ppl, "quant_seconds": r["seconds"]}
                )
                write(args, command, float_ppl, rows)
    print((ROOT / "bench" / "results" / "activations.md").read_text())


def write(args, command: str, float_ppl: float, rows: list[dict]) -> None:
    results = ROOT / "bench" / "results"
    (results / "activations.json").write_text(
        json.dumps({"command": command, "float_ppl": float_ppl, "rows": rows}, indent=2) + "\n"
    )
    lines = [
        "# Quantized activations on SmolLM2-135M",
        "",
        f"Command: `{command}`",
        "",
        f"Weights INT G128 asymmetric; activations = the input of every quantized linear, fake-quantized. "
        f"SignRound rows: {args.nsamples} x {args.seqlen} calibration tokens, batch {args.batch_size}, {args.iters} "
        f"iterations. Perplexity: wikitext-2 test, seqlen 2048, first {args.max_windows} windows; float "
        f"{float_ppl:.3f}. CPU, float32.",
        "",
        "| config | smoothing | method | ppl | quant s |",
        "|---|---|---|---:|---:|",
    ]
    for r in rows:
        smooth = "yes" if r["smooth"] else "no"
        lines.append(f"| {r['config']} | {smooth} | {r['method']} | {r['ppl']:.3f} | {r['quant_seconds']:.0f} |")
    (results / "activations.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
