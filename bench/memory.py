"""Memory benchmark (not a test): peak RSS of a quantization run that streams blocks (``--low-memory``)
against one that holds the model, on synthetic LLaMA-shaped models of one width at 1x and 2x depth, and
on SmolLM2-135M next to auto-round 0.16.1 (bench environment) at the same settings. ``--vocab N`` adds a
large-vocabulary row: 2 layers of hidden 640 with a tied N x 640 embedding (262144: Gemma's vocabulary, 0.7 GB
of float32 weights, nearly all embedding), next to auto-round too unless ``--skip-autoround``.

Every run is a separate process (the peak RSS is its own ``VmHWM``, from signround's ``--report``).
The synthetic models have random weights (saved to safetensors first, with SmolLM2's tokenizer); their
quality means nothing, only memory is measured. Finished rows in ``--work`` are reused.

    python bench/memory.py --work /tmp/bench/mem
    python bench/memory.py --work /tmp/bench/mem --rows vocab --vocab 262144 --skip-autoround --results /tmp/bench/mem
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, ROOT, Recipe, autoround_quantize, pyplot, signround_quantize  # noqa: E402


def synthetic(work: Path, layers: int, hidden: int, intermediate: int, vocab: int | None = None) -> Path:
    """A random-init LLaMA-shaped model (GQA 16 heads / 4 kv heads, tied embedding) saved with SmolLM2's
    tokenizer; ``vocab`` rows of embedding (None: the tokenizer's 49152; a larger one leaves rows unused)."""
    folder = work / (f"synthetic-h{hidden}-l{layers}" + (f"-v{vocab}" if vocab else ""))
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from signround.model.load import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=8, help="depth of the 1x model (the 2x model has twice as many)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--skip-autoround", action="store_true")
    p.add_argument(
        "--rows",
        default="depth,smollm2",
        help="comma-separated models to run: depth (the 1x/2x synthetic pair), smollm2, vocab (--vocab adds it)",
    )
    p.add_argument("--vocab", type=int, default=0, help="embedding rows of the large-vocabulary model (e.g. 262144)")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"), help="where <name>.md/.json/.png go")
    p.add_argument("--name", default="memory", help="the tables' file name (memory-vocab for a --rows vocab run)")
    args = p.parse_args()
    command = "python " + shlex.join(["bench/memory.py", *sys.argv[1:]])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dataset = str(DATA / "calib-c4.jsonl")
    wanted = set(args.rows.split(",")) | ({"vocab"} if args.vocab > 0 else set())
    if "vocab" in wanted and args.vocab <= 0:
        raise SystemExit("--rows vocab needs --vocab N (the embedding rows, e.g. 262144)")
    rows = []
    models = []
    if "depth" in wanted:
        for k in (1, 2):
            folder = synthetic(work, args.layers * k, args.hidden, args.intermediate)
            models.append((f"synthetic {args.layers * k} layers", str(folder)))
    if "smollm2" in wanted:
        models.append(("SmolLM2-135M", "smollm2-135m"))
    if "vocab" in wanted:
        models.append((vocab_label(args.vocab), str(synthetic(work, 2, 640, 1024, args.vocab))))
    for label, model in models:
        recipe = Recipe(model, dataset, args.nsamples, args.seqlen, args.batch_size, 42)
        tag = Path(model).name
        for low in (False, True):
            out = work / f"{tag}-w4g128-{'low' if low else 'full'}"
            rep = signround_quantize(recipe, 4, 128, False, "signround", args.iters, out, ["--low-memory"] * low)
            tool = "signround --low-memory" if low else "signround"
            rows.append({"model": label, "tool": tool, "peak_rss_gb": rep["peak_rss_gb"], "seconds": rep["seconds"]})
            write(command, args, rows)
        if not label.startswith("synthetic ") and not args.skip_autoround:  # SmolLM2 and the large vocabulary
            rep = autoround_quantize(recipe, 4, 128, False, args.iters, work / f"{tag}-w4g128-autoround")
            tool = "auto-round 0.16.1"
            rows.append({"model": label, "tool": tool, "peak_rss_gb": rep["peak_rss_gb"], "seconds": rep["seconds"]})
            write(command, args, rows)
    print((Path(args.results) / f"{args.name}.md").read_text())


def vocab_label(vocab: int) -> str:
    """The table's name of the large-vocabulary model."""
    return f"vocab {vocab} x 640, 2 layers"


def write(command: str, args: argparse.Namespace, rows: list[dict]) -> None:
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{args.name}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Peak memory of a quantization run",
        "",
        f"Command: `{command}`",
        "",
        f"SignRound W4G128 asym, {args.nsamples} x {args.seqlen} calibration tokens (C4 sample), batch "
        f"{args.batch_size}, {args.iters} iterations per block, float32 on CPU. Peak RSS = the process's "
        "`VmHWM` when tuning ends (loading and tuning; the checkpoint write that follows is not counted, for "
        "either tool). Synthetic models: LLaMA-shaped, hidden "
        f"{args.hidden}, intermediate {args.intermediate}, 16 heads / 4 kv heads, SmolLM2's vocabulary, random "
        "weights in safetensors."
        + (
            f" Large-vocabulary model: LLaMA-shaped, 2 layers, hidden 640, intermediate 1024, a tied {args.vocab} "
            "x 640 embedding, random weights."
            if args.vocab
            else ""
        ),
        "",
        "| model | tool | peak RSS GB | seconds |",
        "|---|---|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['tool']} | {r['peak_rss_gb']:.3f} | {r['seconds']:.0f} |")
    by = {(r["model"], r["tool"]): r["peak_rss_gb"] for r in rows}
    one, two = f"synthetic {args.layers} layers", f"synthetic {2 * args.layers} layers"
    lines.append("")
    for tool in ("signround", "signround --low-memory"):
        if (one, tool) in by and (two, tool) in by:
            lines.append(f"- {tool}: 2x depth / 1x depth peak RSS = {by[(two, tool)] / by[(one, tool)]:.3f}")
    for model in ("SmolLM2-135M", vocab_label(args.vocab)):
        for tool in ("signround", "signround --low-memory"):
            key, ref = (model, tool), (model, "auto-round 0.16.1")
            if key in by and ref in by:
                lines.append(f"- {model}, {tool} / auto-round peak RSS = {by[key] / by[ref]:.3f}")
    (results / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    plot(rows, results / f"{args.name}.png")


def plot(rows: list[dict], path: Path) -> None:
    """Peak RSS bars per model, one bar per tool."""
    plt = pyplot()
    if plt is None:
        return
    models = list(dict.fromkeys(r["model"] for r in rows))
    tools = list(dict.fromkeys(r["tool"] for r in rows))
    colors = {"signround": "tab:blue", "signround --low-memory": "tab:cyan", "auto-round 0.16.1": "tab:orange"}
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(tools)
    for k, tool in enumerate(tools):
        xs = [
            m + k * width
            for m, model in enumerate(models)
            if any(r["model"] == model and r["tool"] == tool for r in rows)
        ]
        ys = [r["peak_rss_gb"] for model in models for r in rows if r["model"] == model and r["tool"] == tool]
        ax.bar(xs, ys, width, label=tool, color=colors.get(tool))
    ax.set_xticks([m + width * (len(tools) - 1) / 2 for m in range(len(models))], models)
    ax.set_ylabel("peak RSS (GB)")
    ax.set_title("Peak memory of a quantization run (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
