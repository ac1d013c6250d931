"""Mixed-precision benchmark (not a test): per-layer bits by integer programming vs greedy vs uniform.

1. Sensitivities of every fused layer group of the model at 2/3/4/8 bits (G128, asym), once: the
   default ``block`` (block-output error weighted by the loss gradient), ``block-mse`` (unweighted) and
   the ``fisher`` weight-space proxy; the proxies' rank agreement with ``block`` is reported.
2. For each average-bits budget, the ILP and the greedy allocation (``block``); the ILP on the two
   other sensitivities as well (``fisher``: RTN only). Each allocation is written as a ``--layer-config``
   file and quantized with RTN and SignRound by the signround CLI, next to uniform W2/W3/W4 G128.
   Every row is scored by signround's perplexity code. Finished rows in ``--work`` are reused.

    python bench/mixed.py --work /tmp/bench/work --iters 50 --nsamples 32 --batch-size 4 --max-windows 20
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_recipe_args, pyplot, recipe_from, signround_eval, signround_quantize  # noqa: E402

OPTIONS = (2, 3, 4, 8)
KINDS = ("block", "block-mse", "fisher")


def sensitivities(args: argparse.Namespace, work: Path) -> dict:
    """The sensitivity tables for the model (cached in ``work``; kinds missing from the cache are added)."""
    path = work / "mixed-sensitivity.json"
    out = json.loads(path.read_text()) if path.is_file() else {}
    if all(k in out for k in KINDS):
        return out
    import torch

    from signround.calib.data import calibration_tokens
    from signround.config import CalibConfig, QuantConfig, QuantScheme
    from signround.mixed import MixedSpec, allocate_bits
    from signround.model.load import load_model

    torch.manual_seed(args.seed)
    model, tok = load_model(args.model, dtype=torch.float32)
    calib = CalibConfig(dataset=args.dataset, nsamples=args.sens_nsamples, seqlen=args.seqlen, seed=args.seed)
    tokens = calibration_tokens(model, tok, calib)
    cfg = QuantConfig(scheme=QuantScheme(bits=4, group_size=args.group_size, sym=False), calib=calib)
    for kind in (k for k in KINDS if k not in out):
        spec = MixedSpec(bit_options=OPTIONS, avg_bits=4.0, sensitivity=kind, nsamples=args.sens_nsamples)
        t = time.perf_counter()
        a = allocate_bits(model, tokens, cfg, spec, progress=True)
        out[kind] = {"cost": a.cost.tolist(), "seconds": time.perf_counter() - t}
        out["groups"], out["size"], out["numel"] = a.groups, a.size.tolist(), a.numel
        path.write_text(json.dumps(out))
    return out


def rank_agreement(sens: dict) -> dict:
    from scipy.stats import spearmanr

    block = np.array(sens["block"]["cost"])
    out = {}
    for kind in KINDS[1:]:
        other = np.array(sens[kind]["cost"])
        per_option = {b: float(spearmanr(block[:, i], other[:, i]).statistic) for i, b in enumerate(OPTIONS)}
        out[kind] = {"all": float(spearmanr(block.ravel(), other.ravel()).statistic), "per_option": per_option}
    return out


def layer_config(sens: dict, choice: np.ndarray) -> dict:
    import re

    return {
        f"^{re.escape(n)}$": {"bits": OPTIONS[int(c)]}
        for names, c in zip(sens["groups"], choice, strict=True)
        for n in names
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_recipe_args(p, iters=50)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument(
        "--budgets",
        default="2.5,3.0,W3,3.5",
        help="average bits per weight (overhead included); W3 = uniform W3's size",
    )
    p.add_argument("--sens-nsamples", type=int, default=32)
    p.add_argument("--max-windows", type=int, default=20)
    p.add_argument("--work", required=True)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    command = "python bench/mixed.py " + shlex.join(sys.argv[1:])
    from signround.mixed import solve_greedy, solve_ilp
    from signround.mixed.allocate import total_size

    sens = sensitivities(args, work)
    agree = rank_agreement(sens)
    size, numel = np.array(sens["size"], dtype=np.int64), sens["numel"]
    block = np.array(sens["block"]["cost"])  # the default sensitivity, summed per allocation in the table
    recipe = recipe_from(args)
    g = args.group_size
    ppl_flags = ["--eval-ppl", "wikitext2", "--eval-max-windows", str(args.max_windows)]
    seen: dict[tuple, dict] = {}  # allocation -> rows already measured (greedy often equals the ILP)
    rows: list[dict] = []
    allocations: dict[str, list[int]] = {}

    def quantize(label: str, method: str, bits: int, extra: list[str]) -> dict:
        """One row; uniform rows share zeroshot.py's checkpoint names, so either bench reuses the other's."""
        iters = args.iters if method == "signround" else 0
        out = work / (f"{label}-{method}" if label.startswith("W") else f"mixed-{label}-{method}")
        r = signround_quantize(recipe, bits, g, False, method, iters, out, ppl_flags + extra)
        ppl = r.get("ppl")
        if ppl is None or ppl["windows"] != args.max_windows:  # made by another bench without this evaluation
            ppl = signround_eval(
                str(out),
                out.with_name(out.name + f"-ppl{args.max_windows}.json"),
                ["--max-windows", str(args.max_windows)],
            )
        return {"ppl": ppl["ppl"], "windows": ppl["windows"], "quant_seconds": r["seconds"]}

    def flush() -> None:
        results = ROOT / "bench" / "results"
        payload = {"command": command, "rank_agreement": agree, "rows": rows, "allocations": allocations}
        payload["sensitivity_seconds"] = {k: sens[k]["seconds"] for k in KINDS}
        (results / "mixed.json").write_text(json.dumps(payload, indent=2) + "\n")
        (results / "mixed.md").write_text(render(args, command, rows, agree, sens))

    float_ppl = signround_eval(
        args.model, work / f"mixed-float-{args.max_windows}.json", ["--max-windows", str(args.max_windows)]
    )
    rows.append({"allocation": "float", "avg_bits": 16.0, "method": "float", "ppl": float_ppl["ppl"]})
    for bits in (2, 3, 4):
        uniform = np.full(len(size), OPTIONS.index(bits))
        avg = total_size(size, uniform) / numel
        block_cost = float(block[np.arange(len(uniform)), uniform].sum())
        for method in ("rtn", "signround"):
            rows.append(
                {
                    "allocation": f"uniform W{bits}G{g}",
                    "avg_bits": avg,
                    "method": method,
                    "block_cost": block_cost,
                    **quantize(f"W{bits}G{g}-asym", method, bits, []),
                }
            )
            flush()
    uniform3 = total_size(size, np.full(len(size), OPTIONS.index(3)))
    for spec in args.budgets.split(","):
        bits_budget = uniform3 if spec == "W3" else int(float(spec) * numel)
        budget = round(bits_budget / numel, 3)
        for name, kind, solver in (
            ("ilp", "block", solve_ilp),
            ("greedy", "block", solve_greedy),
            ("ilp-mse", "block-mse", solve_ilp),
            ("ilp-fisher", "fisher", solve_ilp),
        ):
            cost = np.array(sens[kind]["cost"])
            choice = solver(cost, size, bits_budget)
            label = f"{name}-{budget}"
            allocations[label] = [OPTIONS[int(c)] for c in choice]
            path = work / f"mixed-{label}.json"
            path.write_text(json.dumps(layer_config(sens, choice)))
            block_cost = float(block[np.arange(len(choice)), choice].sum())
            methods = ("rtn", "signround") if kind != "fisher" else ("rtn",)
            for method in methods:
                row = {
                    "allocation": f"{name} @ {budget}",
                    "avg_bits": total_size(size, choice) / numel,
                    "method": method,
                }
                row["block_cost"] = block_cost
                key = (method, tuple(choice.tolist()))
                if key in seen:
                    row["note"] = f"same allocation as {seen[key]['allocation']}; measured once"
                    rows.append({**row, **{k: seen[key][k] for k in ("ppl", "windows", "quant_seconds")}})
                else:
                    rows.append({**row, **quantize(label, method, 4, ["--layer-config", str(path)])})
                    seen[key] = rows[-1]
                flush()
    plot(sens, allocations, rows, args)
    flush()
    print((ROOT / "bench" / "results" / "mixed.md").read_text())


def render(args, command, rows, agree, sens) -> str:
    lines = [
        "# Mixed precision on SmolLM2-135M: ILP vs greedy vs uniform bits",
        "",
        f"Command: `{command}`",
        "",
        f"Options 2/3/4/8 bits, G{args.group_size} asymmetric; average bits per weight count codes, float16 scales "
        "and zero points over the decoder linears. Fused groups (q/k/v, gate/up) share one width. Sensitivities "
        f"from {args.sens_nsamples} x {args.seqlen} calibration tokens ({Path(args.dataset).name}); SignRound rows: "
        f"{args.nsamples} x {args.seqlen} tokens, batch {args.batch_size}, {args.iters} iterations (a light recipe, "
        f"the same for every row). Perplexity: wikitext-2 test, seqlen 2048, the first {args.max_windows} windows. "
        "CPU, float32.",
        "",
        "Sensitivities: `block` = block-output error with one group quantized (RTN), weighted by the squared "
        "gradient of the LM loss at that output (the default); `block-mse` = the same error unweighted; "
        "`fisher` = weight-space Fisher proxy. Measurement time: "
        + ", ".join(f"{k} {sens[k]['seconds']:.0f} s" for k in KINDS)
        + " (wall, 2 cores; other jobs may have shared them). Rank agreement with `block` (Spearman over all "
        "group x option entries; per option in brackets): "
        + "; ".join(
            f"{k} {a['all']:.3f} (" + ", ".join(f"{b} bits {v:.2f}" for b, v in a["per_option"].items()) + ")"
            for k, a in agree.items()
        )
        + ".",
        "",
        "| allocation | avg bits | method | ppl | block-sensitivity sum |",
        "|---|---:|---|---:|---:|",
    ]
    for r in rows:
        cost = f"{r['block_cost']:.4g}" if "block_cost" in r else ""
        note = f" ({r['note']})" if "note" in r else ""
        lines.append(f"| {r['allocation']}{note} | {r['avg_bits']:.3f} | {r['method']} | {r['ppl']:.3f} | {cost} |")
    lines += ["", "![bits per layer](mixed-bits.png)", "", "![ppl vs bits](mixed-ppl.png)", ""]
    return "\n".join(lines)


def plot(sens, allocations, rows, args) -> None:
    plt = pyplot()
    if plt is None:
        return
    results = ROOT / "bench" / "results"
    label = next((k for k in allocations if k.startswith("ilp-3.0")), next(iter(allocations)))
    names = [", ".join(n.split(".", 3)[-1] for n in grp) for grp in sens["groups"]]
    fig, ax = plt.subplots(figsize=(14, 4))
    ax.bar(range(len(names)), allocations[label], color="tab:blue")
    ax.set_xlabel("layer group (block order: qkv, o, gate/up, down)")
    ax.set_ylabel("bits")
    ax.set_title(f"ILP allocation at {label.split('-')[-1]} average bits (block sensitivity)")
    fig.tight_layout()
    fig.savefig(results / "mixed-bits.png", dpi=110)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, marker in (("rtn", "o"), ("signround", "s")):
        for kind, color in (
            ("uniform", "gray"),
            ("ilp @", "tab:blue"),
            ("greedy", "tab:orange"),
            ("ilp-mse", "tab:red"),
            ("ilp-fisher", "tab:green"),
        ):
            pts = sorted(
                (r["avg_bits"], r["ppl"]) for r in rows if r["method"] == method and r["allocation"].startswith(kind)
            )
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    marker=marker,
                    color=color,
                    linestyle="-" if method == "signround" else ":",
                    label=f"{kind.strip(' @')} {method}",
                )
    ax.set_yscale("log")
    ax.set_xlabel("average bits per weight (overhead included)")
    ax.set_ylabel(f"wikitext-2 ppl (first {args.max_windows} windows)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(results / "mixed-ppl.png", dpi=110)


if __name__ == "__main__":
    main()
