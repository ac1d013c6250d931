"""llama.cpp benchmark (not a test): signround's GGUF files run by llama.cpp itself, next to llama.cpp's own
quantizer applied to our F16 export of the same float model. Run it with the bench environment's python,
where llama-cpp-python is built (it compiles llama.cpp; see bench/requirements-bench.txt):

    bench/.venv-bench/bin/python bench/llamacpp.py --work /tmp/bench/llama --max-windows 10 \\
        --ours "signround Q4_K=/tmp/bench/exp/Q4_K-signround-gguf-q4_k/gguf-q4_k" \\
        --ours "RTN Q4_K=/tmp/bench/exp/Q4_K-rtn-gguf-q4_k/gguf-q4_k"

Perplexity: llama.cpp's logits on the token windows signround's perplexity code builds (wikitext-2 test,
the model's own HF tokenizer, seqlen 2048, the first ``--max-windows`` windows, every token but the first
of a window scored). llama.cpp's quantizer gets ``--type`` (default Q4_K_S: the same per-tensor choices as
``gguf:q4_k``, Q5_0 where a row is not a multiple of 256) and keeps the embeddings F16 as our files do.
Writes bench/results/llamacpp.md.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MAIN_PY = ROOT / ".venv" / "bin" / "python"
PROMPT = "The capital of France is"


def gguf_in(folder: Path) -> Path:
    (path,) = sorted(folder.glob("*.gguf")) if folder.is_dir() else [folder]
    return path


def f16_export(model: str, work: Path) -> Path:
    out = work / "f16"
    if not out.exists():
        cmd = [str(MAIN_PY), "-m", "signround.cli", "export", "--model", model, "--format", "gguf:f16",
               "--output", str(out), "--quiet"]  # fmt: skip
        subprocess.run(cmd, check=True)
    return gguf_in(out)


def llama_quantize(src: Path, dst: Path, ftype_name: str) -> Path:
    """llama.cpp's ``llama_model_quantize`` of ``src`` to ``ftype_name``, embeddings kept F16."""
    import llama_cpp

    if dst.is_file():
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.token_embedding_type = llama_cpp.GGML_TYPE_F16
    params.output_tensor_type = llama_cpp.GGML_TYPE_F16
    params.nthread = os.cpu_count() or 1
    tmp = dst.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc}) on {src}")
    tmp.rename(dst)
    return dst


def windows(model: str, max_windows: int) -> np.ndarray:
    """Token windows ``[n, 2048]`` exactly as signround's perplexity code cuts them."""
    from transformers import AutoTokenizer

    from signround.eval.ppl import resolve_text, tokenize_windows
    from signround.model.load import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    text = resolve_text("wikitext2").read_text(encoding="utf-8")
    return tokenize_windows(text, tokenizer, 2048, max_windows).numpy()


def score(path: Path, wins: np.ndarray) -> tuple[float, str]:
    """(perplexity, greedy continuation of ``PROMPT``) from llama.cpp on ``path``."""
    from llama_cpp import Llama

    threads = os.cpu_count() or 1
    llm = Llama(str(path), n_ctx=2048, n_batch=512, logits_all=True, n_threads=threads, verbose=False)
    nll, count = 0.0, 0
    for w in wins:
        llm.reset()
        llm.eval(w.tolist())
        logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        nll += float((logz - logits[np.arange(len(w) - 1), w[1:]]).sum())
        count += len(w) - 1
    llm.reset()
    text = llm.create_completion(PROMPT, max_tokens=20, temperature=0.0)["choices"][0]["text"]
    return math.exp(nll / count), text


def tensor_types(path: Path) -> str:
    from collections import Counter

    from gguf import GGUFReader

    counts = Counter(t.tensor_type.name for t in GGUFReader(path).tensors if t.name.startswith("blk."))
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()) if k != "F32")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--type", default="Q4_K_S", help="llama.cpp file type for its own quantizer (LLAMA_FTYPE_MOSTLY_*)")
    p.add_argument("--ours", action="append", default=[], metavar="LABEL=FOLDER", help="signround GGUF files to run")
    p.add_argument("--max-windows", type=int, default=10)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    f16 = f16_export(args.model, work)
    theirs = llama_quantize(f16, work / f"llamacpp-{args.type.lower()}.gguf", args.type)
    files = [("float (signround gguf:f16)", f16), (f"llama.cpp quantizer {args.type} of that file", theirs)]
    files += [(label, gguf_in(Path(folder))) for label, folder in (o.split("=", 1) for o in args.ours)]
    wins = windows(args.model, args.max_windows)
    rows = []
    for label, path in files:
        ppl, text = score(path, wins)
        rows.append((label, path, ppl, text))
        print(f"{label}: ppl {ppl:.4f} | {text!r}", flush=True)
    command = "bench/.venv-bench/bin/python " + shlex.join(["bench/llamacpp.py", *sys.argv[1:]])
    lines = [
        "# signround's GGUF files in llama.cpp, next to llama.cpp's own quantizer",
        "",
        f"Command: `{command}`",
        "",
        f"Model `{args.model}`. Perplexity computed from llama.cpp's logits (llama-cpp-python) on wikitext-2 test, "
        f"seqlen 2048, the first {len(wins)} windows, tokenized as signround's perplexity code does. llama.cpp's "
        f"quantizer ran on signround's F16 export with file type {args.type}, embeddings kept F16 (as in our "
        f"files). Greedy continuation of {PROMPT!r}, 20 tokens. CPU.",
        "",
        "| file | block types (decoder) | size MB | ppl (llama.cpp) | continuation |",
        "|---|---|---:|---:|---|",
    ]
    for label, path, ppl, text in rows:
        size = path.stat().st_size / 1e6
        cont = text.replace("|", "/").replace("\n", " ").strip()
        lines.append(f"| {label} | {tensor_types(path)} | {size:.1f} | {ppl:.4f} | {cont} |")
    (ROOT / "bench" / "results" / "llamacpp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
