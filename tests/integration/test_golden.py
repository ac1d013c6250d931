"""Golden fingerprints: every CLI run below must write byte-identical files to the ones the pre-refactor
code (commit 961edd1) wrote, and every refused combination must stay refused with the same message.

Each case runs ``signround.cli.main([...])`` in-process (the CLI flags are the stable interface; the
Python API is not) on a tiny random-init model from ``tests/conftest.py``, inside its own empty working
folder with *relative* paths (``config.json`` records the dataset path), on the CPU with 2 threads. A
quantize case's fingerprint is the sha256 of every file under its output folder (relative path -> hex
digest); a refusal's is ``[exit code, first stderr line]``. The expected values are in
``tests/golden/golden.json``. transformers stamps its version into every ``config.json`` and
``generation_config.json`` it writes; the JSON records which version stamped the reference's files
(``transformers_version`` in ``generated_with``), and the test rewrites that one stamp to it before hashing, so a
new transformers release does not read as a change of behaviour (every other byte still counts).

Regenerate (only with the code whose behaviour is the reference, never to make a failing case pass):

    git worktree add ../ref 961edd1   # a checkout of the reference commit
    PYTHONPATH=../ref .venv/bin/python tests/integration/test_golden.py --regen

Cases with quantized activations come out differently on CPUs of different kernel levels (AVX2 / AVX512), the
reference's own output included; for those, ``--regen --only ID,ID --for-this-cpu`` with the reference on such a
CPU stores its records under ``by_capability``, which the test prefers on a CPU of that capability.

``PYTHONPATH`` picks the signround source to record (the script prints which one it imported and stores
its path and git commit in the JSON); without it the installed tree is used. ``--check`` instead compares
that source with the JSON and lists the differing cases, and ``--only ID,ID`` limits either mode to some
cases.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "golden.json"
THREADS = 2

# Flags every quantize case shares; ``--group-size`` is added per case (the fixed-group formats reject others).
# 8 steps, not 2: on these models the best of 2 or 4 steps is the starting point, so --loss and --init none
# wrote the same weights as the default run and RTN; with 8 every tuned case's weights depend on the steps.
COMMON = ["--dataset", "calib.jsonl", "--nsamples", "4", "--seqlen", "32", "--batch-size", "2", "--iters", "8",
          "--seed", "0", "--device", "cpu", "--quiet"]  # fmt: skip
G32 = ["--group-size", "32"]


def _pins() -> list[str]:
    """Flags that hold a default changed after the reference back at the reference's behaviour, for the code
    under test that has them (the reference itself does not know them): ``--drop-outliers 0``, since the
    default leaves 0.1% of the output errors out below 4 bits (``auto_drop_outliers``; tests/unit/test_tune.py
    covers that default)."""
    from signround.config import TuneConfig

    return ["--drop-outliers", "0"] if "drop_outliers" in TuneConfig.__dataclass_fields__ else []


# id -> (model family, flags after the common ones). ``model`` is a float LLaMA (64 wide, 2 blocks) unless the
# family says otherwise; the ``wide`` LLaMA is 256 wide so that llama.cpp's K-quant super-blocks fit.
QUANTIZE: dict[str, tuple[str, list[str]]] = {
    # weight data types, native output
    "int-w4g32-asym": ("llama", ["--bits", "4", *G32]),
    "int-w3g32-sym": ("llama", ["--bits", "3", "--sym", *G32]),
    "int-w2g16": ("llama", ["--bits", "2", "--group-size", "16"]),
    "int-w8g32": ("llama", ["--bits", "8", *G32]),
    **{
        f"dtype-{d}": ("llama", ["--data-type", d, *G32])
        for d in ("fp4_e2m1", "fp4_e1m2", "fp4_e3m0", "fp6_e2m3", "fp6_e3m2", "fp8_e4m3", "fp8_e5m2", "bitmod")
    },
    **{f"dtype-{d}": ("llama", ["--data-type", d]) for d in ("mxfp4", "nvfp4", "q4_k", "q2_k", "q6_k", "q3_k")},
    # options
    "rtn": ("llama", ["--method", "rtn", *G32]),
    "layer-config": (
        "llama",
        [*G32, "--layer-config", json.dumps({r"mlp\.down_proj": {"bits": 8}, r"layers\.1\.self_attn\.o_proj": None})],
    ),
    "serve-bits": ("llama", ["--bits", "8", "--serve-bits", "4,2", *G32]),
    "act-token": ("llama", [*G32, "--act-bits", "8"]),
    "act-channel": ("llama", [*G32, "--act-bits", "8", "--act-granularity", "channel"]),
    "act-smooth": ("llama", [*G32, "--act-bits", "8", "--smooth"]),
    "mixed-avg-bits": ("llama", [*G32, "--avg-bits", "3", "--bit-options", "2,4"]),
    "format-search": ("llama", [*G32, "--format-search", "fp4_e2m1,fp4_e1m2"]),
    "loss-mse": ("llama", [*G32, "--loss", "mse"]),
    "init-none": ("llama", [*G32, "--init", "none"]),
    "use-last": ("llama", [*G32, "--use-last"]),
    "fp-inputs": ("llama", [*G32, "--fp-inputs"]),
    "low-memory": ("llama", [*G32, "--low-memory"]),
    "qwen2": ("qwen2", [*G32]),
    "opt": ("opt", ["--bits", "3", *G32]),
    # exports
    "formats-four": ("llama", ["--sym", *G32, "--format", "auto_round,gptq,compressed-tensors,gguf:q4_0"]),
    "gguf-q4_k_m": ("wide", ["--data-type", "q4_k", "--format", "gguf:q4_k_m"]),
}

# id -> flags of a refused quantize run: golden is [exit code, first stderr line]
REFUSED: dict[str, list[str]] = {
    "refuse-serve-bits-avg-bits": [*G32, "--serve-bits", "3", "--avg-bits", "3.5"],
    "refuse-mixed-float-dtype": ["--data-type", "fp4_e2m1", *G32, "--avg-bits", "3"],
    "refuse-format-search-avg-bits": [*G32, "--format-search", "fp4_e2m1,fp4_e1m2", "--avg-bits", "3"],
    "refuse-act-bits-gptq": [*G32, "--act-bits", "8", "--format", "gptq"],
}

# ``signround export --format gptq`` of a native W4G32-sym checkpoint (the quantize run's files are golden too,
# as "source_files"; its gptq file equals formats-four's)
EXPORT = "export-gptq"

CASES = [*QUANTIZE, *REFUSED, EXPORT]


def _write_inputs(family: str) -> None:
    """The float model folder ``model`` and the calibration file ``calib.jsonl`` in the working folder."""
    from tests.conftest import build_tokenizer, corpus, make_model

    if family == "wide":  # 256-wide LLaMA: K-quant super-blocks (256 weights) fit every linear
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from tests.conftest import VOCAB

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
        model = LlamaForCausalLM(cfg).eval()
    else:
        model = make_model(family)
    model.save_pretrained("model")
    build_tokenizer().save_pretrained("model")
    Path("calib.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus(40, seed=1)))


_STAMP = re.compile(rb'"transformers_version": "[^"]*"')


def _file_bytes(path: Path, stamp: str | None) -> bytes:
    """``path``'s bytes; for a ``.json`` file with ``stamp`` given, its transformers version stamp set to it."""
    data = path.read_bytes()
    if stamp is None or path.suffix != ".json":
        return data
    return _STAMP.sub(f'"transformers_version": "{stamp}"'.encode(), data)


def fingerprint(folder: str | Path, stamp: str | None = None) -> dict[str, str]:
    """sha256 of every file under ``folder``, keyed by its path relative to it; ``stamp`` normalizes the
    transformers version that ``save_pretrained`` writes into JSON files (None: the bytes as they are)."""
    root = Path(folder)
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(_file_bytes(p, stamp)).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _cli(argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` with stderr captured: (exit code, stderr)."""
    from signround.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def run_case(case: str, stamp: str | None = None) -> dict:
    """Run one case in the current (empty) working folder; its golden record (``stamp``: see ``fingerprint``)."""
    if case in REFUSED:
        _write_inputs("llama")
        code, err = _cli(["quantize", "--model", "model", "--output", "out", *COMMON, *_pins(), *REFUSED[case]])
        lines = err.strip().splitlines()
        return {"refused": [code, lines[0] if lines else ""], "output_written": Path("out").exists()}
    if case == EXPORT:
        _write_inputs("llama")
        code, err = _cli(["quantize", "--model", "model", "--output", "q", *COMMON, *_pins(), "--bits", "4", "--sym",
                          *G32])  # fmt: skip
        assert code == 0, err
        code, err = _cli(["export", "--model", "q", "--format", "gptq", "--output", "out", "--quiet"])
        assert code == 0, err
        return {"files": fingerprint("out", stamp), "source_files": fingerprint("q", stamp)}
    family, flags = QUANTIZE[case]
    _write_inputs(family)
    code, err = _cli(["quantize", "--model", "model", "--output", "out", *COMMON, *_pins(), *flags])
    if code != 0:  # a refusal is recorded as such (and must then stay a refusal)
        lines = err.strip().splitlines()
        return {"refused": [code, lines[0] if lines else ""], "output_written": Path("out").exists()}
    return {"files": fingerprint("out", stamp)}


def _load_golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.fixture(autouse=True)
def _threads() -> None:
    import torch

    torch.set_num_threads(THREADS)


def _capability() -> str:
    """torch's CPU kernel level (``AVX2``, ``AVX512``, ...): float reductions differ between them in the last bit."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def expected(golden: dict, case: str) -> dict | None:
    """The reference's record of ``case`` for this CPU: the one the reference wrote on a CPU of this capability
    (``by_capability``) where there is one, else the main record. Cases with quantized activations round
    activations computed by matmuls, so a last-bit difference between AVX2 and AVX512 kernels flips a rounding
    and changes the bytes; the reference itself writes other bytes on each."""
    return golden.get("by_capability", {}).get(_capability(), {}).get(case, golden["cases"].get(case))


def _stamp(golden: dict, case: str) -> str | None:
    """The transformers version that stamped the JSON files of ``case``'s record (None where not recorded)."""
    if case in golden.get("by_capability", {}).get(_capability(), {}):
        return golden["by_capability_generated_with"][_capability()].get("transformers_version")
    return golden["generated_with"].get("transformers_version")


@pytest.mark.parametrize("case", CASES)
def test_golden(case, tmp_path, monkeypatch):
    golden = _load_golden()
    want = expected(golden, case)
    assert want is not None, f"no golden record for {case}; regenerate with the reference code (see the docstring)"
    monkeypatch.chdir(tmp_path)
    got = run_case(case, _stamp(golden, case))
    assert got == want, _describe(want, got)


def _describe(want: dict, got: dict) -> str:
    """Which files differ (or what the refusal became)."""
    if "files" not in want or "files" not in got:
        return f"expected {want}, got {got}"
    lines = []
    for key in ("files", "source_files"):
        w, g = want.get(key, {}), got.get(key, {})
        for name in sorted(set(w) | set(g)):
            if w.get(name) != g.get(name):
                lines.append(f"{key}/{name}: {'missing' if name not in g else 'extra' if name not in w else 'differs'}")
    return "files differ from the golden run: " + "; ".join(lines)


def _main(argv: list[str]) -> int:
    import argparse
    import subprocess
    import tempfile
    import time

    import torch
    import transformers

    parser = argparse.ArgumentParser(description="write or check tests/golden/golden.json")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--regen", action="store_true")
    mode.add_argument("--check", action="store_true")
    parser.add_argument("--only", default=None, help="comma-separated case ids")
    parser.add_argument(
        "--for-this-cpu", action="store_true",
        help="with --regen --only: store the records under this CPU capability (by_capability), for cases whose "
        "bytes the reference itself writes differently on this CPU",
    )  # fmt: skip
    args = parser.parse_args(argv)
    import signround

    src = Path(signround.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()  # fmt: skip
        dirty = bool(subprocess.run(["git", "-C", str(src), "status", "--porcelain", "signround"],
                                    capture_output=True, text=True).stdout.strip())  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", True
    print(f"signround from {signround.__file__} (commit {commit}{', modified' if dirty else ''})", file=sys.stderr)
    torch.set_num_threads(THREADS)
    cases = args.only.split(",") if args.only else CASES
    old = _load_golden() if GOLDEN.is_file() else {"cases": {}}
    results, differ = {}, []
    here = os.getcwd()
    for case in cases:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            os.chdir(tmp)
            try:
                results[case] = run_case(case, _stamp(old, case) if args.check and expected(old, case) else None)
            finally:
                os.chdir(here)
        if args.check and results[case] != expected(old, case):
            differ.append(case)
            print(f"{case}: {_describe(expected(old, case) or {}, results[case])}", file=sys.stderr)
        print(f"{case}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.check:
        print(f"{len(differ)} of {len(cases)} cases differ: {differ}", file=sys.stderr)
        return 1 if differ else 0
    if args.for_this_cpu:
        if not args.only:
            parser.error("--for-this-cpu needs --only")
        by_cap = old.setdefault("by_capability", {})
        by_cap[_capability()] = {**by_cap.get(_capability(), {}), **results}
        old.setdefault("by_capability_generated_with", {})[_capability()] = {
            "commit": commit, "modified": dirty, "transformers_version": transformers.__version__}  # fmt: skip
        GOLDEN.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN} ({len(results)} cases for {_capability()})", file=sys.stderr)
        return 0
    merged = {**old["cases"], **results} if args.only else results
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    made = {"source": str(src), "commit": commit, "modified": dirty, "transformers_version": transformers.__version__}
    data = {"generated_with": made, "cases": merged}
    for key in ("by_capability", "by_capability_generated_with"):
        if key in old:
            data[key] = old[key]
    GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN} ({len(merged)} cases)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    # Appended, not prepended: a PYTHONPATH source of signround comes first. ``tests`` (conftest's tiny models)
    # then also resolves there when that source has it; conftest is part of the reference.
    sys.path.append(str(Path(__file__).resolve().parents[2]))
    sys.exit(_main(sys.argv[1:]))
