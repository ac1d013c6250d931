"""Export benchmark (not a test): each exported file of SmolLM2-135M read back by the third-party reader
its users run, scored with the same perplexity code next to signround's own number; writes
bench/results/exports.md.

    python bench/exports.py --work /tmp/bench/work --max-windows 20

Checkpoints: W4G128 asym SignRound (the quality benchmark's, reused from --work when there, else tuned with
--iters) for auto_round; round-to-nearest checkpoints (data-free, seconds) for the formats whose readers
need another grid: W4G64 for auto_round and gptq (auto-round's CPU kernels need groups that divide the
width, and read GPTQ on CPU only when symmetric), W4G64 sym/asym for compressed-tensors (same), W4G32
sym/asym and W8G32 sym for GGUF. The point is reader agreement, not tuning quality. A reader that fails is
recorded with its error. ``gguf:q4_k`` / ``gguf:q2_k`` are written by ``quantize --data-type q4_k
--format native,gguf:q4_k`` itself (tuned on the type's structure; SmolLM2's 576-wide rows get the Q5_0 /
Q4_0 fallback), RTN and SignRound.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_PY, ROOT, add_recipe_args, reader_ppl, recipe_from, sh, signround_quantize  # noqa: E402

# (label, source checkpoint, method, bits, group, sym, format, reader, python)
CHECKS = [
    ("W4G128-asym", "signround", 4, 128, False, "auto_round", "auto-round", "bench"),
    ("W4G64-asym", "rtn", 4, 64, False, "auto_round", "auto-round", "bench"),
    ("W4G64-sym", "rtn", 4, 64, True, "gptq", "auto-round", "bench"),
    ("W4G64-sym", "rtn", 4, 64, True, "compressed-tensors", "transformers", "main"),
    ("W4G64-asym", "rtn", 4, 64, False, "compressed-tensors", "transformers-ct-dequantize", "main"),
    ("W4G32-sym", "rtn", 4, 32, True, "gguf:q4_0", "gguf", "main"),
    ("W4G32-asym", "rtn", 4, 32, False, "gguf:q4_1", "gguf", "main"),
    ("W8G32-sym", "rtn", 8, 32, True, "gguf:q8_0", "gguf", "main"),
    # tuned on the type's own structure: quantize writes the file (its Q5_0 fallback layers need the format)
    ("Q4_K", "rtn", 4, 32, False, "gguf:q4_k", "gguf", "main"),
    ("Q4_K", "signround", 4, 32, False, "gguf:q4_k", "gguf", "main"),
    ("Q2_K", "rtn", 2, 16, False, "gguf:q2_k", "gguf", "main"),
    ("Q2_K", "signround", 2, 16, False, "gguf:q2_k", "gguf", "main"),
]
# formats written by quantize itself, with these flags
TUNED_FOR = {"gguf:q4_k": ["--data-type", "q4_k"], "gguf:q2_k": ["--data-type", "q2_k"]}


def reader_error(folder: Path, reader: str, python: str) -> str:
    """The last line of a failing reader's traceback (re-run with one window to capture it)."""
    exe = str(BENCH_PY) if python == "bench" else sys.executable
    cmd = [exe, str(ROOT / "bench" / "reader_ppl.py"), "--folder", str(folder), "--reader", reader,
           "--max-windows", "1", "--json", os.devnull, "--logits", os.devnull]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else f"exit {proc.returncode}").replace("|", "/")[:160]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_recipe_args(p, iters=50)
    p.add_argument("--max-windows", type=int, default=20)
    p.add_argument("--work", required=True, help="folder for checkpoints and reader results (reused)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "exports.md"))
    p.add_argument("--formats", default=None, help="comma-separated formats to check (default: every row)")
    args = p.parse_args()
    only = set(args.formats.split(",")) if args.formats else None
    recipe, work = recipe_from(args), Path(args.work)
    (work / "exports").mkdir(parents=True, exist_ok=True)  # reader results land there for every row
    rows = []
    for label, method, bits, group, sym, fmt, reader, python in CHECKS:
        if only is not None and fmt not in only:
            continue
        src = work / f"{label}-{method}"
        iters = args.iters if method == "signround" else 0
        if fmt in TUNED_FOR:
            both = work / f"{label}-{method}-{fmt.replace(':', '-')}"
            signround_quantize(
                recipe, bits, group, sym, method, iters, both, [*TUNED_FOR[fmt], "--format", f"native,{fmt}"]
            )
            src, exported = both / "native", both / fmt.replace(":", "-")
        else:
            signround_quantize(recipe, bits, group, sym, method, iters, src, [])
            exported = work / "exports" / f"{label}-{method}-{fmt.replace(':', '-')}"
        if not exported.exists():
            # the W4G128 auto_round row shows auto-round's loader failing on partial groups: written on purpose
            sh([sys.executable, "-m", "signround.cli", "export", "--model", str(src), "--format", fmt,
                "--output", str(exported), "--allow-partial-groups", "--quiet"])  # fmt: skip
        mine = work / "exports" / f"{label}-{method}-ours"
        ours, ours_logits = reader_ppl(src, "signround", mine, args.max_windows)
        try:
            theirs, their_logits = reader_ppl(exported, reader, exported.with_name(exported.name + "-read"),
                                              args.max_windows, python)  # fmt: skip
        except subprocess.CalledProcessError:
            err = reader_error(exported, reader, python)
            rows.append((label, method, fmt, reader, f"fails: {err}", ours["ppl"], None, None))
            continue
        diff = (their_logits - ours_logits).abs().max().item() / ours_logits.abs().max().item()
        rows.append((label, method, fmt, reader, theirs["layer_class"], ours["ppl"], theirs["ppl"], diff))
        print(rows[-1], flush=True)
    lines = [
        "# Exports read back by third-party readers (SmolLM2-135M)",
        "",
        f"Command: `python {' '.join(['bench/exports.py', *sys.argv[1:]])}`",
        "",
        f"Perplexity: wikitext-2 test, seqlen 2048, the first {args.max_windows} windows, scored by signround's "
        "perplexity code on the model each reader built. Logit difference: max |theirs − ours| over the first 128 "
        "tokens, relative to max |ours|. SignRound rows: "
        f"{recipe.nsamples} x {recipe.seqlen} calibration tokens from {Path(recipe.dataset).name}, "
        f"{args.iters} iterations; RTN rows are data-free round-to-nearest. CPU, float32.",
        "",
        "| scheme | method | format | reader | reader's layer class | ppl (signround) | ppl (reader) | Δ ppl | "
        "logit diff |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for label, method, fmt, reader, cls, ours, theirs, diff in rows:
        if theirs is None:
            lines.append(f"| {label} | {method} | {fmt} | {reader} | {cls} | {ours:.4f} | — | — | — |")
            continue
        lines.append(
            f"| {label} | {method} | {fmt} | {reader} | `{cls.rsplit('.', 1)[-1]}` | {ours:.4f} | {theirs:.4f} | "
            f"{100 * (theirs - ours) / ours:+.3f}% | {diff:.1e} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
