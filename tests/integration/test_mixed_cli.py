"""`signround quantize --avg-bits`: allocation, tuning, a checkpoint that reloads and exports, clear errors."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from signround.cli import main
from signround.model.load import load_model
from tests.integration.test_cli_errors import quantize_args, run_cli

IDS = torch.tensor([[5, 17, 42, 99, 3, 64, 128, 7, 200, 11]])


def test_mixed_run_saves_per_layer_bits_that_every_reader_rebuilds(tmp_path, model_dir, calib_jsonl, capsys):
    out = tmp_path / "out"
    fmts = "native,auto_round,gptq,compressed-tensors"
    extra = [
        "--dataset",
        str(calib_jsonl),
        "--sym",
        "--avg-bits",
        "3.2",
        "--format",
        fmts,
        "--report",
        str(tmp_path / "r.json"),
    ]
    assert main(quantize_args(model_dir, out, *extra)) == 0
    printed = capsys.readouterr().out
    assert "bits per weight (budget 3.2000" in printed
    config = json.loads((out / "native/config.json").read_text())["quantization_config"]
    mixed = config["mixed_precision"]
    assert mixed["avg_bits"] <= 3.2 and mixed["solver"] == "ilp"
    assert len(set(mixed["layer_bits"].values())) > 1, "a 3.2-bit budget over 2/3/4/8 options must mix widths"
    assert {n: m["bits"] for n, m in config["modules"].items()} == mixed["layer_bits"]
    assert json.loads((tmp_path / "r.json").read_text())["mixed_precision"]["layer_bits"] == mixed["layer_bits"]
    native, _ = load_model(str(out / "native"))
    with torch.no_grad():
        ref = native(IDS).logits
        for fmt in ("auto_round", "gptq"):
            model, _ = load_model(str(out / fmt))
            assert torch.equal(model(IDS).logits, ref), fmt
        ct = AutoModelForCausalLM.from_pretrained(out / "compressed-tensors")
        assert torch.allclose(ct(IDS).logits, ref, atol=1e-5)


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--avg-bits", "1.5"], "smallest possible"),
        (["--avg-bits", "3", "--target-size", "1MB"], "exactly one"),
        (["--avg-bits", "3", "--bit-options", "2,x"], "comma-separated integers"),
        (["--avg-bits", "3", "--bit-options", "1,4"], "out of range"),
        (["--target-size", "lots"], "60MB"),
        (["--target-size", "1KB"], "larger size"),
        (["--avg-bits", "3", "--format", "gguf:q4_0"], "gguf"),
    ],
)
def test_mixed_bad_input_is_one_line(tmp_path, model_dir, calib_jsonl, capsys, extra, match):
    out = tmp_path / "out"
    code, lines = run_cli(capsys, *quantize_args(model_dir, out, "--dataset", str(calib_jsonl), *extra))
    assert code == 2 and len(lines) == 1 and match in lines[0], lines
    assert not out.exists()
