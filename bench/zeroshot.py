"""Zero-shot benchmark (not a test): lm-eval accuracy of float, RTN, SignRound and auto-round models.

Every model is scored by the same ``signround eval --tasks`` code on the local task files. Quantized
checkpoints are made with the same recipe as bench/quality.py and reused from ``--work`` when present (run
quality.py with the same ``--work`` first to share them). auto-round's models come from
bench/autoround_run.py in the bench-only environment (bench/.venv-bench). Rows finished in ``--work`` are
reused, so a stopped run resumes.

    python bench/zeroshot.py --limit 200 --iters 50 --work /tmp/bench/work
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BENCH_PY = ROOT / "bench" / ".venv-bench" / "bin" / "python"
TASKS = "lambada_openai,piqa,winogrande,hellaswag,arc_easy,arc_challenge,boolq"
DERIVED = {"hellaswag", "arc_easy", "arc_challenge", "boolq"}


def sh(cmd: list[str]) -> None:
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=sys.stdout, stderr=subprocess.DEVNULL)


def signround_ckpt(args: argparse.Namespace, bits: int, group: int, method: str) -> Path:
    name = f"W{bits}G{group}-{'sym' if args.sym else 'asym'}-{method}"
    out = Path(args.work) / name
    if not (out / "config.json").is_file():
        iters = args.iters if method == "signround" else 0
        # fmt: off
        cmd = [sys.executable, "-m", "signround.cli", "quantize", "--model", args.model, "--bits", str(bits),
               "--group-size", str(group), "--method", method, "--iters", str(iters), "--nsamples",
               str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size),
               "--seed", str(args.seed), "--dataset", args.dataset, "--output", str(out), "--overwrite", "--quiet"]
        # fmt: on
        sh(cmd + (["--sym"] if args.sym else []))
    return out


def autoround_ckpt(args: argparse.Namespace, bits: int, group: int) -> Path:
    name = f"W{bits}G{group}-{'sym' if args.sym else 'asym'}-autoround"
    out = Path(args.work) / name
    if not (out / "config.json").is_file():
        if not BENCH_PY.is_file():
            raise SystemExit(f"auto-round rows need the bench environment {BENCH_PY}; see bench/requirements-bench.txt")
        from signround.model.load import resolve_model

        # fmt: off
        cmd = [str(BENCH_PY), str(ROOT / "bench" / "autoround_run.py"), "--model", resolve_model(args.model),
               "--bits", str(bits), "--group-size", str(group), "--iters", str(args.iters), "--nsamples",
               str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size), "--seed",
               str(args.seed), "--dataset", args.dataset, "--output", str(out), "--report", str(out) + ".json"]
        # fmt: on
        sh(cmd + (["--sym"] if args.sym else []))
    return out


def score(args: argparse.Namespace, model: str, label: str) -> dict:
    out = Path(args.work) / f"zeroshot-{label}.json"
    if not out.is_file():
        sh(
            [
                sys.executable,
                "-m",
                "signround.cli",
                "eval",
                "--model",
                model,
                "--tasks",
                args.tasks,
                "--limit",
                str(args.limit),
                "--json",
                str(out),
                "--quiet",
            ]
        )
    return json.loads(out.read_text())


def render(rows: list[tuple[str, str, dict]], args: argparse.Namespace, command: str) -> str:
    tasks = args.tasks.split(",")
    head = " | ".join(f"{t}{'*' if t in DERIVED else ''}" for t in tasks)
    lines = [
        "# SmolLM2-135M zero-shot accuracy (lm-eval 0.4.13, local task files)",
        "",
        f"Command: `{command}`",
        "",
        f"acc (0-shot), the first {args.limit} items of each task. Quantized models: calibration "
        f"`{Path(args.dataset).name}`, {args.nsamples} x {args.seqlen} tokens, batch {args.batch_size}, "
        f"{args.iters} iterations for SignRound and auto-round (auto-round 0.16.1, float32, same texts). "
        "`*` = derived data (converted task files; prompts rebuilt to follow lm-eval, numbers not comparable "
        "with published ones).",
        "",
        f"| config | method | {head} | average |",
        "|---|---|" + "---:|" * (len(tasks) + 1),
    ]
    for config, method, result in rows:
        accs = {t["task"]: t["acc"] for t in result["tasks"]}
        cells = " | ".join(f"{accs[t]:.3f}" for t in tasks)
        lines.append(f"| {config} | {method} | {cells} | {result['average_acc']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default=str(DATA / "calib-c4.jsonl"))
    p.add_argument("--configs", default="4:128,3:128,2:128")
    p.add_argument("--autoround-configs", default="4:128", help="bits:group pairs also run with auto-round")
    p.add_argument("--sym", action="store_true")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--work", default=None)
    args = p.parse_args()
    args.work = args.work or tempfile.mkdtemp(prefix="signround-zeroshot-")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    command = "python bench/zeroshot.py " + shlex.join(sys.argv[1:])
    results = ROOT / "bench" / "results"
    rows: list[tuple[str, str, dict]] = []

    def flush() -> None:
        (results / "zeroshot.md").write_text(render(rows, args, command))
        (results / "zeroshot.json").write_text(
            json.dumps({"command": command, "rows": [{"config": c, "method": m, **r} for c, m, r in rows]}, indent=2)
            + "\n"
        )

    rows.append(("float", "float", score(args, args.model, "float")))
    flush()
    ar_pairs = {tuple(int(x) for x in pair.split(":")) for pair in args.autoround_configs.split(",") if pair}
    for pair in args.configs.split(","):
        bits, group = (int(x) for x in pair.split(":"))
        config = f"W{bits}G{group}-{'sym' if args.sym else 'asym'}"
        for method in ("rtn", "signround"):
            ckpt = signround_ckpt(args, bits, group, method)
            rows.append((config, method, score(args, str(ckpt), f"{config}-{method}")))
            flush()
        if (bits, group) in ar_pairs:
            ckpt = autoround_ckpt(args, bits, group)
            rows.append((config, "auto-round", score(args, str(ckpt), f"{config}-autoround")))
            flush()
    print(render(rows, args, command))


if __name__ == "__main__":
    main()
