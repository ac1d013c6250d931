"""What the held-out check (``--holdout``) costs and saves (not a test).

SmolLM2-135M at W3G128-asym, each setting with and without ``--holdout``: a starved one (few calibration
tokens, 2 iterations, unclipped start: the setting where tuning was seen to make blocks worse than plain
rounding) and the light budget. Each run's perplexity (signround's code, wikitext-2 test, 2048-token windows),
quantization seconds (ratio to the run without the check: same command, one after the other) and the blocks
that kept their start. Runs are cached per full recipe (bench/common.cached). Writes
bench/results/holdout.{md,json}.

    .venv/bin/python bench/holdout.py --max-windows 20
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, ROOT, beside, cached_signround, machine, signround_eval, source_sha  # noqa: E402

# name -> (flags of the setting, samples held out)
SETTINGS = {
    "starved": (["--nsamples", "4", "--seqlen", "64", "--batch-size", "2", "--iters", "2", "--init", "none"], 1),
    "light": (["--nsamples", "32", "--seqlen", "256", "--batch-size", "4", "--iters", "50"], 4),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--seeds", default="42")
    p.add_argument("--max-windows", type=int, default=20)
    p.add_argument("--work", default=str(ROOT / "bench" / "work" / "holdout"))
    p.add_argument("--name", default="holdout")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dataset = str(DATA / "calib-c4.jsonl")
    base = ["--bits", "3", "--group-size", "128", "--dataset", dataset]
    windows = ["--ppl", "wikitext2", "--seqlen", "2048", "--max-windows", str(args.max_windows)]
    rows = []
    for name in args.settings.split(","):
        flags, k = SETTINGS[name]
        for seed in (int(s) for s in args.seeds.split(",")):
            for held in (0, k):
                tag = f"{name}-s{seed}-h{held}"
                out = work / tag
                report = beside(out, ".report.json")
                cmd = [sys.executable, "-m", "signround.cli", "quantize", "--model", args.model, *base, *flags,
                       "--seed", str(seed), "--holdout", str(held), "--output", str(out), "--overwrite", "--quiet",
                       "--report", str(report)]  # fmt: skip
                rep = cached_signround(cmd, report, dataset)
                ppl = signround_eval(str(out), beside(out, f".ppl{args.max_windows}.json"), windows)["ppl"]
                checked = [b for b in rep["blocks"] if b.get("holdout")]
                rows.append({
                    "setting": name, "seed": seed, "holdout": held, "flags": base + flags, "ppl": ppl,
                    "quant_seconds": rep["seconds"], "blocks": len(rep["blocks"]),
                    "kept_start": [b["index"] for b in checked if b["holdout"]["kept_start"]],
                    "checked": len(checked),
                })  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    float_ppl = signround_eval(args.model, work / f"float.ppl{args.max_windows}.json", windows)["ppl"]
    write(rows, float_ppl, args)


def write(rows: list[dict], float_ppl: float, args: argparse.Namespace) -> None:
    results = ROOT / "bench" / "results" / args.name
    meta = {"command": shlex.join(sys.argv[1:]), "signround_source": source_sha(), "machine": machine()}
    results.with_suffix(".json").write_text(json.dumps({**meta, "float_ppl": float_ppl, "rows": rows}, indent=1))
    lines = [
        "# The held-out check (`--holdout`): what it costs and saves",
        "",
        f"Command: `.venv/bin/python bench/holdout.py {shlex.join(sys.argv[1:])}`",
        "",
        f"{meta['machine']}. SmolLM2-135M, W3G128-asym, C4 sample calibration. Perplexity: signround's code, "
        f"wikitext-2 test, {args.max_windows} windows x 2048 (float {float_ppl:.3f}). Time ratio: the run's "
        "quantization seconds over the same setting and seed without the check (one after the other).",
        "",
        "| setting | flags | seed | holdout | ppl | time ratio | blocks that kept their start |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ref = next(x for x in rows if x["setting"] == r["setting"] and x["seed"] == r["seed"] and not x["holdout"])
        kept = f"{len(r['kept_start'])} of {r['checked']}" + (f": {r['kept_start']}" if r["kept_start"] else "")
        lines.append(
            f"| {r['setting']} | `{shlex.join(SETTINGS[r['setting']][0])}` | {r['seed']} | {r['holdout']} "
            f"| {r['ppl']:.3f} | {r['quant_seconds'] / ref['quant_seconds']:.2f} | {kept if r['holdout'] else ''} |"
        )
    results.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
