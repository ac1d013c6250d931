"""signround vs intel auto-round 0.16.1, side by side in one run (not a test).

Same machine, model, calibration texts, nsamples / seqlen / batch / iterations / seed, one tool after the
other; both tools' models are scored by signround's perplexity code (auto-round's as its fake-quantized
weights). auto-round runs in the bench-only environment bench/.venv-bench (bench/requirements-bench.txt).
Writes bench/results/compare-autoround.{md,json,png}; finished rows in --work are reused.

    python bench/compare_autoround.py --budgets light,default --max-windows 40 --work /tmp/cmp
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
    DATA,
    ROOT,
    Recipe,
    autoround_quantize,
    beside,
    config_name,
    machine,
    pyplot,
    signround_eval,
    signround_quantize,
)

BUDGETS = {"light": 50, "default": 200}


def run_tag(config: str, tool: str, iters: int, amp: bool, compiled: bool = False) -> str:
    """File stem of one quantization run in the work folder (``rtn`` runs carry no iteration count)."""
    stem = f"{config}-{tool}" + ("" if tool == "rtn" else f"-{iters}")
    return stem + ("-amp" if amp else "") + ("-compile" if compiled else "")


def tool_label(row: dict) -> str:
    """A row's tool as the table prints it: ``signround (compile)``, ``auto-round (amp)``, ..."""
    marks = [m for m in ("amp", "compile") if row.get(m)]
    return row["tool"] + (f" ({', '.join(marks)})" if marks else "")


def ppl_file(work: Path, tag: str) -> Path:
    """Where one run's ``signround eval`` JSON is kept in the work folder."""
    return work / f"{tag}-ppl.json"


def rows_for(args: argparse.Namespace, recipe: Recipe, work: Path) -> list[dict]:
    windows = ["--max-windows", str(args.max_windows)] if args.max_windows else []
    device = ["--device", args.device] if args.device else []
    ppl_flags = ["--ppl", args.ppl, "--seqlen", str(args.eval_seqlen), *windows, *device]
    base = {
        "nsamples": recipe.nsamples,
        "seqlen": recipe.seqlen,
        "eval_seqlen": args.eval_seqlen,
        "device": args.device or "cpu",
    }
    float_ppl = signround_eval(recipe.model, work / "float-ppl.json", ppl_flags)
    gpu = args.gpu
    autoround_amps = (False, True) if args.autoround_amp else (gpu,)
    rows = []
    for budget in args.budgets.split(","):
        iters = BUDGETS[budget]
        rows.append(
            {
                **base,
                "config": "float",
                "budget": budget,
                "tool": "float",
                "ppl": float_ppl["ppl"],
                "quant_seconds": None,
                "peak_rss_gb": None,
                "iters": 0,
                "eval_windows": float_ppl["windows"],
            }
        )
        for pair in args.configs.split(","):
            bits, group = (int(x) for x in pair.split(":"))
            for sym in [m == "sym" for m in args.modes.split(",")]:
                name = config_name(bits, group, sym)
                # (tool, method, iterations, amp, compiled)
                variants = [] if args.skip_rtn else [("rtn", "rtn", 0, False, False)]
                variants += [("signround", "signround", iters, False, False)]
                variants += [("signround", "signround", iters, True, False)] if args.amp else []
                variants += [("signround", "signround", iters, False, True)] if args.compile else []
                if args.cached:
                    tags = [run_tag(name, t, iters, a, c) for t, _, _, a, c in variants]
                    tags += [run_tag(name, "autoround", iters, a) for a in autoround_amps]
                    missing = [
                        t for t in tags if not (beside(work / t, ".json").is_file() and ppl_file(work, t).is_file())
                    ]
                    if missing:
                        print(f"--cached: skipping {name} at {budget}; not in {work}: {', '.join(missing)}", flush=True)
                        continue
                for tool, method, it, amp, compiled in variants:
                    tag = run_tag(name, tool, iters, amp, compiled)
                    # quantize alone (its peak RSS is the quantization's, as auto-round's), then score the saved
                    # checkpoint with the same `signround eval` call every tool's model gets
                    flags = (["--amp"] if amp else []) + (["--enable-torch-compile"] if compiled else []) + device
                    rep = signround_quantize(recipe, bits, group, sym, method, it, work / tag, flags)
                    ppl = signround_eval(str(work / tag), ppl_file(work, tag), ppl_flags)
                    rows.append(
                        {
                            **base,
                            "config": name,
                            "budget": budget,
                            "tool": tool,
                            "ppl": ppl["ppl"],
                            "quant_seconds": rep["seconds"],
                            "peak_rss_gb": rep["peak_rss_gb"],
                            "peak_gpu_gb": rep.get("peak_gpu_gb"),
                            "iters": it,
                            "eval_windows": ppl["windows"],
                            "amp": amp,
                            "compile": compiled,
                        }
                    )
                # on a GPU auto-round runs as it does by default there (amp: bfloat16 model and autocast), as
                # signround does (--dtype auto: a bfloat16 model on CUDA); on the CPU both default to float32
                for amp in autoround_amps:
                    tag = run_tag(name, "autoround", iters, amp)
                    rep = autoround_quantize(recipe, bits, group, sym, iters, work / tag, amp)
                    ppl = signround_eval(str(work / tag), ppl_file(work, tag), ppl_flags)
                    rows.append(
                        {
                            **base,
                            "config": name,
                            "budget": budget,
                            "tool": "auto-round",
                            "ppl": ppl["ppl"],
                            "quant_seconds": rep["seconds"],
                            "peak_rss_gb": rep["peak_rss_gb"],
                            "peak_gpu_gb": rep.get("peak_gpu_gb"),
                            "iters": iters,
                            "eval_windows": ppl["windows"],
                            "amp": amp,
                        }
                    )
                yield_rows(args, rows)
    return rows


def yield_rows(args: argparse.Namespace, rows: list[dict]) -> None:
    """Write the tables after every configuration, so a stopped run keeps what it finished."""
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{args.name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    (results / f"{args.name}.md").write_text(render(rows, args))
    plot(rows, results / f"{args.name}.png")


def plot(rows: list[dict], path: Path) -> None:
    """ppl vs bits per tool (one panel per budget and mode) and quantization-time bars."""
    plt = pyplot()
    if plt is None:
        return
    panels = sorted({(r["budget"], r["config"].split("-")[-1]) for r in rows if r["tool"] != "float"})
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5 * (len(panels) + 1), 4), squeeze=False)
    styles = {"rtn": ("gray", "o"), "auto-round": ("tab:orange", "s"), "signround": ("tab:blue", "D")}
    for ax, (budget, mode) in zip(axes[0], panels, strict=False):
        fp = _find(rows, "float", budget, "float")
        for (tool, amp, compiled), (color, marker) in [
            ((t, a, c), st) for t, st in styles.items() for a, c in ((False, False), (True, False), (False, True))
        ]:
            picked = [
                r
                for r in rows
                if r["budget"] == budget
                and r["config"].split("-")[-1] == mode  # "W2G128-asym" also ends with "sym"
                and r["tool"] == tool
                and r.get("amp", False) == amp
                and r.get("compile", False) == compiled
            ]
            if picked:
                pts = sorted((int(r["config"][1]), r["ppl"]) for r in picked)
                style = "--" if amp else ":" if compiled else "-"
                ax.plot(
                    *zip(*pts, strict=True), marker=marker, color=color, linestyle=style, label=tool_label(picked[0])
                )
        if fp:
            ax.axhline(fp["ppl"], color="black", linewidth=0.8, label="float")
        ax.set_yscale("log")
        ax.set_xlabel("weight bits (G128)")
        ax.set_ylabel("wikitext-2 ppl")
        ax.set_title(f"{budget} budget, {mode}")
        ax.legend(fontsize=8)
    ax = axes[0][-1]
    timed = [r for r in rows if r["tool"] in ("signround", "auto-round") and r["quant_seconds"]]
    labels = [f"{r['config']}\n{tool_label(r)}" for r in timed]
    colors = [styles[r["tool"]][0] for r in timed]
    ax.barh(range(len(timed)), [r["quant_seconds"] for r in timed], color=colors)
    ax.set_yticks(range(len(timed)), labels, fontsize=6)
    ax.set_xlabel("quantization wall seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close("all")


def _find(rows: list[dict], config: str, budget: str, tool: str, amp: bool = False) -> dict | None:
    """The float or auto-round row of a config and budget (rows the ratios divide by; never compiled)."""
    return next(
        (
            r
            for r in rows
            if r["config"] == config and r["budget"] == budget and r["tool"] == tool and r.get("amp", False) == amp
        ),
        None,
    )


def render(rows: list[dict], args: argparse.Namespace) -> str:
    gpu = args.gpu
    lines = [
        "# signround vs auto-round 0.16.1 (same machine, data, settings; same perplexity code)",
        "",
        f"Command: `{args.command}`",
        "",
        f"Machine: {args.machine}.",
        "",
        f"Model `{args.model}`; calibration `{Path(args.dataset).name}`, {args.nsamples} x {args.seqlen} tokens, "
        f"batch {args.batch_size}, seed {args.seed}; budgets: "
        + ", ".join(f"{b} = {BUDGETS[b]} iters" for b in args.budgets.split(","))
        + f". Perplexity: {args.ppl}, seqlen {args.eval_seqlen}, "
        f"{'all' if not args.max_windows else f'first {args.max_windows}'}"
        " windows. "
        + (
            "On the GPU each tool runs as it does by default there: signround with a bfloat16 model (`--dtype"
            " auto`), auto-round with `amp=True` (it casts the model to bfloat16 and autocasts); ratios are"
            " signround / auto-round (amp), below 1 is better for signround. Evaluation is float32 on the GPU."
            if gpu
            else "Ratios are signround / auto-round at float32 (below 1 is better for signround). (amp) rows ran"
            " their tuning steps under bfloat16 autocast (signround `--amp`, auto-round `amp=True`); the others in"
            " float32."
        )
        + " signround tunes against its default objective (per-token error relative to the float output,"
        " `--loss relative`) from clipping searched on the inputs' power (`--init search`), auto-round against"
        " the plain MSE from unclipped groups; both keep each block's step of least batch loss. auto-round runs"
        " with its own defaults otherwise, which on Linux include `torch.compile` of its block forward and"
        " quantize-dequantize (0.16.1 turns it on at 10 or more iterations); signround runs eagerly except in its"
        " (compile) rows (`--enable-torch-compile`: its quantize-dequantize forward and backward compiled). Each"
        " model is"
        " quantized in its own process without evaluation (peak RSS: VmHWM of that process), then scored by the"
        " same `signround eval` call.",
        "",
        "| config | budget | tool | ppl | excess over float | quant s | peak RSS GB "
        + ("| peak GPU GB " if gpu else "")
        + "| excess ratio | time ratio | RSS ratio |"
        + (" GPU mem ratio |" if gpu else ""),
        "|---|---|---|---:|---:|---:|---:|" + ("---:|" if gpu else "") + "---:|---:|---:|" + ("---:|" if gpu else ""),
    ]
    for r in rows:
        fp = _find(rows, "float", r["budget"], "float")
        excess = r["ppl"] - fp["ppl"] if fp and r["tool"] != "float" else None
        ratios = ["", "", ""] + ([""] if gpu else [])
        if r["tool"] == "signround":
            # on the CPU auto-round at float32 (its faster mode there), on the GPU with amp (its default there)
            ar = _find(rows, r["config"], r["budget"], "auto-round", amp=gpu)
            if ar is not None and fp is not None:
                ratios = [
                    f"{excess / (ar['ppl'] - fp['ppl']):.2f}",
                    f"{r['quant_seconds'] / ar['quant_seconds']:.2f}",
                    f"{r['peak_rss_gb'] / ar['peak_rss_gb']:.2f}",
                ]
                if gpu:
                    mem = r.get("peak_gpu_gb"), ar.get("peak_gpu_gb")
                    ratios.append(f"{mem[0] / mem[1]:.2f}" if all(mem) else "")
        cells = [
            r["config"],
            r["budget"],
            tool_label(r),
            f"{r['ppl']:.3f}",
            "" if excess is None else f"{excess:.3f}",
            "" if r["quant_seconds"] is None else f"{r['quant_seconds']:.0f}",
            "" if r["peak_rss_gb"] is None else f"{r['peak_rss_gb']:.2f}",
            *([] if not gpu else ["" if r.get("peak_gpu_gb") is None else f"{r['peak_gpu_gb']:.2f}"]),
            *ratios,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default=str(DATA / "calib-c4.jsonl"))
    p.add_argument("--configs", default="4:128,3:128,2:128")
    p.add_argument("--modes", default="asym,sym")
    p.add_argument("--budgets", default="light,default")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--ppl", default="wikitext2", help="perplexity text: wikitext2 or a file")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--work", default=None)
    p.add_argument("--amp", action="store_true", help="also run signround with --amp (bfloat16 autocast)")
    p.add_argument(
        "--compile", action="store_true", help="also run signround with --enable-torch-compile (signround (compile))"
    )
    p.add_argument("--autoround-amp", action="store_true", help="also run auto-round with its bfloat16 autocast")
    p.add_argument(
        "--device", default=None, help="cuda: both tools quantize on the GPU with their GPU defaults (see the table)"
    )
    p.add_argument("--skip-rtn", action="store_true", help="no round-to-nearest rows (saves time on a lent GPU)")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"), help="folder for the .md/.json/.png")
    p.add_argument("--name", default="compare-autoround", help="file name stem of the results")
    p.add_argument(
        "--cached",
        action="store_true",
        help="quantize nothing: tabulate the configs whose runs are all in --work already (skip the others, saying "
        "so); only the float model's perplexity is computed if --work lacks it",
    )
    args = p.parse_args()
    args.command = "python bench/compare_autoround.py " + shlex.join(sys.argv[1:])
    args.machine = machine()
    args.gpu = (args.device or "cpu").startswith("cuda")
    if args.gpu:
        import torch

        args.machine += f"; GPU {torch.cuda.get_device_name()} (torch {torch.__version__})"
    unknown = set(args.budgets.split(",")) - set(BUDGETS)
    if unknown:
        raise SystemExit(f"unknown budget(s) {sorted(unknown)}; choose from {sorted(BUDGETS)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="signround-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    recipe = Recipe(args.model, args.dataset, args.nsamples, args.seqlen, args.batch_size, args.seed)
    rows = rows_for(args, recipe, work)
    print(render(rows, args))


if __name__ == "__main__":
    main()
