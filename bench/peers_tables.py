"""The tables of bench/compare_peers.py (not a test): per-row records into summaries with their spread, the
claims the seeds support, the issue's targets, and compare-peers.{md,json,png}."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, pyplot  # noqa: E402

if TYPE_CHECKING:
    from compare_peers import Driver

NAME = "compare-peers"
BUDGETS = {"light": 50, "default": 200}
TOOLS = (
    "float",
    "rtn",
    "signround",
    "auto-round",
    "auto-round-light",
    "auto-round-alg-ext",
    "auto-round-opt-rtn",
    "gptq",
)
TUNED = ("signround", "auto-round", "auto-round-alg-ext")  # one row per budget
LIGHT_ONLY = ("auto-round-light",)  # its recipe fixes the light budget
UNTUNED = ("rtn", "auto-round-opt-rtn", "gptq")  # budget "none"; they count against every budget
PEERS = ("auto-round", "auto-round-light", "auto-round-alg-ext", "auto-round-opt-rtn", "gptq", "rtn")


def stats(xs: list[float]) -> dict:
    return {"n": len(xs), "mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs)}


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["config"], r["budget"], r["tool"]), []).append(r)
    out = []
    for (config, budget, tool), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], TOOLS.index(kv[0][2]))
    ):
        s = {
            "config": config,
            "budget": budget,
            "tool": tool,
            "seeds": sorted(r["seed"] for r in rs if r["seed"] is not None),
        }
        s["ppl"] = stats([r["ppl"] for r in rs])
        secs = [r["quant_seconds"] for r in rs if r["quant_seconds"] is not None]
        rss = [r["peak_rss_gb"] for r in rs if r["peak_rss_gb"] is not None]
        s["quant_seconds"] = stats(secs) if secs else None
        s["peak_rss_gb"] = stats(rss) if rss else None
        s["iters"] = rs[0]["iters"]
        out.append(s)
    return out


RULE = (
    "signround is called **better** than a peer at a config and budget only when signround's worst seed has a"
    " lower perplexity than the peer's best seed (the seed ranges do not overlap), with at least 2 seeds of"
    " signround and at least 2 of the peer (RTN is data-free: its one value stands for every seed); **worse**"
    " when the ranges do not overlap the other way; otherwise **not separated**. Fewer seeds: **not claimed**."
    " Paired: the seeds where signround beat the peer on the same calibration tokens (same seed, same"
    " calib_sha256), as a count."
)


def claims(rows: list[dict], summary: list[dict]) -> list[dict]:
    find = {(s["config"], s["budget"], s["tool"]): s for s in summary}
    out = []
    for s in summary:
        if s["tool"] != "signround":
            continue
        for peer in PEERS:
            p = find.get((s["config"], s["budget"], peer)) or find.get((s["config"], "none", peer))
            if p is None:
                continue
            ns, np_ = s["ppl"]["n"], p["ppl"]["n"]
            if ns < 2 or (np_ < 2 and peer != "rtn"):
                verdict = "not claimed"
            elif s["ppl"]["max"] < p["ppl"]["min"]:
                verdict = "better"
            elif s["ppl"]["min"] > p["ppl"]["max"]:
                verdict = "worse"
            else:
                verdict = "not separated"
            mine = {
                r["seed"]: r["ppl"]
                for r in rows
                if (r["config"], r["budget"], r["tool"]) == (s["config"], s["budget"], "signround")
            }
            theirs = {
                r["seed"]: r["ppl"]
                for r in rows
                if (r["config"], r["tool"]) == (s["config"], peer) and r["budget"] == p["budget"]
            }
            if peer == "rtn" and theirs:
                theirs = {seed: next(iter(theirs.values())) for seed in mine}
            common = sorted(set(mine) & set(theirs))
            out.append({"config": s["config"], "budget": s["budget"], "peer": peer, "peer_budget": p["budget"],
                        "verdict": verdict, "signround": s["ppl"], "peer_ppl": p["ppl"],
                        "paired_wins": sum(mine[k] < theirs[k] for k in common), "paired_n": len(common)})  # fmt: skip
    return out


def targets(summary: list[dict]) -> list[dict]:
    """Issue 27's targets per config and budget, as met / not met / n/a."""
    find = {(s["config"], s["budget"], s["tool"]): s for s in summary}
    fl = find.get(("float", "none", "float"))
    out = []
    for s in summary:
        if s["tool"] != "signround":
            continue
        c, b, mean = s["config"], s["budget"], s["ppl"]["mean"]
        peers = {t: find.get((c, b, t)) or find.get((c, "none", t)) for t in PEERS}
        peers = {t: p for t, p in peers.items() if p}
        losing = [t for t, p in peers.items() if p["ppl"]["mean"] <= mean]
        ar = find.get((c, b, "auto-round"))
        t = {"config": c, "budget": b, "seeds": s["ppl"]["n"],
             "mean_below_every_peer": None if not peers else not losing, "peers_not_beaten": losing,
             "worst_seed_within_autoround_mean": None if ar is None
             else s["ppl"]["max"] <= ar["ppl"]["mean"]}  # fmt: skip
        if c.startswith("W2") and ar and fl:
            ratio = (mean - fl["ppl"]["mean"]) / (ar["ppl"]["mean"] - fl["ppl"]["mean"])
            t["w2_excess_ratio"] = ratio
            t["w2_excess_ratio_at_most_0.75"] = ratio <= 0.75
        out.append(t)
    return out


def fmt_range(st: dict | None, f: str = ".3f") -> str:
    if not st:
        return ""
    if st["n"] == 1:
        return format(st["mean"], f)
    return f"{st['mean']:{f}} ({st['min']:{f}}-{st['max']:{f}})"


def write_tables(d: Driver, rows: list[dict], done: int, planned: int) -> None:
    a = d.args
    rows = sorted(rows, key=lambda r: (r["config"], r["budget"], TOOLS.index(r["tool"]), r["seed"] or 0))
    summary = summarize(rows)
    cl, tg = claims(rows, summary), targets(summary)
    # rows of one seed must share one calibration hash across tools
    hashes: dict = {}
    for r in rows:
        if r["calib_sha256"]:
            hashes.setdefault(r["seed"], set()).add(r["calib_sha256"])
    mixed = {s: sorted(h) for s, h in hashes.items() if len(h) > 1}
    meta = {
        "command": a.command,
        "machine": machine(),
        "commit": d.commit,
        "signround_source": d.signround_source,
        "versions": d.versions,
        "model": d.model_id,
        "dataset": Path(a.dataset).name,
        "nsamples": a.nsamples,
        "seqlen": a.seqlen,
        "batch_size": a.batch_size,
        "budgets": {b: BUDGETS[b] for b in a.budgets},
        "eval": {"ppl": a.ppl, "seqlen": a.eval_seqlen, "windows": a.eval_windows},
        "rows_done": len(rows),
        "rows_planned": planned,
        "complete": done >= planned and not d.failures and len(rows) == planned,
        "claim_rule": RULE,
        "calib_hash_per_seed": {str(s): sorted(h) for s, h in hashes.items()},
    }
    d.results.mkdir(parents=True, exist_ok=True)
    keep = ("config", "budget", "tool", "seed", "calib_sha256", "ppl", "quant_seconds", "peak_rss_gb", "iters",
            "nsamples", "seqlen", "eval_windows", "eval_seqlen", "process_seconds", "peak_gpu_gb", "grid",
            "resolved", "recipe_key", "command", "started")  # fmt: skip
    blob = {**meta, "rows": [{k: r.get(k) for k in keep} for r in rows], "summary": summary, "claims": cl,
            "targets": tg, "failures": d.failures}  # fmt: skip
    (d.results / f"{NAME}.json").write_text(json.dumps(blob, indent=1) + "\n")
    (d.results / f"{NAME}.md").write_text(
        render(meta, rows, summary, cl, tg, d.failures, mixed, plot(d, summary, rows))
    )


_PLT: dict = {}


def plot(d: Driver, summary: list[dict], rows: list[dict]) -> str:
    """The png beside the tables; returns a line for the markdown."""
    if "plt" not in _PLT:
        _PLT["plt"] = pyplot()  # once: it says why there is no plot
    plt = _PLT["plt"]
    if plt is None:
        return "No plot: matplotlib is not installed in this environment (`pip install -e '.[bench]'`)."
    configs = sorted({s["config"] for s in summary if s["config"] != "float"})
    if not configs:
        return ""
    fl = next((s for s in summary if s["tool"] == "float"), None)
    fig, axes = plt.subplots(1, len(configs), figsize=(6 * len(configs), 4.5), squeeze=False)
    for ax, c in zip(axes[0], configs, strict=True):
        ss = [s for s in summary if s["config"] == c]
        labels = [f"{s['tool']}\n{s['budget']}" for s in ss]
        for i, s in enumerate(ss):
            pts = [r["ppl"] for r in rows if (r["config"], r["budget"], r["tool"]) == (c, s["budget"], s["tool"])]
            color = "tab:blue" if s["tool"] == "signround" else "tab:orange" if "auto-round" in s["tool"] else "gray"
            ax.scatter([i] * len(pts), pts, color=color, s=14, zorder=3)
            ax.errorbar([i], [s["ppl"]["mean"]], yerr=[[s["ppl"]["mean"] - s["ppl"]["min"]],
                        [s["ppl"]["max"] - s["ppl"]["mean"]]], fmt="_", color="black", capsize=4)  # fmt: skip
        if fl:
            ax.axhline(fl["ppl"]["mean"], color="black", linewidth=0.8, linestyle=":", label="float")
        ax.set_xticks(range(len(ss)), labels, fontsize=6, rotation=60)
        ax.set_yscale("log")
        ax.set_title(f"{c}: ppl per seed, mean and min-max")
        ax.set_ylabel("wikitext-2 ppl")
    fig.tight_layout()
    fig.savefig(d.results / f"{NAME}.png", dpi=100)
    plt.close("all")
    return f"Plot: {NAME}.png (each seed a dot; the bar spans min-max, the tick is the mean)."


def render(meta, rows, summary, cl, tg, failures, mixed, plot_line) -> str:
    v = meta["versions"]
    ver = lambda d, k: (d or {}).get(k) or "missing"  # noqa: E731
    ev = meta["eval"]
    L = [
        "# signround vs peers on identical calibration tokens, several seeds (issue 27)",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['machine']}. Commit {meta['commit'][:12]}, signround source {meta['signround_source']}. "
        f"signround {ver(v['signround_venv'], 'signround')} (torch {ver(v['signround_venv'], 'torch')}); "
        f"auto-round {ver(v['bench_venv'], 'auto-round')} (torch {ver(v['bench_venv'], 'torch')}, transformers "
        f"{ver(v['bench_venv'], 'transformers')}); llm-compressor {ver(v['gptq_venv'], 'llmcompressor')} "
        f"(compressed-tensors {ver(v['gptq_venv'], 'compressed-tensors')}, torch {ver(v['gptq_venv'], 'torch')}, "
        f"transformers {ver(v['gptq_venv'], 'transformers')}).",
        "",
        f"Model `{meta['model']['model']}`. Calibration: `{meta['dataset']}`, {meta['nsamples']} x {meta['seqlen']}"
        " token ids per seed drawn by signround's sampler, the same ids for every tool of that seed (hashes per seed"
        f" in the JSON); batch {meta['batch_size']}; budgets "
        + ", ".join(f"{b} = {n} iters" for b, n in meta["budgets"].items())
        + f". Perplexity: `signround eval`, {ev['ppl']}, first {ev['windows']} windows of {ev['seqlen']} tokens, the"
        " same call for every row. quant s: the tool's own span (model in memory to quantized, calibration"
        " included); peak RSS: VmHWM of the quantizing process. Rows done:"
        f" {meta['rows_done']} of {meta['rows_planned']}"
        + ("." if meta["complete"] else " (**partial**: the matrix has not finished, or rows failed)."),
        "",
        "## Summary (mean and min-max over seeds)",
        "",
        "| config | budget | tool | seeds | iters | ppl mean (min-max) | quant s mean (min-max) | peak RSS GB |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for s in summary:
        L.append(
            f"| {s['config']} | {s['budget']} | {s['tool']} | {','.join(map(str, s['seeds'])) or '-'} | {s['iters']} | "
            f"{fmt_range(s['ppl'])} | {fmt_range(s['quant_seconds'], '.0f')} | {fmt_range(s['peak_rss_gb'], '.2f')} |"
        )
    L += ["", plot_line, "", "## Claims", "", "Rule: " + RULE, ""]
    L += [
        "| config | budget | peer | verdict | signround ppl | peer ppl | paired wins |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for c in cl:
        peer = c["peer"] + ("" if c["peer_budget"] == c["budget"] else f" ({c['peer_budget']})")
        L.append(
            f"| {c['config']} | {c['budget']} | {peer} | {c['verdict']} | {fmt_range(c['signround'])} | "
            f"{fmt_range(c['peer_ppl'])} | {c['paired_wins']}/{c['paired_n']} |"
        )
    yn = lambda x: "n/a" if x is None else "met" if x else "**not met**"  # noqa: E731
    L += [
        "",
        "## Issue 27's targets",
        "",
        "Mean below every peer's mean (at that budget; GPTQ, RTN and optimized RTN at every budget); worst seed no"
        " worse than auto-round's mean; at W2 signround's mean excess over float at most 0.75x auto-round's.",
        "",
        "| config | budget | seeds | mean below every peer | worst seed <= auto-round mean | W2 excess ratio |",
        "|---|---|---:|---|---|---|",
    ]
    for t in tg:
        w2 = (
            ""
            if "w2_excess_ratio" not in t
            else f"{t['w2_excess_ratio']:.2f} ({yn(t['w2_excess_ratio_at_most_0.75'])})"
        )
        lost = f" (not below: {', '.join(t['peers_not_beaten'])})" if t["peers_not_beaten"] else ""
        L.append(f"| {t['config']} | {t['budget']} | {t['seeds']} | {yn(t['mean_below_every_peer'])}{lost} | "
                 f"{yn(t['worst_seed_within_autoround_mean'])} | {w2} |")  # fmt: skip
    L += ["", "## Rows", "", "| config | budget | tool | seed | calib_sha256 | ppl | quant s | process s | "
          "peak RSS GB | linears on grid | recipe key |",
          "|---|---|---|---:|---|---:|---:|---:|---:|---|---|"]  # fmt: skip
    for r in rows:
        g = r.get("grid") or {}
        L.append(
            f"| {r['config']} | {r['budget']} | {r['tool']} | {'' if r['seed'] is None else r['seed']} | "
            f"{(r['calib_sha256'] or '')[:12]} | {r['ppl']:.3f} | "
            f"{'' if r['quant_seconds'] is None else format(r['quant_seconds'], '.0f')} | "
            f"{'' if r['process_seconds'] is None else format(r['process_seconds'], '.0f')} | "
            f"{'' if r['peak_rss_gb'] is None else format(r['peak_rss_gb'], '.2f')} | "
            f"{'' if not g else str(g['linears_on_grid']) + '/' + str(g['linears'])} | {r['recipe_key']} |"
        )
    if mixed:
        L += ["", f"**Calibration hashes differ within a seed** (the comparison is not on equal tokens): {mixed}"]
    if failures:
        L += ["", "## Failed rows", ""] + [
            f"- {f['config']} {f['tool']} {f['budget']} seed {f['seed']}: {f['why']}" for f in failures
        ]
    L += ["", f"Each row's full recipe and its commands: `{NAME}/rows/<recipe key>.json`."]
    return "\n".join(L) + "\n"
