"""llama.cpp benchmark (not a test): signround's GGUF files run by llama.cpp itself, next to llama.cpp's own
quantizer applied to our F16 export of the same float model. Run it with the bench environment's python,
where llama-cpp-python is built (it compiles llama.cpp; see bench/requirements-bench.txt):

    bench/.venv-bench/bin/python bench/llamacpp.py --work /tmp/bench/llama --max-windows 10 \\
        --ours "signround Q4_K=/tmp/bench/exp/Q4_K-signround-gguf-q4_k/gguf-q4_k" \\
        --ours "RTN Q4_K=/tmp/bench/exp/Q4_K-rtn-gguf-q4_k/gguf-q4_k" --type Q4_K_S --type Q4_K_M

Perplexity: llama.cpp's logits on the token windows signround's perplexity code builds (wikitext-2 test,
the model's own HF tokenizer, seqlen 2048, the first ``--max-windows`` windows, every token but the first
of a window scored). llama.cpp's quantizer gets each ``--type`` (default Q4_K_S) without an importance matrix
and keeps the embeddings F16 as our files do; the table lists each file's per-tensor types so that files of
the same types are compared (Q4_K_M matches ``gguf:q4_k_m``; Q4_K_S gives the first n/8 ``ffn_down`` Q5_K where
``gguf:q4_k`` keeps Q4_K).
Writes bench/results/llamacpp.md (``--name``: another file, e.g. for a mixture of experts).

``--native LABEL=FOLDER`` adds, for the file of that label, signround's own perplexity of the checkpoint the
file was exported from (``signround eval``, the same windows; the float row gets the model's): a GGUF export
that llama.cpp runs as signround does scores the same in both columns.
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
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

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


def without_extra_buffers() -> None:
    """Load models without llama.cpp's extra CPU buffer types (AMX / interleaved repacking).

    On this machine's CPU (AMX_INT8 reported) llama.cpp repacks quantized tensors for AMX at load time and the
    first forward then dies with a segmentation fault, for llama.cpp's own Q4_K_S file as much as for ours;
    F16 files never take that path. ``use_extra_bufts = False`` keeps the plain CPU kernels (same math).
    """
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params
    if getattr(default, "_no_extra", False):
        return

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    params._no_extra = True
    lib.llama_model_default_params = params


def score(path: Path, wins: np.ndarray) -> tuple[float, str]:
    """(perplexity, greedy continuation of ``PROMPT``) from llama.cpp on ``path``."""
    from llama_cpp import Llama

    without_extra_buffers()

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


def cached_score(path: Path, wins: np.ndarray, work: Path) -> tuple[float, str]:
    """:func:`score`, kept in ``work/scores`` per file (path, size, mtime) and token windows."""
    import hashlib
    import json

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode() + wins.tobytes()).hexdigest()
    cache = work / "scores" / f"{key[:24]}.json"
    if cache.is_file():
        entry = json.loads(cache.read_text())
        return entry["ppl"], entry["text"]
    ppl, text = score(path, wins)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"file": str(path), "ppl": ppl, "text": text}))
    return ppl, text


def signround_ppl(model: str, max_windows: int, work: Path) -> float:
    """signround's perplexity of ``model`` (a folder or alias) on the windows :func:`windows` cuts, with the main
    environment's python (cached while the model's files match: ``common.signround_eval``)."""
    import hashlib

    from common import signround_eval

    name = hashlib.sha256(str(Path(model).resolve() if Path(model).exists() else model).encode()).hexdigest()[:24]
    flags = ["--ppl", "wikitext2", "--seqlen", "2048", "--max-windows", str(max_windows)]
    (work / "scores").mkdir(parents=True, exist_ok=True)
    return signround_eval(model, work / "scores" / f"signround-{name}.json", flags, python=str(MAIN_PY))["ppl"]


def file_info(path: Path) -> tuple[str, dict[str, str]]:
    """(llama.cpp file type name, {tensor name: tensor type} of the decoder blocks) of a GGUF file."""
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(path)
    field = reader.fields["general.file_type"]
    ftype = LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_")
    types = {t.name: t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.")}
    return ftype, types


class Row(NamedTuple):
    label: str
    path: Path
    ppl: float
    text: str
    ours: float | None  # signround's perplexity of the checkpoint the file came from (--native), or None
    ftype: str  # llama.cpp file type name, e.g. Q4_K_M
    tensors: dict[str, str]  # decoder tensor name -> GGUF type name


def type_counts(types: dict[str, str]) -> str:
    from collections import Counter

    counts = Counter(v for v in types.values() if v != "F32")
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--type", action="append", default=[],
                   help="llama.cpp file type(s) for its own quantizer (LLAMA_FTYPE_MOSTLY_*; repeatable; "
                   "default Q4_K_S)")  # fmt: skip
    p.add_argument("--ours", action="append", default=[], metavar="LABEL=FOLDER", help="signround GGUF files to run")
    p.add_argument("--native", action="append", default=[], metavar="LABEL=FOLDER",
                   help="the checkpoint an --ours file came from: adds signround's perplexity of it")  # fmt: skip
    p.add_argument("--max-windows", type=int, default=10)
    p.add_argument("--name", default="llamacpp", help="writes bench/results/<name>.md")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    types = args.type or ["Q4_K_S"]
    f16 = f16_export(args.model, work)
    files = [("float (signround gguf:f16)", f16)]
    for t in types:
        files.append(
            (f"llama.cpp quantizer {t} of that file", llama_quantize(f16, work / f"llamacpp-{t.lower()}.gguf", t))
        )
    files += [(label, gguf_in(Path(folder))) for label, folder in (o.split("=", 1) for o in args.ours)]
    wins = windows(args.model, args.max_windows)
    natives = dict(n.split("=", 1) for n in args.native)
    natives[files[0][0]] = args.model
    if unknown := set(natives) - {label for label, _ in files}:
        raise SystemExit(f"--native labels {sorted(unknown)} name no --ours file")
    rows = []
    for label, path in files:
        ppl, text = cached_score(path, wins, work)
        ours = signround_ppl(natives[label], args.max_windows, work) if label in natives else None
        rows.append(Row(label, path, ppl, text, ours, *file_info(path)))
        print(f"{label}: ppl {ppl:.4f} | {text!r}", flush=True)
    first = {}  # file type -> its first appearance (float first, then llama.cpp's types in --type order)
    for r in rows:
        first.setdefault(r.ftype, len(first))
    rows.sort(key=lambda r: first[r.ftype])  # stable: within a file type, in the order given
    theirs = {r.ftype: r.tensors for r in rows if r.label.startswith("llama.cpp")}
    command = "bench/.venv-bench/bin/python " + shlex.join(["bench/llamacpp.py", *sys.argv[1:]])
    lines = [
        "# signround's GGUF files in llama.cpp, next to llama.cpp's own quantizer",
        "",
        f"Command: `{command}`",
        "",
        f"Model `{args.model}`. Perplexity computed from llama.cpp's logits (llama-cpp-python) on wikitext-2 test, "
        f"seqlen 2048, the first {len(wins)} windows, tokenized as signround's perplexity code does. llama.cpp's "
        f"quantizer ran on signround's F16 export with file type(s) {', '.join(types)}, embeddings kept F16 (as "
        f"in our files), no importance matrix. Greedy continuation of {PROMPT!r}, 20 tokens. CPU, llama.cpp's "
        "extra (AMX/repacked) buffer types off (they crash on this CPU; see `without_extra_buffers`).",
        "",
        "Same types: decoder tensors whose GGUF type equals that of llama.cpp's file of the same file type.",
        "",
        "ppl (signround): signround's own perplexity of the checkpoint the file was exported from (`--native`), "
        "same windows.",
        "",
        "| file | file type | decoder tensor types | same types | size MB | ppl (llama.cpp) | ppl (signround) "
        "| continuation |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ref = theirs.get(r.ftype)
        same = f"{sum(ref.get(k) == v for k, v in r.tensors.items())}/{len(r.tensors)}" if ref else ""
        size = r.path.stat().st_size / 1e6
        cont = r.text.replace("|", "/").replace("\n", " ").strip()
        lines.append(
            f"| {r.label} | {r.ftype} | {type_counts(r.tensors)} | {same} | {size:.1f} | {r.ppl:.4f} "
            f"| {'' if r.ours is None else f'{r.ours:.4f}'} | {cont} |"
        )
    (ROOT / "bench" / "results" / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
