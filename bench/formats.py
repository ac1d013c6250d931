"""Number-format benchmark (not a test): perplexity vs bits per weight for integer, floating-point (FP4/6/8),
block-scaled (MXFP4, NVFP4) and mixed (BitMoD) grids, RTN vs SignRound; and Double Rounding (one W8
SignRound checkpoint served at 6/4/3/2 bits) against quantizing directly at each width.

Every model is quantized by the signround CLI and scored by signround's perplexity code (wikitext-2 test,
seqlen 2048, the first ``--max-windows`` windows). Finished rows in ``--work`` are reused.

    python bench/formats.py --work /tmp/bench/work --iters 50 --nsamples 32 --batch-size 4 --max-windows 20
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_recipe_args, cached_signround, pyplot, recipe_from, signround_eval  # noqa: E402

# (label, --data-type, bits, group size, methods, extra flags). W4G32 asym is lossless on SmolLM2 (its GGUF
# is on that grid), so no integer row uses group 32. GRIDS_4 run first, then Double Rounding (SignRound),
# then the rest, so a stopped run has the most informative rows.
SEARCH = ("--format-search", "fp4_e2m1,fp4_e1m2,fp4_e3m0")
GRIDS_4 = [
    ("INT4 G128 asym", "int", 4, 128, ("rtn", "signround")),
    ("FP4 e2m1 G128", "fp4_e2m1", 4, 128, ("rtn", "signround")),
    ("BitMoD G128", "bitmod", 4, 128, ("rtn", "signround")),
    ("MXFP4 (G32, E8M0)", "mxfp4", 4, 32, ("rtn", "signround")),
    ("NVFP4 (G16, E4M3)", "nvfp4", 4, 16, ("rtn", "signround")),
    ("FP4 searched per layer (e2m1/e1m2/e3m0) G128", "fp4_e2m1", 4, 128, ("rtn", "signround"), SEARCH),
]
GRIDS_REST = [
    ("INT3 G128 asym", "int", 3, 128, ("rtn", "signround")),
    ("INT6 G128 asym", "int", 6, 128, ("rtn",)),
    ("FP6 e2m3 G128", "fp6_e2m3", 6, 128, ("rtn",)),
    ("FP6 e3m2 G128", "fp6_e3m2", 6, 128, ("rtn",)),
    ("INT8 G128 asym", "int", 8, 128, ("rtn",)),
    ("FP8 e4m3 G128", "fp8_e4m3", 8, 128, ("rtn",)),
    ("FP8 e5m2 G128", "fp8_e5m2", 8, 128, ("rtn",)),
]
SERVE = (6, 4, 3, 2)


def bits_per_weight(checkpoint: Path) -> float:
    """Storage bits per decoder-linear weight (codes + the format's per-group scale / zero / type id)."""
    from signround.mixed.budget import layer_bits
    from signround.model.load import load_model
    from signround.pack.packed import QuantLinear

    model, _ = load_model(str(checkpoint))
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    total = sum(layer_bits(m.scheme, m.out_features, m.in_features) for m in layers)
    return total / sum(m.out_features * m.in_features for m in layers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(p, iters=50)
    p.add_argument("--work", required=True)
    p.add_argument("--max-windows", type=int, default=20)
    p.add_argument("--skip-double-rounding", action="store_true")
    args = p.parse_args()
    command = "python " + shlex.join(["bench/formats.py", *sys.argv[1:]])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    recipe = recipe_from(args)
    windows = ["--max-windows", str(args.max_windows)]

    def quantize(name: str, dtype: str, bits: int, group: int, method: str, extra: tuple[str, ...] = ()) -> dict:
        out = work / f"fmt-{name}-{method}"
        report = out.with_name(out.name + ".json")
        iters = args.iters if method == "signround" else 0
        # fmt: off
        cmd = [sys.executable, "-m", "signround.cli", "quantize", "--model", recipe.model, "--data-type", dtype,
               "--bits", str(bits), "--group-size", str(group), "--method", method, "--iters", str(iters),
               *recipe.flags(), "--output", str(out), "--overwrite", "--quiet", "--report", str(report), *extra]
        # fmt: on
        r = cached_signround(cmd, report, recipe.dataset)
        bpw = r.get("bits_per_weight")
        if bpw is None:
            r["bits_per_weight"] = bpw = bits_per_weight(out)
            report.write_text(json.dumps(r, indent=2))
        return {"checkpoint": out, "quant_seconds": r["seconds"], "bits_per_weight": bpw}

    def ppl(checkpoint: Path, bits: int | None = None) -> float:
        tag = f"-b{bits}" if bits else ""
        flags = windows + (["--bits", str(bits)] if bits else [])
        return signround_eval(
            str(checkpoint), checkpoint.with_name(f"{checkpoint.name}{tag}-ppl{args.max_windows}.json"), flags
        )["ppl"]

    float_ppl = signround_eval(args.model, work / f"float-ppl{args.max_windows}.json", windows)["ppl"]
    rows: list[dict] = []
    double: list[dict] = []

    def grids(table: list[tuple]) -> None:
        for label, dtype, bits, group, methods, *extra in table:
            flags = tuple(extra[0]) if extra else ()
            name = f"{dtype}-w{bits}g{group}" + ("-search" if flags else "")
            for method in methods:
                q = quantize(name, dtype, bits, group, method, flags)
                rows.append({"grid": label, "dtype": "search" if flags else dtype, "bits": bits, "group_size": group,
                             "method": method, "bits_per_weight": q["bits_per_weight"], "ppl": ppl(q["checkpoint"]),
                             "quant_seconds": q["quant_seconds"]})  # fmt: skip
                write(args, command, float_ppl, rows, double)

    def double_rounding(method: str) -> None:
        serve = ",".join(map(str, SERVE))
        w8 = quantize("dr-int-w8g128", "int", 8, 128, method, ("--serve-bits", serve))
        double.append({"bits": 8, "method": method, "derived": ppl(w8["checkpoint"]), "direct": ppl(w8["checkpoint"])})
        for bits in SERVE:
            direct = quantize(f"int-w{bits}g128", "int", bits, 128, method)
            double.append({"bits": bits, "method": method, "derived": ppl(w8["checkpoint"], bits),
                           "direct": ppl(direct["checkpoint"])})  # fmt: skip
            write(args, command, float_ppl, rows, double)

    grids(GRIDS_4)
    if not args.skip_double_rounding:
        double_rounding("signround")
    grids(GRIDS_REST)
    if not args.skip_double_rounding:
        double_rounding("rtn")
    write(args, command, float_ppl, rows, double)
    plot(rows, float_ppl)
    print((ROOT / "bench" / "results" / "formats.md").read_text())


def write(args, command: str, float_ppl: float, rows: list[dict], double: list[dict]) -> None:
    results = ROOT / "bench" / "results"
    payload = {"command": command, "float_ppl": float_ppl, "eval_windows": args.max_windows, "rows": rows,
               "double_rounding": double}  # fmt: skip
    (results / "formats.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "# Number formats on SmolLM2-135M: perplexity vs bits per weight; Double Rounding",
        "",
        f"Command: `{command}`",
        "",
        f"SmolLM2-135M-Instruct, decoder linears quantized (embeddings and head in float). SignRound rows: "
        f"{args.nsamples} x {args.seqlen} calibration tokens ({Path(args.dataset).name}), batch {args.batch_size}, "
        f"{args.iters} iterations (a light recipe, the same for every row). Perplexity: wikitext-2 test, seqlen "
        f"2048, the first {args.max_windows} windows; float model {float_ppl:.3f}. CPU, float32. Bits per weight "
        "count the codes and each format's per-group storage (float16 scale; a 4-bit zero point for asymmetric "
        "INT; an 8-bit E8M0 / E4M3 block scale for MXFP4 / NVFP4; scale + 4-bit zero + 3-bit type id for "
        "BitMoD) over the decoder linears. `FP4 searched`: each layer gets e2m1, e1m2 or e3m0 by the least "
        "activation-weighted rounding error (`--format-search`, LLM-FP4's format search).",
        "",
        "| grid | bits/weight | method | ppl | quant s |",
        "|---|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['grid']} | {r['bits_per_weight']:.3f} | {r['method']} | {r['ppl']:.3f} | {r['quant_seconds']:.0f} |"
        )
    if double:
        lines += [
            "",
            "## Double Rounding: one W8 G128 asym checkpoint served at lower widths",
            "",
            "> Nested precision (`--nested`, every served width tuned with the stored one) is measured in",
            "> [nested.md](nested.md) (and nested.json), with the direct and derived widths beside it at today's "
            "defaults.",
            "",
            "`derived`: the W8 checkpoint (quantized once, with `--serve-bits 6,4,3,2`) evaluated with "
            "`signround eval --bits B`, its codes rounded to B bits (no re-tuning); `direct`: quantized at B bits "
            "with the same method and recipe.",
            "",
            "| bits | method | derived ppl | direct ppl | derived / direct |",
            "|---:|---|---:|---:|---:|",
        ]
        for d in double:
            ratio = d["derived"] / d["direct"]
            lines.append(f"| {d['bits']} | {d['method']} | {d['derived']:.3f} | {d['direct']:.3f} | {ratio:.3f} |")
    lines += ["", "![ppl vs bits per weight](formats.png)", ""]
    (results / "formats.md").write_text("\n".join(lines))


def plot(rows: list[dict], float_ppl: float) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = {"rtn": "o", "signround": "s"}
    for r in rows:
        color = {"int": "tab:blue", "bitmod": "tab:purple", "search": "tab:green"}.get(r["dtype"], "tab:orange")
        filled = r["method"] == "signround"
        ax.scatter(r["bits_per_weight"], r["ppl"], marker=markers[r["method"]], color=color if filled else "none",
                   edgecolors=color, s=45)  # fmt: skip
        ax.annotate(f"{r['grid'].split(' (')[0]}", (r["bits_per_weight"], r["ppl"]), fontsize=6,
                    xytext=(4, 2), textcoords="offset points")  # fmt: skip
    ax.axhline(float_ppl, color="gray", ls="--", lw=1, label=f"float {float_ppl:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (codes + per-group scales / zeros / type ids)")
    ax.set_ylabel("wikitext-2 ppl (log scale)")
    ax.set_title(
        "SmolLM2-135M: open = RTN, filled = SignRound; blue INT, orange FP/MX/NV, purple BitMoD, green FP4 search"
    )
    ax.title.set_fontsize(9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(ROOT / "bench" / "results" / "formats.png", dpi=110)


if __name__ == "__main__":
    main()
