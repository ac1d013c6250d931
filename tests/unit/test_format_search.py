"""LLM-FP4-style per-layer format search: the FP4 variants' grids, the activation-weighted error, the choice
and the CLI run that records it."""

from __future__ import annotations

import json

import pytest
import torch

from signround.cli import main
from signround.config import QuantScheme, parse_candidates
from signround.errors import SignRoundError
from signround.mixed.formats import choose_formats, input_second_moments, rtn_error
from tests.conftest import make_model


def test_candidates_share_one_width():
    base = QuantScheme(bits=4, group_size=64)
    got = parse_candidates("fp4_e2m1,fp4_e1m2,int", base)
    assert [s.dtype.value for s in got] == ["fp4_e2m1", "fp4_e1m2", "int"]
    assert all(s.bits == 4 and s.group_size == 64 for s in got) and not got[2].sym
    for value, match in (("fp4_e2m1", "at least two"), ("fp4_e2m1,fp8_e4m3", "one width"), ("fp4,int", "unknown")):
        with pytest.raises(SignRoundError, match=match):
            parse_candidates(value, base)


def test_error_weighs_channels_by_their_input_energy():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    scheme = QuantScheme(dtype="fp4_e2m1", group_size=32)
    ones = rtn_error(w, torch.ones(64), scheme)
    half = torch.cat([torch.ones(32), torch.zeros(32)])
    assert 0 < rtn_error(w, half, scheme) < ones
    assert rtn_error(w, 2 * torch.ones(64), scheme) == pytest.approx(2 * ones)


def test_each_layer_gets_the_candidate_of_least_error():
    torch.manual_seed(0)
    model = make_model("llama", layers=2)
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    with torch.no_grad():  # give one layer power-of-two-like heavy tails, which favour e3m0's log grid
        w = model.get_submodule(names[0]).weight
        w.copy_(torch.sign(w) * 2.0 ** torch.randint(-8, 0, w.shape).float())
    tokens = torch.randint(0, 256, (4, 16))
    cands = parse_candidates("fp4_e2m1,fp4_e1m2,fp4_e3m0", QuantScheme(group_size=32))
    result = choose_formats(model, tokens, cands)
    x2 = input_second_moments(model, tokens, names)
    for name in names:
        errs = {s.dtype.value: rtn_error(model.get_submodule(name).weight, x2[name], s) for s in cands}
        assert result.errors[name] == pytest.approx(errs)
        assert result.choice[name].dtype.value == min(errs, key=errs.get)
    assert result.choice[names[0]].dtype.value == "fp4_e3m0"
    assert sum(result.counts().values()) == 14  # 7 linears per block


def test_cli_searches_and_records_the_choice(tmp_path, model_dir, calib_jsonl):
    out = tmp_path / "out"
    argv = ["quantize", "--model", str(model_dir), "--output", str(out), "--iters", "2", "--nsamples", "4",
            "--seqlen", "32", "--dataset", str(calib_jsonl), "--group-size", "32", "--quiet",
            "--format-search", "fp4_e2m1,fp4_e1m2,int"]  # fmt: skip
    assert main(argv) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format_search"]["candidates"] == ["fp4_e1m2", "fp4_e2m1", "int"]
    used = {m["dtype"] for m in qc["modules"].values()}
    assert used <= {"fp4_e2m1", "fp4_e1m2", "int"} and sum(qc["format_search"]["counts"].values()) == 14


def test_python_api_takes_a_format_search(tokenizer):
    from tests.conftest import quantize_tiny

    q = quantize_tiny(tokenizer, format_search=("fp4_e2m1", "fp4_e3m0"))
    qc = q.config.quantization_config
    assert sum(qc["format_search"]["counts"].values()) == 14
    assert {m["dtype"] for m in qc["modules"].values()} <= {"fp4_e2m1", "fp4_e3m0"}
