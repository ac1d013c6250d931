"""Zero-shot accuracy of compare-peers' own checkpoints (not a test): issue 27's downstream check.

For the rows of ``bench/compare_peers.py`` picked by ``--zs-configs`` / ``--zs-tools`` (with the budgets and
seeds of the same options as compare_peers), this scores the very model folder that row's perplexity came from
(kept by ``compare_peers.py --keep-models`` in ``<work>/<tag>``) with ``signround eval --tasks`` (lm-eval on the
local task files of bench/zeroshot.py), so every tool is read by the same code on the same items. A row whose
model was not kept is listed as missing, with what to do; nothing is quantized here.

Each score is written to ``<results>/compare-peers/zeroshot/<row key>-<zero-shot key>.json``; the second key
hashes the tasks, the limit, lm-eval's version and signround/eval's source, so a rerun reuses only matching
scores. The table is ``<results>/compare-peers-zeroshot.{md,json}``.

    .venv/bin/python bench/compare_peers.py --configs 2:128:asym,3:128:sym --seeds 42 --budgets light --keep-models
    .venv/bin/python bench/peers_zeroshot.py --configs 2:128:asym,3:128:sym --seeds 42 --budgets light \\
        --zs-configs 2:128:asym,3:128:sym --zs-tools float,signround,auto-round,gptq --limit 250
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import config_name, machine, recipe_key, sh, source_sha  # noqa: E402
from compare_peers import NAME, Driver, build_parser, finish_args, rel, venv_versions  # noqa: E402
from zeroshot import TASKS, task_columns  # noqa: E402

TABLE = f"{NAME}-zeroshot"


def average(scores: list[dict]) -> tuple[float, float | None]:
    """Mean accuracy over the tasks and its standard error, sqrt(sum se_i^2) / n (tasks independent)."""
    accs = [s["acc"] for s in scores]
    errs = [s.get("acc_stderr") for s in scores]
    se = None if any(e is None for e in errs) else sum(e * e for e in errs) ** 0.5 / len(errs)
    return sum(accs) / len(accs), se


def selection(d: Driver, configs: list, tools: list[str]) -> list[tuple[str, tuple | None, str, int | None]]:
    """The (tool, config, budget, seed) rows of compare_peers' schedule that this run scores, float first."""
    picked = [r for r in d.schedule() if r[0] in tools and (r[1] is None or r[1] in configs)]
    return sorted(picked, key=lambda r: r[0] != "float")


def score(d: Driver, args, row: tuple, zs: dict, out_dir: Path) -> dict:
    tool, cfg, budget, seed = row
    rkey = recipe_key(d.recipe(tool, cfg, budget, seed))
    label = f"{'float' if cfg is None else config_name(*cfg)} {tool} {budget} seed {seed}"
    base = {"config": "float" if cfg is None else config_name(*cfg), "tool": tool, "budget": budget, "seed": seed,
            "row_key": rkey}  # fmt: skip
    path = out_dir / f"{rkey}-{recipe_key(zs)}.json"
    done = json.loads(path.read_text()) if path.is_file() else None
    if done is not None and done.get("zeroshot_recipe") == zs:
        print(f"reuse {label}: {path.name}", flush=True)
        return done
    if not (d.rows_dir / f"{rkey}.json").is_file():
        return {**base, "missing": "no compare-peers row with this recipe: run compare_peers.py with these options"}
    model = d.folder if tool == "float" else str(d.work / d.tag(tool, cfg, budget, seed, rkey))
    if not Path(model).is_dir():
        return {**base, "missing": f"model not kept ({rel(model)}): delete rows/{rkey}.json and rerun "
                "compare_peers.py with --keep-models"}  # fmt: skip
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"[{stamp}] zero-shot {label}", flush=True)
    tmp = d.work / f"zeroshot-{rkey}.json"
    cmd = [sys.executable, "-m", "signround.cli", "eval", "--model", model, "--json", str(tmp), "--quiet",
           "--tasks", args.tasks, "--limit", str(args.limit)]  # fmt: skip
    sh(cmd, d.work / f"zeroshot-{rkey}.log")
    tasks = json.loads(tmp.read_text())["tasks"]
    avg, se = average(tasks)
    rec = {**base, "tasks": tasks, "average_acc": avg, "average_stderr": se, "zeroshot_recipe": zs,
           "command": rel(" ".join(cmd)), "commit": d.commit, "started": stamp,
           "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine()}  # fmt: skip
    path.write_text(json.dumps(rec, indent=1) + "\n")
    return rec


def render(args, recs: list[dict]) -> str:
    tasks = args.tasks.split(",")
    head = task_columns(tasks)
    lines = [
        "# compare-peers: zero-shot accuracy of the same checkpoints (lm-eval, local task files)",
        "",
        f"Command: `{args.command}`",
        "",
        f"acc (0-shot), the first {args.limit} items of each task, of the model folders whose perplexity is in "
        "compare-peers.md (same recipe keys, same calibration tokens). `*` = derived data (converted task files; "
        "not comparable with published numbers). The average's standard error is sqrt(sum se^2)/n over the "
        "tasks; two rows differ beyond noise only where their averages are more than about 2 x "
        "sqrt(se1^2 + se2^2) apart (conservative: the items are the same, so the errors are correlated).",
        "",
        f"| config | tool | budget | seed | {head} | average ± se |",
        "|---|---|---|---|" + "---:|" * (len(tasks) + 1),
    ]
    for r in recs:
        if "missing" in r:
            continue
        accs = {t["task"]: t["acc"] for t in r["tasks"]}
        cells = " | ".join(f"{accs[t]:.3f}" for t in tasks)
        se = "" if r["average_stderr"] is None else f" ± {r['average_stderr']:.3f}"
        seed = "" if r["seed"] is None else r["seed"]
        lines.append(f"| {r['config']} | {r['tool']} | {r['budget']} | {seed} | {cells} | "
                     f"{r['average_acc']:.3f}{se} |")  # fmt: skip
    gaps = []
    by = {(r["config"], r["tool"], r["budget"], r["seed"]): r for r in recs if "missing" not in r}
    for (c, t, b, s), r in sorted(by.items()):
        if t != "signround":
            continue
        for peer in ("auto-round", "gptq"):
            o = by.get((c, peer, b, s)) or by.get((c, peer, "none", s))
            if o is None or r["average_stderr"] is None or o["average_stderr"] is None:
                continue
            diff = r["average_acc"] - o["average_acc"]
            bound = 2 * (r["average_stderr"] ** 2 + o["average_stderr"] ** 2) ** 0.5
            verdict = "higher" if diff > bound else "lower" if diff < -bound else "within noise"
            gaps.append(f"- {c} {b} seed {s}: signround − {peer} = {diff:+.3f} (2 se = {bound:.3f}): {verdict}")
    if gaps:
        lines += ["", "signround against its peers on the same checkpoints:", "", *gaps]
    missing = [r for r in recs if "missing" in r]
    if missing:
        lines += ["", "Missing:", ""] + [f"- {r['config']} {r['tool']} {r['budget']} seed {r['seed']}: "
                                         f"{r['missing']}" for r in missing]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    p = build_parser(__doc__.splitlines()[0])
    p.add_argument("--zs-configs", default="2:128:asym,3:128:sym", help="configs to score (bits:group:sym|asym)")
    p.add_argument("--zs-tools", default="float,signround,auto-round,gptq")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--limit", type=int, default=250)
    args = finish_args(p.parse_args(), "peers_zeroshot.py")
    configs = [(int(b), int(g), m == "sym") for b, g, m in (c.split(":") for c in args.zs_configs.split(","))]
    tools = args.zs_tools.split(",")
    d = Driver(args)
    out_dir = d.results / NAME / "zeroshot"
    out_dir.mkdir(parents=True, exist_ok=True)
    lm_eval = (venv_versions(Path(sys.executable), ("lm_eval",)) or {}).get("lm_eval")
    zs = {"tasks": args.tasks, "limit": args.limit, "lm_eval": lm_eval, "eval_source": source_sha("signround/eval")}
    recs = []
    for row in selection(d, configs, tools):
        recs.append(score(d, args, row, zs, out_dir))
        (d.results / f"{TABLE}.md").write_text(render(args, recs))
        (d.results / f"{TABLE}.json").write_text(
            json.dumps({"command": args.command, "zeroshot_recipe": zs, "rows": recs}, indent=1) + "\n"
        )
    print((d.results / f"{TABLE}.md").read_text())


if __name__ == "__main__":
    main()
