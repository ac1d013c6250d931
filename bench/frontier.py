"""Quality against quantization time (not a test): issue 28's frontier of signround, auto-round and GPTQ.

Every point is a compare_peers row (``bench/compare_peers.py``: the same calibration token tensor per seed, each
tool in its own process, one perplexity call), so points shared with the peers comparison (signround at 50 and
200 iterations, auto-round light / default / alg-ext, opt-RTN, GPTQ, RTN) are the same records, reused from
``<results>/compare-peers/rows/`` when their recipe matches, and new ones are added there too. Points:

- ``signround`` at each of ``--sr-iters`` (default 0,10,25,50,100,200; 0 is ``--method search``, the
  calibrated clipping search alone, recipe "search" in the JSON),
- ``auto-round`` (its defaults, lr 1/iters) at ``--ar-iters`` (default 50,200: 200 is auto-round's default),
  ``auto-round-light`` (50, lr 5e-3), ``auto-round-alg-ext`` at ``--ar-iters``, ``auto-round-opt-rtn``,
- ``gptq`` (llm-compressor) and ``rtn``.

The table gives, per config, **time to auto-round-default quality**: the least signround quant time whose mean
perplexity is at or below auto-round default's (200 iterations), divided by auto-round default's time (times
are the tools' own spans, from model in memory to quantized; on a CPU whose speed drifts, only ratios within
one run mean anything). ``frontier.json`` has one row per tool, point, config and seed with compare-peers.json's
keys plus ``recipe`` (signround's recipe name, or null). One plot per config: ppl against seconds, log-log.

    .venv/bin/python bench/frontier.py --configs 2:128:asym,3:128:sym,4:128:asym --seeds 42
    .venv/bin/python bench/frontier.py --cached    # tabulate the rows already there
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, pyplot  # noqa: E402
from compare_peers import Driver, build_parser, finish_args, work_lock  # noqa: E402
from peers_tables import BUDGETS, TOOLS, stats  # noqa: E402

from signround.config import RECIPES  # noqa: E402

NAME = "frontier"
KEEP = ("config", "budget", "tool", "seed", "calib_sha256", "ppl", "quant_seconds", "peak_rss_gb", "iters",
        "nsamples", "seqlen", "eval_windows", "recipe_key", "commit")  # fmt: skip
AR_DEFAULT_ITERS = 200  # auto-round 0.16.1's default iters


def budget_name(iters: int) -> str:
    """The compare_peers budget of a number of iterations (light and default keep their names)."""
    for name, n in BUDGETS.items():
        if n == iters:
            return name
    BUDGETS[f"iters{iters}"] = iters
    return f"iters{iters}"


class Frontier(Driver):
    def schedule(self) -> list[tuple[str, tuple | None, str, int | None]]:
        a = self.args
        configs = [(int(b), int(g), m == "sym") for b, g, m in (c.split(":") for c in a.configs.split(","))]
        out = [("float", None, "none", None)]
        for cfg in configs:
            out.append(("rtn", cfg, "none", None))
        for seed in a.seeds:
            for cfg in configs:
                pts = [("gptq", "none"), ("auto-round-opt-rtn", "none")]
                pts += [("auto-round-light", "light")]  # its recipe fixes the light budget's iterations
                for n in a.ar_iters:
                    pts += [("auto-round", budget_name(n)), ("auto-round-alg-ext", budget_name(n))]
                pts += [("signround", budget_name(n)) for n in a.sr_iters]
                out += [(t, cfg, b, seed) for t, b in pts if t in a.tools]
        return out

    def run(self) -> None:
        plan = self.schedule()
        print(f"{len(plan)} points planned", flush=True)
        rows = []
        for tool, cfg, budget, seed in plan:
            row = self.run_row(tool, cfg, budget, seed)
            if row is not None:
                rows.append({**row, "budget": budget})
                write(self, rows)
        write(self, rows)
        print((self.results / f"{NAME}.md").read_text())


def recipe_name(row: dict) -> str | None:
    """signround's recipe of a row: "search" at 0 iterations (``--method search``); the name of the
    ``--recipe`` whose steps and samples the row ran (at the bench's own sequence length, ``--seqlen``, the
    same for every tool); else None (signround's defaults at the row's iterations)."""
    if row["tool"] != "signround":
        return None
    if row["iters"] == 0:
        return "search"
    for name, spec in RECIPES.items():
        if (spec.iters, spec.nsamples) == (row["iters"], row["nsamples"]):
            return name.value
    return None


def points(rows: list[dict]) -> list[dict]:
    """Mean over seeds per (config, tool, iters): ppl and quant seconds, with their ranges."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["tool"] != "float":
            groups.setdefault((r["config"], r["tool"], r["iters"]), []).append(r)
    out = []
    for (config, tool, iters), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], TOOLS.index(kv[0][1]),
                                                                         kv[0][2])):  # fmt: skip
        secs = [r["quant_seconds"] for r in rs if r["quant_seconds"] is not None]
        out.append({"config": config, "tool": tool, "iters": iters, "recipe": recipe_name(rs[0]),
                    "seeds": sorted(r["seed"] or 0 for r in rs),
                    "ppl": stats([r["ppl"] for r in rs]), "quant_seconds": stats(secs) if secs else None})  # fmt: skip
    return out


def time_to_default(pts: list[dict]) -> list[dict]:
    """Per config: the least signround time at or below auto-round default's mean ppl, over its time."""
    out = []
    for c in sorted({p["config"] for p in pts}):
        ar = next((p for p in pts if (p["config"], p["tool"], p["iters"]) == (c, "auto-round", AR_DEFAULT_ITERS)),
                  None)  # fmt: skip
        if ar is None or ar["quant_seconds"] is None:
            out.append({"config": c, "ratio": None, "why": "no auto-round default (200 iterations) point yet"})
            continue
        ok = [p for p in pts if p["config"] == c and p["tool"] == "signround" and p["quant_seconds"]
              and p["ppl"]["mean"] <= ar["ppl"]["mean"]]  # fmt: skip
        if not ok:
            out.append({"config": c, "ratio": None, "why": "no signround point at or below auto-round default's ppl"})
            continue
        best = min(ok, key=lambda p: p["quant_seconds"]["mean"])
        out.append({"config": c, "ratio": best["quant_seconds"]["mean"] / ar["quant_seconds"]["mean"],
                    "signround_iters": best["iters"], "signround_ppl": best["ppl"]["mean"],
                    "autoround_ppl": ar["ppl"]["mean"], "target_0.33_met": best["quant_seconds"]["mean"]
                    <= 0.33 * ar["quant_seconds"]["mean"]})  # fmt: skip
    return out


def write(d: Driver, rows: list[dict]) -> None:
    pts = points(rows)
    ttd = time_to_default(pts)
    fl = next((r for r in rows if r["tool"] == "float"), None)
    blob = {"command": d.args.command, "machine": machine(), "commit": d.commit, "versions": d.versions,
            "rows": [{**{k: r.get(k) for k in KEEP}, "recipe": recipe_name(r)} for r in rows], "points": pts,
            "time_to_autoround_default": ttd}  # fmt: skip
    (d.results / f"{NAME}.json").write_text(json.dumps(blob, indent=1) + "\n")
    lines = [
        "# Quality against quantization time: signround, auto-round 0.16.1, GPTQ",
        "",
        f"Command: `{d.args.command}`",
        "",
        f"{machine()}; commit {d.commit}. Every point is a compare-peers row (same calibration tokens per seed, "
        f"{d.args.nsamples} x {d.args.seqlen}; wikitext-2, {d.args.eval_windows} windows of {d.args.eval_seqlen}"
        + (f"; float {fl['ppl']:.3f}" if fl else "")
        + "). quant s: the tool's own span, model in memory to quantized (ratios within this run only).",
        "",
        "## Time to auto-round-default quality (target <= 0.33)",
        "",
    ]
    for t in ttd:
        if t["ratio"] is None:
            lines.append(f"- {t['config']}: not measured ({t['why']})")
        else:
            lines.append(f"- {t['config']}: **{t['ratio']:.2f}** (signround {t['signround_iters']} iters, ppl "
                         f"{t['signround_ppl']:.3f} vs auto-round default {t['autoround_ppl']:.3f}); "
                         f"target {'met' if t['target_0.33_met'] else 'not met'}")  # fmt: skip
    lines += [
        "",
        "recipe: the signround `--recipe` whose steps and samples the point ran (at this bench's sequence "
        "length); search = `--method search`.",
        "",
    ]
    lines += ["| config | tool | iters | recipe | seeds | ppl mean (min-max) | quant s mean |"]
    lines += ["|---|---|---:|---|---|---:|---:|"]
    for p in pts:
        st = p["ppl"]
        ppl = f"{st['mean']:.3f}" + (f" ({st['min']:.3f}-{st['max']:.3f})" if st["n"] > 1 else "")
        secs = "" if p["quant_seconds"] is None else f"{p['quant_seconds']['mean']:.0f}"
        lines.append(f"| {p['config']} | {p['tool']} | {p['iters']} | {p['recipe'] or ''} | {len(p['seeds'])} | "
                     f"{ppl} | {secs} |")  # fmt: skip
    plot_line = plot(d.results / f"{NAME}.png", pts)
    lines += ["", plot_line] if plot_line else []
    (d.results / f"{NAME}.md").write_text("\n".join(lines) + "\n")


def plot(path: Path, pts: list[dict]) -> str:
    plt = pyplot()
    if plt is None:
        return "No plot: matplotlib is not installed (pip install -e '.[bench]')."
    configs = sorted({p["config"] for p in pts})
    if not configs:
        return ""
    fig, axes = plt.subplots(1, len(configs), figsize=(5 * len(configs), 4), squeeze=False)
    for ax, c in zip(axes[0], configs, strict=True):
        for tool in TOOLS:
            ps = sorted((p for p in pts if p["config"] == c and p["tool"] == tool and p["quant_seconds"]),
                        key=lambda p: p["quant_seconds"]["mean"])  # fmt: skip
            if ps:
                xs = [p["quant_seconds"]["mean"] for p in ps]
                ax.plot(xs, [p["ppl"]["mean"] for p in ps], marker="o", label=tool)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(c)
        ax.set_xlabel("quant seconds")
        ax.set_ylabel("wikitext-2 ppl")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"![frontier]({path.name})"


def main() -> None:
    p = build_parser(__doc__.splitlines()[0])
    p.add_argument("--sr-iters", default="0,10,25,50,100,200", help="signround's points (iterations; 0 = search)")
    p.add_argument("--ar-iters", default="50,200", help="auto-round's and alg-ext's points (iterations)")
    args = finish_args(p.parse_args(), "frontier.py")
    args.sr_iters = [int(x) for x in args.sr_iters.split(",")]
    args.ar_iters = [int(x) for x in args.ar_iters.split(",")]
    with work_lock(args.work):
        Frontier(args).run()


if __name__ == "__main__":
    main()
