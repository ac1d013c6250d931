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
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ROOT,
    add_recipe_args,
    autoround_quantize,
    config_name,
    parse_configs,
    recipe_from,
    signround_eval,
    signround_quantize,
)

TASKS = "lambada_openai,piqa,winogrande,hellaswag,arc_easy,arc_challenge,boolq"
DERIVED = {"hellaswag", "arc_easy", "arc_challenge", "boolq"}


def score(args: argparse.Namespace, model: str, label: str) -> dict:
    flags = ["--tasks", args.tasks, "--limit", str(args.limit)]
    return signround_eval(model, Path(args.work) / f"zeroshot-{label}-limit{args.limit}.json", flags)


def task_columns(tasks: list[str]) -> str:
    """The tasks' table header cells, derived-data tasks starred."""
    return " | ".join(f"{t}{'*' if t in DERIVED else ''}" for t in tasks)


def render(rows: list[tuple[str, str, dict]], args: argparse.Namespace, command: str) -> str:
    tasks = args.tasks.split(",")
    head = task_columns(tasks)
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
    errs = [t["acc_stderr"] for _, _, r in rows for t in r["tasks"] if t.get("acc_stderr")]
    if errs:
        n = len(tasks)
        lines += [
            "",
            f"Standard errors (lm-eval's): per task {min(errs):.3f} to {max(errs):.3f}; of a {n}-task average "
            f"about {(sum(e * e for e in errs) / len(errs) / n) ** 0.5:.3f}. Differences smaller than about twice "
            "that are noise.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_recipe_args(p)
    p.add_argument("--autoround-configs", default="4:128", help="bits:group pairs also run with auto-round")
    p.add_argument("--sym", action="store_true")
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
    recipe = recipe_from(args)
    work = Path(args.work)
    ar_pairs = set(parse_configs(args.autoround_configs))
    for bits, group in parse_configs(args.configs):
        name = config_name(bits, group, args.sym)
        for method in ("rtn", "signround"):
            iters = args.iters if method == "signround" else 0
            signround_quantize(recipe, bits, group, args.sym, method, iters, work / f"{name}-{method}", [])
            rows.append((name, method, score(args, str(work / f"{name}-{method}"), f"{name}-{method}")))
            flush()
        if (bits, group) in ar_pairs:
            autoround_quantize(recipe, bits, group, args.sym, args.iters, work / f"{name}-autoround")
            rows.append((name, "auto-round", score(args, str(work / f"{name}-autoround"), f"{name}-autoround")))
            flush()
    print(render(rows, args, command))


if __name__ == "__main__":
    main()
