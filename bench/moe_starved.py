"""What starved experts should get, and which routing the student should follow (not a test).

On the upcycled SmolLM2 mixture of experts of ``bench/upcycle.py`` (8 experts, top-2, one expert per layer
routed about 0.4% of the calibration tokens), the first ``--blocks`` blocks are quantized (the rest kept
float by a rule, so a run takes minutes) with:

- ``--starved-experts block`` with ``--expert-min-tokens 0``: every expert tuned with its block on the
  tokens routed to it (auto-round's way);
- ``own`` and ``init`` with ``--expert-min-tokens 1000000000``: every expert quantized alone on every
  calibration token (SignRound steps on its own output error; or the clipping search only);
- ``--routing teacher`` (with the default starved handling) next to the default ``student``.

Each expert is then judged on held-out text (wikitext-2 test, the first ``--held-out`` tokens): its relative
output error ``|q(x) - f(x)|^2 / |f(x)|^2`` over the tokens the float model routes to it, on the float model's
hidden states ``x``; experts are binned by how many calibration tokens they were routed. Plus the
perplexity of each partly quantized model (signround's code, the same windows). The result decides
``--expert-min-tokens``' default: the token count below which ``own`` beats ``block``.

    .venv/bin/python bench/moe_starved.py --model bench/work/moe/<upcycled folder> --work bench/work/moe-starved
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, ROOT, beside, recipe_key, sh, signround_eval, source_sha  # noqa: E402

BINS = (0, 16, 32, 64, 128, 256, 512, 1024, 10**9)


def quantize(model: str, out: Path, flags: list[str]) -> dict:
    """``signround quantize`` (once; reused from ``out``'s report); returns its JSON report."""
    report = beside(out, ".report.json")
    if not report.is_file():
        sh([sys.executable, "-m", "signround.cli", "quantize", "--model", model, "--output", str(out), "--overwrite",
            "--quiet", "--report", str(report), *flags])  # fmt: skip
    return json.loads(report.read_text())


def perplexity(model: str, out: Path, windows: int) -> float:
    result = signround_eval(model, out, ["--ppl", "wikitext2", "--seqlen", "2048", "--max-windows", str(windows)])
    return result["ppl"]["wikitext2"] if isinstance(result.get("ppl"), dict) else result["ppl"]


@torch.no_grad()
def held_out_states(model, ids: torch.Tensor, blocks: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per MoE layer ``i < blocks``: the float model's experts inputs ``[T, H]`` and routing indices ``[T, k]``."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [
        model.model.layers[i].mlp.experts.register_forward_pre_hook(
            lambda _m, a, i=i: seen.__setitem__(i, (a[0].reshape(-1, a[0].shape[-1]), a[1].reshape(-1, a[1].shape[-1])))
        )
        for i in range(blocks)
    ]
    model(ids)
    for h in handles:
        h.remove()
    return seen


@torch.no_grad()
def expert_errors(float_model, quantized, states, blocks: int) -> dict[tuple[int, int], float]:
    out = {}
    for i in range(blocks):
        x, index = states[i]
        for e in range(len(float_model.model.layers[i].mlp.experts)):
            rows = (index == e).any(-1)
            if not rows.any():
                continue
            ref = float_model.model.layers[i].mlp.experts[e](x[rows])
            q = quantized.model.layers[i].mlp.experts[e](x[rows])
            out[(i, e)] = ((q - ref).pow(2).sum() / ref.pow(2).sum()).item()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the upcycled folder (bench/upcycle.py)")
    p.add_argument("--work", required=True)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--held-out", type=int, default=8192, help="wikitext-2 tokens for the per-expert errors")
    p.add_argument("--windows", type=int, default=10)
    p.add_argument(
        "--results", default=str(ROOT / "bench" / "results" / "moe-starved"), help="writes RESULTS.{md,json}"
    )
    p.add_argument("--runs", default="block,own,init,default,teacher", help="which of the runs, comma-separated")
    p.add_argument("--seeds", default="42", help="tuning and calibration seeds, comma-separated")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    later = "|".join(str(i) for i in range(args.blocks, 64))
    keep = json.dumps({rf"model\.layers\.({later})\.": {"bits": 16}})
    base = ["--bits", str(args.bits), "--group-size", "128", "--iters", str(args.iters), "--nsamples", "32",
            "--seqlen", "256", "--batch-size", "8", "--dataset", str(DATA / "calib-c4.jsonl"),
            "--layer-config", keep]  # fmt: skip
    runs = {
        "block": ["--starved-experts", "block", "--expert-min-tokens", "0"],
        "own": ["--starved-experts", "own", "--expert-min-tokens", "1000000000"],
        "init": ["--starved-experts", "init", "--expert-min-tokens", "1000000000"],
        "default": [],
        "teacher": ["--routing", "teacher"],
    }
    wanted = args.runs.split(",")
    if unknown := set(wanted) - runs.keys():
        raise SystemExit(f"unknown --runs {sorted(unknown)}; choose from {', '.join(runs)}")
    runs = {k: v for k, v in runs.items() if k in wanted}
    from signround.model.experts import unfuse_experts
    from signround.model.load import load_model

    float_model, tokenizer = load_model(args.model)
    unfuse_experts(float_model)
    float_model.eval()
    text = (DATA / "wikitext2-test.raw").read_text()
    ids = tokenizer(text[: args.held_out * 8], return_tensors="pt").input_ids[:, : args.held_out]
    states = held_out_states(float_model, ids.reshape(-1, 1024), args.blocks)
    rows: dict[str, list[dict]] = {name: [] for name in runs}  # run -> one row per seed
    tag = f"w{args.bits}-b{args.blocks}-i{args.iters}"
    sha = source_sha()
    for seed, (name, flags) in ((int(s), r) for s in args.seeds.split(",") for r in runs.items()):
        flags = [*flags, "--seed", str(seed)]
        # a cached run is reused only when its whole recipe (model, flags, signround's source) matches
        key = recipe_key({"model": args.model, "flags": base + flags, "signround": sha})
        out = work / f"{tag}-{name}-{key}"
        report = quantize(args.model, out, base + flags)
        tokens = {b["index"]: b["expert_tokens"]["mlp.experts"] for b in report["blocks"] if b.get("expert_tokens")}
        quantized, _ = load_model(str(out))
        errors = expert_errors(float_model, quantized.eval(), states, args.blocks)
        del quantized
        rows[name].append({
            "seed": seed,
            "flags": flags,
            "recipe_key": key,
            "seconds": report["seconds"],
            "peak_rss_gb": report["peak_rss_gb"],
            "ppl": perplexity(str(out), beside(out, ".ppl.json"), args.windows),
            "experts": [
                {"layer": i, "expert": e, "calib_tokens": tokens[i][e], "error": err}
                for (i, e), err in sorted(errors.items())
            ],  # fmt: skip
        })  # fmt: skip
        print(name, seed, rows[name][-1]["ppl"], flush=True)
    float_ppl = perplexity(args.model, work / f"float-{args.windows}.ppl.json", args.windows)
    write(rows, float_ppl, args, base)


def write(rows: dict[str, list[dict]], float_ppl: float, args: argparse.Namespace, base: list[str]) -> None:
    results = Path(args.results)
    seeds = [r["seed"] for r in next(iter(rows.values()))]
    meta = {"command": shlex.join(sys.argv[1:]), "signround_source": source_sha(), "float_ppl": float_ppl}
    results.with_suffix(".json").write_text(json.dumps({**meta, "runs": rows}, indent=1) + "\n")
    lines = [
        "# Starved experts and routing on the upcycled SmolLM2 mixture of experts",
        "",
        f"Command: `.venv/bin/python bench/moe_starved.py {shlex.join(sys.argv[1:])}`",
        "",
        f"The first {args.blocks} blocks quantized at W{args.bits}G128-asym, {args.iters} iterations, 32 x 256 "
        f"calibration tokens (C4 sample; seeds {', '.join(map(str, seeds))}: the seed picks the samples and the "
        "batches), the later blocks kept float. Per-expert errors on the first "
        f"{args.held_out} tokens of wikitext-2 test (relative output error over the tokens the float model routes "
        f"to the expert, float hidden states); perplexity on {args.windows} windows of 2048 (float model: "
        f"{float_ppl:.3f}). signround flags: `{shlex.join(base[:-2])} --layer-config <keep later blocks float>`.",
        "",
        "Mean relative error of the experts (over experts and seeds), binned by the calibration tokens they were "
        "routed (experts: count over seeds):",
        "",
        "| calibration tokens | experts | " + " | ".join(rows) + " |",
        "|---|---|" + "---|" * len(rows),
    ]
    for lo, hi in zip(BINS[:-1], BINS[1:], strict=True):
        per = {
            n: [x["error"] for r in rs for x in r["experts"] if lo <= x["calib_tokens"] < hi] for n, rs in rows.items()
        }
        count = len(next(iter(per.values())))
        if count:
            cells = " | ".join(f"{sum(v) / len(v):.5f}" if v else "-" for v in per.values())
            lines.append(f"| {lo}-{hi - 1 if hi < 10**9 else '...'} | {count} | {cells} |")
    lines += ["", "| run | flags | ppl mean (min-max) | ppl per seed | quant seconds (ratio to block, mean) "
              "| peak RSS GB |", "|---|---|---|---|---|---|"]  # fmt: skip
    for n, rs in rows.items():
        ppl = [r["ppl"] for r in rs]
        ratio = [r["seconds"] / b["seconds"] for r, b in zip(rs, rows["block"], strict=True)] if "block" in rows else []
        lines.append(
            f"| {n} | `{shlex.join(rs[0]['flags'][:-2])}` | {sum(ppl) / len(ppl):.3f} ({min(ppl):.3f}-{max(ppl):.3f}) "
            f"| {', '.join(f'{x:.3f}' for x in ppl)} | {sum(ratio) / len(ratio) if ratio else float('nan'):.2f} "
            f"| {max(r['peak_rss_gb'] for r in rs):.2f} |"
        )
    results.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
