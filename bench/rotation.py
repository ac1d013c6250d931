"""Rotation benchmark (not a test): SmolLM2-135M without rotation and with ``--rotate folded|online``
(signround/model/rotate.py), at W4A4 (INT4 per token, FP4 per token, INT4 static per channel) and weight-only
W2 / W3, RTN or SignRound, each scored by signround's perplexity code on the first ``--max-windows``
wikitext-2 windows of 2048. Writes bench/results/rotation.{md,json} (``--out``) after every row (one row per run:
weights, acts, rotate, rotation, smooth, act_clip, method, ppl, float_ppl, eval_windows). ``--act-clip 1,0.9``
adds rows with the per-token activations clipped (their label gains ``-clip0.9``); ``--smooth`` smooths the
activation rows (``-smooth``).

    python bench/rotation.py --work bench/work/rotation --methods rtn,signround --rotations none,online

Weights are INT G128 symmetric (SmolLM2's 576-wide rows end in a partial group, which the native format holds).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, ROOT, beside, cached_signround, git_commit, machine, signround_eval  # noqa: E402

# (weights label, bits, acts label, activation flags)
CONFIGS = [
    ("W4G128-sym", 4, "A4-int-token", ["--act-bits", "4"]),
    ("W4G128-sym", 4, "A4-fp4-token", ["--act-dtype", "fp4_e2m1"]),
    ("W4G128-sym", 4, "A4-int-channel", ["--act-bits", "4", "--act-granularity", "channel"]),
    ("W2G128-sym", 2, "A16", []),
    ("W3G128-sym", 3, "A16", []),
]
CONFIGS = CONFIGS[:2] + CONFIGS[3:] + CONFIGS[2:3]  # the static per-channel row last: the others first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default=str(DATA / "calib-c4.jsonl"))
    p.add_argument("--methods", default="rtn", help="rtn, signround or both (comma-separated)")
    p.add_argument("--iters", type=int, default=50, help="SignRound rows' iterations")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=10)
    p.add_argument("--rotations", default="none,online", help="none, folded, online (comma-separated)")
    p.add_argument("--act-clip", default="1", help="per-token activations' clip ratios (--act-clip), comma-separated")
    p.add_argument("--smooth", action="store_true", help="--smooth on the activation rows (label gains -smooth)")
    p.add_argument(
        "--only",
        default=None,
        help="comma-separated weights/acts labels (W4G128-sym/A4-int-token, "
        "every clip ratio; W4G128-sym/A4-int-token-clip0.9, that one)",
    )
    p.add_argument("--work", required=True)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "rotation"))
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ppl = ["--ppl", "wikitext2", "--max-windows", str(args.max_windows)]
    floating = signround_eval(args.model, work / f"float-{args.max_windows}.json", ppl)["ppl"]
    only = set(args.only.split(",")) if args.only else None
    rows = []
    command = "python bench/rotation.py " + " ".join(sys.argv[1:])
    meta = {"command": command, "commit": git_commit(), "machine": machine(), "float_ppl": floating}
    clips = [float(c) for c in args.act_clip.split(",")]
    variants = [(*c, clip) for c in CONFIGS for clip in (clips if c[2].endswith("-token") else [1.0])]
    for weights, bits, base, act_flags, clip in variants:
        acts = f"{base}-clip{clip:g}" if clip != 1.0 else base
        if only is not None and f"{weights}/{base}" not in only and f"{weights}/{acts}" not in only:
            continue  # a base label selects every clip ratio of it, a clipped label that one
        if clip != 1.0:
            act_flags = [*act_flags, "--act-clip", f"{clip:g}"]
        smooth = args.smooth and acts != "A16"
        if smooth:
            act_flags, acts = [*act_flags, "--smooth"], f"{acts}-smooth"
        for method in args.methods.split(","):
            for rotation in args.rotations.split(","):
                name = f"{weights}-{acts}-{method}-{ROT_NAMES[rotation]}"
                out = work / name
                iters = args.iters if method == "signround" else 0
                cmd = [sys.executable, "-m", "signround.cli", "quantize", "--model", args.model, "--bits", str(bits),
                       "--group-size", "128", "--sym", "--iters", str(iters), "--nsamples", str(args.nsamples),
                       "--seqlen", str(args.seqlen), "--batch-size", "4", "--dataset", args.dataset, *act_flags,
                       *(["--rotate", rotation] if rotation != "none" else []), "--output", str(out), "--overwrite",
                       "--quiet", "--report", str(beside(out, ".report.json"))]  # fmt: skip
                cached_signround(cmd, beside(out, ".report.json"), args.dataset, beside(out, ".log"))
                res = signround_eval(str(out), beside(out, f".ppl{args.max_windows}.json"), ppl)
                rows.append({"weights": weights, "acts": acts, "rotate": rotation != "none", "rotation": rotation,
                             "smooth": smooth, "act_clip": clip, "method": method, "iters": iters, "ppl": res["ppl"],
                             "float_ppl": floating, "eval_windows": res["windows"]})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
                write(args, meta, rows)


ROT_NAMES = {"none": "plain", "folded": "rot", "online": "online"}


def write(args, meta: dict, rows: list[dict]) -> None:
    """rotation.{md,json} of the rows so far: one table line per (weights, acts, method), a column per rotation."""
    floating = meta["float_ppl"]
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    rotations = args.rotations.split(",")
    head = " | ".join(f"{r}" for r in rotations)
    ratios = " | ".join(f"{r} / float" for r in rotations)
    lines = [
        "# Rotation (`--rotate`) on SmolLM2-135M", "",
        f"Command: `{meta['command']}` (commit {meta['commit']}, {meta['machine']}).", "",
        f"Perplexity on the first {args.max_windows} wikitext-2 windows of 2048 (float {floating:.3f}); INT G128 "
        f"symmetric weights; calibration {args.nsamples} x {args.seqlen} tokens of calib-c4.jsonl, SignRound "
        f"{args.iters} iterations, batch 4 (RTN rows: round to nearest, no calibration, except the static "
        "per-channel activation scales). `folded`: randomized Hadamard of the residual stream and of each head's "
        "values, folded into the weights (an ordinary model); `online`: also down_proj's input, rotated at run "
        "time (native format only). `-clip0.9` activations: each token scaled by 0.9 of its absmax "
        "(`--act-clip`); `-smooth`: `--smooth` (searched smoothing scales folded into the norms first; under "
        "`online` not into down_proj's input).", "",
        f"| weights | activations | method | {head} | {ratios} |",
        "|---|---|---|" + "---:|" * (2 * len(rotations)),
    ]  # fmt: skip
    keys = []
    for r in rows:
        key = (r["weights"], r["acts"], r["method"])
        if key not in keys:
            keys.append(key)
    for key in keys:
        got = {r["rotation"]: r["ppl"] for r in rows if (r["weights"], r["acts"], r["method"]) == key}
        cells = [f"{got[r]:.2f}" if r in got else "not run" for r in rotations]
        cells += [f"{got[r] / floating:.2f}x" if r in got else "" for r in rotations]
        lines.append(f"| {' | '.join(key)} | {' | '.join(cells)} |")
    lines += [
        "",
        "Issue 30's targets (W4A4 with rotation + SignRound: INT4 per token <= 2x float, FP4 <= 1.6x) are judged "
        "on the SignRound rows; RTN rows show what the rotation alone does. Times are not quoted. Rows with a "
        "per-token clip ratio (`--act-clip`) are in rotation-clip.md (`--out bench/results/rotation-clip`).",
    ]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
