"""Shared plumbing of the benchmarks: run signround and auto-round as separate processes, reuse finished
rows from a work folder only when their full recipe matches (so a stopped benchmark resumes, and a changed one
reruns), and score every model with signround's code."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# $SIGNROUND_DATA (as signround's own data lookup) and $SIGNROUND_BENCH_PY let a machine without the
# ../shared checkout or the bench venv (a lent GPU machine) point at its copies.
DATA = Path(os.environ.get("SIGNROUND_DATA") or ROOT.parent / "shared" / "data")
BENCH_PY = Path(
    shutil.which(os.environ.get("SIGNROUND_BENCH_PY", "")) or ROOT / "bench" / ".venv-bench" / "bin" / "python"
)


def beside(out: Path, suffix: str) -> Path:
    """A run's side file: ``out`` (the run's output folder) with ``suffix`` appended, in the same folder."""
    return out.with_name(out.name + suffix)


def sh(cmd: list[str], log: Path | None = None) -> None:
    """Run ``cmd``; its stdout goes through, its stderr (progress bars, library logs) is shown only when it
    fails (the last 40 lines), so a broken run says why. With ``log``, the stderr is also kept in that file
    (the libraries' per-block log lines, with their times, for reading a long run afterwards)."""
    print("+", shlex.join(cmd), flush=True)
    done = subprocess.run(cmd, stdout=sys.stdout, stderr=subprocess.PIPE, text=True, errors="replace")
    if log is not None:
        log.write_text(done.stderr)
    if done.returncode != 0:
        print("\n".join(done.stderr.splitlines()[-40:]), file=sys.stderr, flush=True)
        raise subprocess.CalledProcessError(done.returncode, cmd)


@dataclass(frozen=True)
class Recipe:
    """Calibration and tuning settings shared by every tool in a comparison."""

    model: str
    dataset: str
    nsamples: int
    seqlen: int
    batch_size: int
    seed: int

    def flags(self) -> list[str]:
        return [
            "--nsamples",
            str(self.nsamples),
            "--seqlen",
            str(self.seqlen),
            "--batch-size",
            str(self.batch_size),
            "--seed",
            str(self.seed),
            "--dataset",
            self.dataset,
        ]


def config_name(bits: int, group: int, sym: bool) -> str:
    return f"W{bits}G{group}-{'sym' if sym else 'asym'}"


def signround_quantize(
    recipe: Recipe, bits: int, group: int, sym: bool, method: str, iters: int, out: Path, eval_flags: list[str]
) -> dict:
    """Quantize with the signround CLI (once; reused from ``out`` while its recipe matches, see :func:`cached`);
    returns its JSON report."""
    report = beside(out, ".json")
    # fmt: off
    cmd = [sys.executable, "-m", "signround.cli", "quantize", "--model", recipe.model, "--bits", str(bits),
           "--group-size", str(group), "--method", method, "--iters", str(iters), *recipe.flags(),
           "--output", str(out), "--overwrite", "--quiet", "--report", str(report), *eval_flags]
    # fmt: on
    cmd += ["--sym"] if sym else []
    return cached_signround(cmd, report, recipe.dataset, beside(out, ".log"))


def cached_signround(cmd: list[str], report: Path, dataset: str, log: Path | None = None) -> dict:
    """Run ``cmd`` (a ``signround quantize`` that writes the JSON ``report``) once: its report is reused while
    the command, signround's source and the calibration file match (:func:`cached`)."""
    key = {"cmd": cmd[1:], "signround": source_sha(), "data": data_stamp(dataset)}
    return cached(report, key, lambda: sh(cmd, log))


def autoround_quantize(
    recipe: Recipe, bits: int, group: int, sym: bool, iters: int, out: Path, amp: bool = False, extra: tuple = ()
) -> dict:
    """Quantize with auto-round in the bench-only environment (once; reused while its recipe matches, see
    :func:`cached`); returns its JSON report. ``out`` receives auto-round's fake-quantized model as a float
    HF folder."""
    report = beside(out, ".json")
    if not BENCH_PY.is_file():
        raise SystemExit(f"auto-round needs the bench environment {BENCH_PY}; see bench/requirements-bench.txt")
    from signround.model.load import resolve_model

    # fmt: off
    cmd = [str(BENCH_PY), str(ROOT / "bench" / "autoround_run.py"), "--model", resolve_model(recipe.model),
           "--bits", str(bits), "--group-size", str(group), "--iters", str(iters), *recipe.flags(),
           "--output", str(out), "--report", str(report)]
    # fmt: on
    cmd += (["--sym"] if sym else []) + (["--amp"] if amp else []) + list(extra)
    key = {"cmd": cmd[1:], "runner": source_sha("bench/autoround_run.py"), "data": data_stamp(recipe.dataset),
           "sampler": source_sha("signround/calib")}  # fmt: skip
    return cached(report, key, lambda: sh(cmd, beside(out, ".log")))


def signround_eval(model: str, out: Path, flags: list[str], python: str = sys.executable) -> dict:
    """``signround eval`` of ``model`` with ``python`` (once; reused from ``out`` while the model's files, the
    flags and the perplexity code match, see :func:`cached`); returns its JSON."""
    cmd = [python, "-m", "signround.cli", "eval", "--model", model, "--json", str(out), "--quiet", *flags]
    key = {"cmd": cmd[1:], "model": files_stamp(model), "eval": source_sha("signround/eval")}
    return cached(out, key, lambda: sh(cmd))


def reader_ppl(folder: Path, reader: str, out: Path, windows: int, python: str = "main"):
    """``(result, logits)``: bench/reader_ppl.py's perplexity of ``folder`` with ``reader`` (and its logits of
    the first prompt tokens), in ``out.json`` / ``out.pt``; ``python`` "bench" runs it in the bench
    environment. Reused while the command, the folder's files, the reader script and signround's source match."""
    import torch

    js, lg = out.with_suffix(".json"), out.with_suffix(".pt")
    exe = str(BENCH_PY) if python == "bench" else sys.executable
    cmd = [exe, str(ROOT / "bench" / "reader_ppl.py"), "--folder", str(folder), "--reader", reader,
           "--max-windows", str(windows), "--json", str(js), "--logits", str(lg)]  # fmt: skip
    key = {"cmd": cmd, "model": files_stamp(str(folder)), "code": source_sha("bench/reader_ppl.py", "signround")}
    return cached(js, key, lambda: sh(cmd)), torch.load(lg)


def files_stamp(path: str) -> str:
    """Name, size and mtime of every file under ``path`` (a folder or file; an alias stays as it is)."""
    p = Path(path)
    if not p.exists():
        return path
    files = sorted(f for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    return hashlib.sha256("|".join(f"{f.relative_to(p.parent)}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                                   for f in files).encode()).hexdigest()[:16]  # fmt: skip


def data_stamp(path: str) -> str:
    """Size and sha256 prefix of a data file (its path otherwise), for a recipe."""
    p = Path(path)
    if not p.is_file():
        return path
    return f"{p.name}:{p.stat().st_size}:{hashlib.sha256(p.read_bytes()).hexdigest()[:16]}"


def cached(out: Path, recipe: dict, run) -> dict:
    """``out``'s JSON, produced by ``run()`` unless ``out`` exists and its side file ``<out>.recipe.json`` holds
    the same ``recipe`` (a cached result is reused only when its full recipe matches: a file of the same name
    from another bench, flags, data or signround source is redone, not reused)."""
    side = beside(out, ".recipe.json")
    want = json.loads(json.dumps(recipe, sort_keys=True, default=str))
    if out.is_file() and side.is_file() and json.loads(side.read_text()) == want:
        return json.loads(out.read_text())
    side.unlink(missing_ok=True)
    run()
    side.write_text(json.dumps(want, indent=1, sort_keys=True) + "\n")
    return json.loads(out.read_text())


def add_recipe_args(p, iters: int = 200) -> None:
    """The options every comparison shares (auto-round's defaults but seqlen 256 for this CPU)."""
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default=str(DATA / "calib-c4.jsonl"))
    p.add_argument("--configs", default="4:128,3:128,2:128", help="bits:group pairs")
    p.add_argument("--iters", type=int, default=iters)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)


def recipe_from(args) -> Recipe:
    return Recipe(args.model, args.dataset, args.nsamples, args.seqlen, args.batch_size, args.seed)


def parse_configs(spec: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in pair.split(":")) for pair in spec.split(",") if pair]


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'); no plot", file=sys.stderr)
        return None
    return plt


def machine() -> str:
    """One line naming the CPU the numbers came from: model, cores torch uses, its SIMD level, and whether
    bfloat16 matmuls run natively (they decide what ``--amp`` is worth)."""
    import torch

    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from signround.report import native_bf16_cpu

    bf16 = native_bf16_cpu()
    return (
        f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"native bfloat16 matmuls: {'yes' if bf16 else 'no'}"
    )


# ---------------------------------------------------------------- same tokens, fingerprinted recipes
# (added for bench/compare_peers.py; the functions above keep their behaviour for the benches that use them)


def calib_tokens(tokenizer, dataset: str, nsamples: int, seqlen: int, seed: int):
    """``(tokens, sha256)``: the ``[nsamples, seqlen]`` int64 calibration ids that signround's CLI draws for
    ``--dataset DATASET --nsamples N --seqlen L --seed S`` (its own sampler, ``signround.calib.data.
    sample_tokens`` on ``load_texts``, which is what ``calibration_tokens`` runs for a dataset), and the
    sha256 of those ids as contiguous little-endian int64 (shape not included; as bench/upcycle.py's)."""
    import hashlib

    import torch

    from signround.calib.data import load_texts, sample_tokens
    from signround.config import CalibConfig

    cfg = CalibConfig(dataset=dataset, nsamples=nsamples, seqlen=seqlen, seed=seed)
    tokens = sample_tokens(load_texts(dataset), tokenizer, cfg).to(torch.int64).contiguous()
    return tokens, hashlib.sha256(tokens.numpy().tobytes()).hexdigest()


def recipe_key(recipe: dict) -> str:
    """Fingerprint of a run's full recipe (tool, tool version, signround source hash / commit, flags, model,
    calibration sha256, seed, evaluation windows: whatever the caller puts in ``recipe``): 16 hex digits of
    the sha256 of its canonical JSON. A cached run is reused only when this matches."""
    import hashlib

    blob = json.dumps(recipe, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def source_sha(*parts: str) -> str:
    """12 hex digits of the sha256 of signround's ``.py`` files under ``parts`` (folders or files relative to
    the repository root; default ``signround``), names included, as they are in the worktree now."""
    import hashlib

    h = hashlib.sha256()
    for part in parts or ("signround",):
        base = ROOT / part
        for p in sorted([base] if base.is_file() else base.rglob("*.py")):
            h.update(str(p.relative_to(ROOT)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def git_commit() -> str:
    """HEAD of the repository ('' outside git), plus '-dirty' when signround/ has uncommitted changes."""
    run = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    head = run("rev-parse", "HEAD")
    return head + ("-dirty" if head and run("status", "--porcelain", "--", "signround") else "")
