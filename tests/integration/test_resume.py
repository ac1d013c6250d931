"""Runs survive a crash: SIGKILL at a random block, or while the output is being written, then --resume
gives the same bytes as an uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from signround.cli import main
from signround.runstate import run_dir_for
from tests.conftest import build_tokenizer, corpus, make_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 6-block model, its calibration file, and an uninterrupted reference run (shared by the tests)."""
    root = tmp_path_factory.mktemp("resume")
    model = root / "deep"
    make_model("llama", layers=6).save_pretrained(model)
    build_tokenizer().save_pretrained(model)
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus(60, seed=1)))
    ref = root / "ref"
    assert main(args(model, ref, calib)) == 0
    return model, calib, ref


def args(model, out, calib):
    return [
        "quantize",
        "--model",
        str(model),
        "--output",
        str(out),
        "--dataset",
        str(calib),
        "--nsamples",
        "8",
        "--seqlen",
        "32",
        "--batch-size",
        "4",
        "--iters",
        "20",
        "--group-size",
        "32",
        "--bits",
        "3",
        "--quiet",
    ]


def spawn(argv, driver=None):
    code = driver or "import sys; from signround.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", code, *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def done_blocks(out):
    meta = run_dir_for(out) / "run.json"
    try:
        return json.loads(meta.read_text())["done"]
    except (OSError, ValueError):
        return 0


def test_sigkill_at_a_random_block_then_resume_is_byte_identical(capsys, tmp_path, setup):
    deep_model, calib_jsonl, ref = setup
    out = tmp_path / "out"
    kill_after = random.Random().randint(1, 4)
    proc = spawn(args(deep_model, out, calib_jsonl))
    deadline = time.time() + 300
    while done_blocks(out) < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = done_blocks(out)
    assert 1 <= finished < 6, f"the run was not killed in the middle (finished {finished} blocks)"
    assert not out.exists()
    # without --resume the saved state is never silently discarded
    assert main(args(deep_model, out, calib_jsonl)) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(args(deep_model, out, calib_jsonl) + ["--resume"]) == 0
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert json.loads((out / "config.json").read_text()) == json.loads((ref / "config.json").read_text())
    assert not run_dir_for(out).exists()


def test_kill_while_writing_the_output(tmp_path, setup):
    deep_model, calib_jsonl, ref = setup
    out = tmp_path / "out"
    driver = (
        "import os, signal, sys\n"
        "import signround.export as ex\n"
        "def crash(model, tok, folder, options):\n"
        "    (folder / 'model.safetensors').write_bytes(b'half a file')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "ex.get_exporter(ex.ExportFormat.NATIVE).write = crash\n"
        "from signround.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = spawn(args(deep_model, out, calib_jsonl), driver)
    assert proc.wait(timeout=300) == -signal.SIGKILL
    assert not out.exists()  # never a half-written checkpoint at the output path
    assert done_blocks(out) == 6
    assert main(args(deep_model, out, calib_jsonl) + ["--resume"]) == 0
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, setup):
    deep_model, calib_jsonl, ref = setup
    a, c = tmp_path / "a", tmp_path / "c"
    assert main(args(deep_model, a, calib_jsonl)) == 0
    assert main(args(deep_model, c, calib_jsonl) + ["--seed", "7"]) == 0
    assert (a / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def crash_at_block_3(monkeypatch, step: str, argv: list[str]) -> None:
    """Run ``argv`` with ``signround.pipeline.<step>`` failing at its 4th call: the run stops with 3 blocks saved."""
    import signround.pipeline as pipeline
    from signround.errors import SignRoundError

    original, calls = getattr(pipeline, step), []

    def crash(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise SignRoundError("simulated crash")
        return original(*a, **k)

    monkeypatch.setattr(pipeline, step, crash)
    assert main(argv) == 2 and done_blocks(argv[argv.index("--output") + 1]) == 3
    monkeypatch.setattr(pipeline, step, original)


def test_resume_keeps_what_smoothing_folded_into_the_norms(tmp_path, setup, monkeypatch):
    """A resumed block must come back whole: smoothing rescales its norms, not only its packed layers."""
    import signround

    model, calib, _ = setup
    extra = ["--act-bits", "8", "--smooth", "--iters", "2"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(args(model, ref, calib) + extra) == 0
    crash_at_block_3(monkeypatch, "smooth_block", args(model, out, calib) + extra)
    assert main(args(model, out, calib) + extra + ["--resume"]) == 0
    a, _ = signround.load_model(str(ref))
    b, _ = signround.load_model(str(out))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_resume_of_an_online_rotation_run_gives_the_same_model(tmp_path, setup, monkeypatch):
    """The resumed run rotates its fresh float model the same way, and the blocks it restores from the run
    folder keep down_proj's online rotation: the same bytes, and the same in-memory model (--eval-ppl scores the
    model the run returns, restored blocks included)."""

    model, calib, _ = setup
    extra = ["--act-bits", "4", "--rotate", "online", "--iters", "2", "--eval-ppl", str(calib), "--eval-seqlen",
             "32", "--eval-max-windows", "4"]  # fmt: skip
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(args(model, ref, calib) + extra + ["--report", str(tmp_path / "ref.json")]) == 0
    crash_at_block_3(monkeypatch, "tune_block", args(model, out, calib) + extra)
    assert main(args(model, out, calib) + extra + ["--resume", "--report", str(tmp_path / "out.json")]) == 0
    assert (ref / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    scored = [json.loads((tmp_path / f"{n}.json").read_text())["ppl"]["ppl"] for n in ("ref", "out")]
    assert scored[0] == scored[1], scored


def test_resume_of_a_nested_run_keeps_each_widths_inputs(tmp_path, setup, monkeypatch):
    """A nested run tunes each served width on its own model's inputs; the run folder keeps them, so a resumed
    run gives the same bytes. Without them, resuming would refuse (an older run folder) rather than differ."""
    from safetensors import safe_open

    model, calib, _ = setup
    extra = ["--bits", "8", "--serve-bits", "4,2", "--nested", "--iters", "3"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(args(model, ref, calib) + extra) == 0
    crash_at_block_3(monkeypatch, "tune_block", args(model, out, calib) + extra)
    with safe_open(str(run_dir_for(out) / "inputs.safetensors"), framework="pt") as f:
        assert {"q_inputs", "q_inputs_b4", "q_inputs_b2"} <= set(f.keys())
        assert not torch.equal(f.get_tensor("q_inputs"), f.get_tensor("q_inputs_b2"))
    assert main(args(model, out, calib) + extra + ["--resume"]) == 0
    assert (ref / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
