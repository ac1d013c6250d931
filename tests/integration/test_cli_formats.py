"""``quantize --format`` (one folder per format) and ``signround export``, through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from signround.cli import main
from signround.model.load import load_model
from tests.integration.test_cli_errors import assert_refused, quantize_args

IDS = torch.tensor([[5, 17, 33, 90, 200, 7, 9, 11]])


def test_quantize_writes_one_subfolder_per_format_then_exports(tmp_path, model_dir, calib_jsonl, capsys):
    out = tmp_path / "out"
    fmts = "native,auto_round,gptq,compressed-tensors,gguf:q4_0"
    argv = quantize_args(model_dir, out, "--dataset", str(calib_jsonl), "--sym", "--format", fmts)
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["native", "auto_round", "gptq", "compressed-tensors", "gguf-q4_0"]
    )
    native, _ = load_model(str(out / "native"))
    with torch.no_grad():
        ref = native(IDS).logits
    gguf = AutoModelForCausalLM.from_pretrained(out / "gguf-q4_0", gguf_file="model-q4_0.gguf")
    ct = AutoModelForCausalLM.from_pretrained(out / "compressed-tensors")
    with torch.no_grad():
        # GGUF keeps embeddings in f16; the linears are the same codes and scales
        assert torch.allclose(gguf(IDS).logits, ref, atol=2e-3 * ref.abs().max().item())
        assert torch.allclose(ct(IDS).logits, ref, atol=1e-5)
    # export converts the saved native checkpoint without re-tuning: same files as the quantize run wrote
    assert main(["export", "--model", str(out / "native"), "--format", "gptq", "--output", str(tmp_path / "g")]) == 0
    assert (tmp_path / "g/model.safetensors").read_bytes() == (out / "gptq/model.safetensors").read_bytes()


def test_format_mismatch_fails_before_tuning(tmp_path, model_dir, calib_jsonl, capsys):
    out = tmp_path / "out"
    rule = '{"down_proj": {"bits": 8}}'  # a layer the format cannot store, so the exporter's check refuses it
    argv = quantize_args(model_dir, out, "--dataset", str(calib_jsonl), "--format", "gguf:q4_0", "--layer-config", rule)
    argv.remove("--quiet")  # with progress on, tuning a block writes its "block 0" bar to stderr
    assert main(argv) == 2
    err = capsys.readouterr().err  # this call's stderr, read once
    lines = [line for line in err.splitlines() if line.startswith("signround:")]
    assert len(lines) == 1 and "stores symmetric 4-bit groups of 32" in lines[0], lines
    assert "block 0" not in err  # nothing was tuned
    assert not out.exists()


def test_a_gguf_format_alone_implies_its_scheme(tmp_path, model_dir, calib_jsonl, capsys):
    from gguf import GGUFReader

    for fmt, qtype in (("gguf:q4_0", "Q4_0"), ("gguf:q4_1", "Q4_1")):
        out = tmp_path / fmt.replace(":", "-")
        argv = quantize_args(model_dir, out, "--dataset", str(calib_jsonl), "--format", fmt)
        i = argv.index("--group-size")
        del argv[i : i + 2]  # neither --bits, --group-size nor --sym: the format says W4G32 (sym for q4_0)
        assert main(argv) == 0
        (path,) = out.glob("*.gguf")
        blk = [t for t in GGUFReader(path).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
        types = {t.tensor_type.name for t in blk}
        assert types == {qtype}, types
        gguf = AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name)
        assert gguf(IDS).logits.isfinite().all()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (
            ["--bits", "3", "--format", "gguf:q4_0"],
            "--bits 3 conflicts with --format gguf:q4_0, which stores W4G32",
        ),
        (["--sym", "--format", "gguf:q4_1"], "--sym conflicts with --format gguf:q4_1, which stores W4G32-asym"),
        (["--group-size", "64", "--format", "gguf:q8_0"], "--group-size 64 conflicts with --format gguf:q8_0"),
        (["--data-type", "int", "--format", "gguf:q4_k_m"], "which stores llama.cpp's Q4_K structure"),
        (["--format", "native,gguf:q4_0,gguf:q8_0"], "gguf:q4_0 and gguf:q8_0 store different grids"),
    ],
)
def test_flags_that_contradict_the_format_are_one_line_errors(tmp_path, model_dir, calib_jsonl, capsys, extra, match):
    out = tmp_path / "out"
    argv = quantize_args(model_dir, out, "--dataset", str(calib_jsonl))
    i = argv.index("--group-size")
    del argv[i : i + 2]
    assert_refused(capsys, out, [*argv, *extra], match)


@pytest.mark.parametrize(
    ("fmt", "match"), [("awq", "unknown format 'awq'"), ("gguf:q4_1,gguf:q4_1", "twice"), (",", "empty")]
)
def test_bad_format_names(tmp_path, model_dir, calib_jsonl, capsys, fmt, match):
    out = tmp_path / "out"
    assert_refused(capsys, out, quantize_args(model_dir, out, "--format", fmt), match)


def test_export_of_a_float_model_to_gguf_f16(tmp_path, model_dir, capsys):
    out = tmp_path / "f16"
    assert main(["export", "--model", str(model_dir), "--format", "gguf:f16", "--output", str(out), "--quiet"]) == 0
    ref = AutoModelForCausalLM.from_pretrained(model_dir)
    got = AutoModelForCausalLM.from_pretrained(out, gguf_file="model-f16.gguf")
    with torch.no_grad():
        r = ref(IDS).logits
        assert torch.allclose(got(IDS).logits, r, atol=5e-3 * r.abs().max().item())
    assert_refused(
        capsys,
        tmp_path / "x",
        ["export", "--model", str(model_dir), "--format", "gptq", "--output", str(tmp_path / "x")],
        "no quantized layers",
    )


def test_generate_reads_every_written_format(tmp_path, model_dir, calib_jsonl, capsys):
    out = tmp_path / "out"
    fmts = "native,auto_round,gptq,compressed-tensors,gguf:q8_0"
    argv = quantize_args(model_dir, out, "--dataset", str(calib_jsonl), "--sym", "--bits", "8", "--format", fmts)
    assert main(argv) == 0
    capsys.readouterr()
    texts = {}
    for sub in sorted(out.iterdir()):
        assert main(["generate", "--model", str(sub), "--prompt", "The quick brown", "--max-new-tokens", "8"]) == 0
        texts[sub.name] = capsys.readouterr().out.strip()
    assert set(texts) == {"native", "auto_round", "gptq", "compressed-tensors", "gguf-q8_0"}
    # same codes and scales in every format; GGUF's f16 embeddings may flip a near-tie, the others may not
    assert texts["native"] and len({t for name, t in texts.items() if not name.startswith("gguf")}) == 1


def test_a_named_scheme_runs_and_formats_that_cannot_hold_it_refuse(tmp_path, model_dir, calib_jsonl, capsys):
    out = tmp_path / "w8a8"
    argv = quantize_args(model_dir, out, "--dataset", str(calib_jsonl), "--scheme", "W8A8")
    i = argv.index("--group-size")
    del argv[i : i + 2]  # the name says per-channel int8 weights and int8 per-token activations
    assert main(argv) == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert json.dumps(cfg).count('"granularity": "token"') >= 1, cfg
    model, _ = load_model(str(out))
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.scheme.name == "W8C-sym" and q.act is not None and q.act.bits == 8
    refused = tmp_path / "gptq"
    argv = quantize_args(model_dir, refused, "--dataset", str(calib_jsonl), "--scheme", "W8A8", "--format", "gptq")
    del argv[argv.index("--group-size") : argv.index("--group-size") + 2]
    assert_refused(capsys, refused, argv, "cannot store quantized activations")
    # compressed-tensors stores what vLLM serves: static per-tensor fp8 activations with their calibrated scales
    served = tmp_path / "fp8"
    argv = quantize_args(model_dir, served, "--dataset", str(calib_jsonl), "--scheme", "FP8", "--format",
                         "compressed-tensors")  # fmt: skip
    del argv[argv.index("--group-size") : argv.index("--group-size") + 2]
    assert main(argv) == 0
    group = json.loads((served / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["format"] == "float-quantized" and group["input_activations"]["strategy"] == "tensor"
    model, _ = load_model(str(served))
    o = model.get_submodule("model.layers.1.self_attn.o_proj")
    assert o.act.granularity == "tensor" and float(o.input_scale) > 0
    refused = tmp_path / "asym"
    argv = quantize_args(model_dir, refused, "--dataset", str(calib_jsonl), "--bits", "8", "--act-bits", "8",
                         "--format", "compressed-tensors")  # fmt: skip
    argv[argv.index("--group-size") + 1] = "-1"  # asymmetric by default: no int8 kernel of vLLM takes it
    assert_refused(capsys, refused, argv, "symmetric weights")
