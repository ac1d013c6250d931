"""Every bad input gets a one-line error, exit code 2, and no output folder."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from signround.cli import main
from tests.conftest import make_model


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if line.startswith("signround:")]


def quantize_args(model, out, *extra):
    return [
        "quantize",
        "--model",
        str(model),
        "--output",
        str(out),
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--iters",
        "2",
        "--group-size",
        "32",
        "--quiet",
        *extra,
    ]


def assert_refused(capsys, out, argv, match):
    code, lines = run_cli(capsys, *argv)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("signround: error:"), lines
    assert match in lines[0], lines[0]
    assert not out.exists() or not any(p.name != "keep.txt" for p in out.iterdir())


def test_missing_model(capsys, tmp_path, calib_jsonl):
    out = tmp_path / "out"
    assert_refused(capsys, out, quantize_args(tmp_path / "nope", out, "--dataset", str(calib_jsonl)), "not found")


def test_corrupt_model(capsys, tmp_path, model_dir, calib_jsonl):
    (model_dir / "model.safetensors").write_bytes(b"garbage" * 10)
    out = tmp_path / "out"
    assert_refused(capsys, out, quantize_args(model_dir, out, "--dataset", str(calib_jsonl)), "corrupt")
    (model_dir / "config.json").write_text("{not json")
    assert_refused(capsys, out, quantize_args(model_dir, out, "--dataset", str(calib_jsonl)), "not valid JSON")


def test_folder_without_config(capsys, tmp_path, calib_jsonl):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert_refused(capsys, out, quantize_args(tmp_path / "empty", out, "--dataset", str(calib_jsonl)), "config.json")


def test_unsupported_architecture(capsys, tmp_path, tokenizer, calib_jsonl):
    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=320)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    out = tmp_path / "out"
    assert_refused(capsys, out, quantize_args(path, out, "--dataset", str(calib_jsonl)), "unsupported architecture")


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--bits", "9"], "out of range"),
        (["--bits", "1"], "out of range"),
        (["--group-size", "3"], "group size"),
        (["--group-size", "256"], "exceeds"),
        (["--iters", "-1"], "iters"),
        (["--batch-size", "0"], "batch size"),
        (["--nsamples", "0"], "nsamples"),
        (["--layer-config", "{bad"], "JSON"),
        # unknown format names
        (["--format", "gguf:q9_k"], "unknown format"),
        (["--data-type", "int5"], "invalid choice"),
        # conflicting options
        (["--smooth"], "add --act-bits"),
        (["--serve-bits", "3", "--avg-bits", "3.5"], "drop it or the mixed-precision options"),
        (["--block-parallel", "--fp-inputs"], "torchrun"),
        (["--low-memory", "--format", "gptq"], "--low-memory writes the native format"),
        (["--rotate", "online", "--format", "gptq"], "which gptq readers do not apply; use --format native"),
        (["--rotate", "spin"], "invalid choice"),
        (["--nested"], "add --serve-bits"),
    ],
)
def test_bad_options(capsys, tmp_path, model_dir, calib_jsonl, flags, match):
    out = tmp_path / "out"
    argv = quantize_args(model_dir, out, "--dataset", str(calib_jsonl))
    if "--group-size" in flags:
        i = argv.index("--group-size")
        del argv[i : i + 2]
    assert_refused(capsys, out, argv + flags, match)


def test_empty_and_short_calibration(capsys, tmp_path, model_dir):
    out = tmp_path / "out"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_refused(capsys, out, quantize_args(model_dir, out, "--dataset", str(empty)), "empty")
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    assert_refused(capsys, out, quantize_args(model_dir, out, "--dataset", str(short)), "fewer than seqlen")
    assert_refused(capsys, out, quantize_args(model_dir, out, "--dataset", str(tmp_path / "x.jsonl")), "not found")


def test_output_not_empty_is_kept(capsys, tmp_path, model_dir, calib_jsonl):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused(capsys, out, quantize_args(model_dir, out, "--dataset", str(calib_jsonl)), "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_non_finite_weights(capsys, tmp_path, tokenizer, calib_jsonl):
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    tokenizer.save_pretrained(tmp_path / "nan")
    out = tmp_path / "out"
    assert_refused(capsys, out, quantize_args(tmp_path / "nan", out, "--dataset", str(calib_jsonl)), "NaN")


def test_non_finite_activations(capsys, tmp_path, tokenizer, calib_jsonl):
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight.fill_(3e38)
    model.save_pretrained(tmp_path / "inf")
    tokenizer.save_pretrained(tmp_path / "inf")
    out = tmp_path / "out"
    assert_refused(
        capsys, out, quantize_args(tmp_path / "inf", out, "--dataset", str(calib_jsonl)), "non-finite outputs"
    )


def test_eval_errors(capsys, tmp_path, model_dir):
    code, lines = run_cli(capsys, "eval", "--model", str(model_dir), "--ppl", str(tmp_path / "none.txt"))
    assert code == 2 and "not found" in lines[0]
    (tmp_path / "tiny.txt").write_text("too short")
    code, lines = run_cli(capsys, "eval", "--model", str(model_dir), "--ppl", str(tmp_path / "tiny.txt"), "--quiet")
    assert code == 2 and "fewer than one window" in lines[0]


@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_bad_device_refused(capsys, monkeypatch, tmp_path, model_dir, calib_jsonl, command):
    """--device names something torch cannot use: one line saying what to do, before the model is read."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    argv = quantize_args(model_dir, out, "--dataset", str(calib_jsonl)) if command == "quantize" else ["eval"]
    if command == "eval":
        argv += ["--model", str(model_dir), "--quiet"]
    for device, match in [("cuda", "no CUDA device"), ("cuda:1", "no CUDA device"), ("gpu0", "not a device")]:
        assert_refused(capsys, out, [*argv, "--device", device], match)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert_refused(capsys, out, [*argv, "--device", "cuda:1"], "1 CUDA device(s)")
    assert_refused(capsys, out, [*argv, "--device", "mps"], "runs on cpu or cuda")


def test_quantize_then_eval_roundtrip(capsys, tmp_path, model_dir, calib_jsonl, ppl_text):
    out = tmp_path / "q"
    code, _ = run_cli(
        capsys,
        *quantize_args(
            model_dir,
            out,
            "--dataset",
            str(calib_jsonl),
            "--bits",
            "3",
            "--eval-ppl",
            str(ppl_text),
            "--eval-seqlen",
            "64",
            "--report",
            str(tmp_path / "r.json"),
        ),
    )
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["blocks"]) == 2 and report["ppl"]["windows"] >= 1
    assert "peak_gpu_gb" not in report  # tuned on the CPU: no GPU peak to report
    code, _ = run_cli(
        capsys,
        "eval",
        "--model",
        str(out),
        "--ppl",
        str(ppl_text),
        "--seqlen",
        "64",
        "--max-windows",
        "2",
        "--json",
        str(tmp_path / "e.json"),
        "--device",
        "cpu",
        "--quiet",
    )
    assert code == 0
    data = json.loads((tmp_path / "e.json").read_text())
    assert set(data) >= {"ppl", "windows", "seqlen"} and data["windows"] == 2 and data["seqlen"] == 64
    # --overwrite replaces the folder atomically; no temporary folders are left behind
    code, _ = run_cli(capsys, *quantize_args(model_dir, out, "--dataset", str(calib_jsonl), "--overwrite"))
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_console_script_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "signround.cli",
            "quantize",
            "--model",
            "x",
            "--bits",
            "12",
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["signround: error: bits=12 is out of range; use 2..8"]


def test_truncated_gguf(capsys, tmp_path, calib_jsonl):
    from signround.model.load import _alias_gguf

    bad = tmp_path / "cut.gguf"
    bad.write_bytes(_alias_gguf("smollm2-135m").read_bytes()[:200_000])
    out = tmp_path / "out"
    assert_refused(capsys, out, quantize_args(bad, out, "--dataset", str(calib_jsonl)), "truncated or corrupt")


def test_missing_tokenizer(capsys, tmp_path, calib_jsonl):
    make_model("llama").save_pretrained(tmp_path / "notok")
    out = tmp_path / "out"
    assert_refused(capsys, out, quantize_args(tmp_path / "notok", out, "--dataset", str(calib_jsonl)), "tokenizer")


def test_checkpoint_config_weights_mismatch(capsys, tmp_path, model_dir, calib_jsonl, ppl_text):
    out = tmp_path / "q"
    assert main(quantize_args(model_dir, out, "--dataset", str(calib_jsonl))) == 0
    cfg = json.loads((out / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (out / "config.json").write_text(json.dumps(cfg))
    code, lines = run_cli(capsys, "eval", "--model", str(out), "--ppl", str(ppl_text), "--seqlen", "64")
    assert code == 2 and len(lines) == 1 and "do not fit its config" in lines[0]


def test_unwritable_output(capsys, tmp_path, model_dir, calib_jsonl):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "sub" / "out"
    code, lines = run_cli(capsys, *quantize_args(model_dir, out, "--dataset", str(calib_jsonl)))
    assert code == 2 and len(lines) == 1 and "cannot" in lines[0]
    assert blocker.read_text() == "not a folder"


def test_disk_full_keeps_the_previous_output(capsys, tmp_path, model_dir, calib_jsonl, monkeypatch):
    import errno

    import signround.export as ex

    out = tmp_path / "out"
    assert main(quantize_args(model_dir, out, "--dataset", str(calib_jsonl))) == 0
    before = (out / "model.safetensors").read_bytes()

    def full(model, tokenizer, folder, options):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ex.get_exporter(ex.ExportFormat.NATIVE), "write", full)
    code, lines = run_cli(capsys, *quantize_args(model_dir, out, "--dataset", str(calib_jsonl), "--overwrite"))
    assert code == 2 and len(lines) == 1 and "disk full" in lines[0]
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_torch_compile_without_a_cpp_compiler(capsys, tmp_path, model_dir, calib_jsonl, monkeypatch):
    from torch._inductor import cpp_builder

    def missing():
        raise RuntimeError("No working C++ compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", missing)
    out = tmp_path / "out"
    args = quantize_args(model_dir, out, "--dataset", str(calib_jsonl), "--device", "cpu", "--enable-torch-compile")
    assert_refused(capsys, out, args, "C++ compiler")
