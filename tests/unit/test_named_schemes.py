"""Named schemes (``--scheme`` / ``QuantConfig(scheme="W8A8")``) and the schemes formats imply."""

from __future__ import annotations

import json

import pytest

from signround.cli_args import build_parser, quant_config
from signround.config import SCHEMES, QuantConfig, QuantScheme, implied_scheme, named_scheme
from signround.errors import SignRoundError


def cli(*flags: str) -> QuantConfig:
    return quant_config(build_parser().parse_args(["quantize", "--model", "m", "--output", "o", *flags]))


def test_names_mean_what_compressed_tensors_means():
    assert (
        named_scheme("W4A16").weights == QuantScheme(bits=4, group_size=128, sym=True) and SCHEMES["W4A16"].act is None
    )
    w8a8 = named_scheme("w8a8")  # case-insensitive, as the peers' CLIs
    assert w8a8.weights.name == "W8C-sym" and (w8a8.act.bits, w8a8.act.dtype, w8a8.act.granularity) == (
        8,
        "int",
        "token",
    )
    assert named_scheme("W4A8").weights.name == "W4G128-sym" and named_scheme("W4A8").act.bits == 8
    assert named_scheme("W4AFP8").act.dtype == "fp8_e4m3"
    fp8 = named_scheme("FP8_DYNAMIC")
    assert fp8.weights.name == "W8C-fp8_e4m3" and fp8.act.dtype == "fp8_e4m3" and fp8.act.granularity == "token"
    assert named_scheme("MXFP4A16").weights.name == "W4G32-mxfp4" and named_scheme("NVFP4A16").act is None
    static = named_scheme("FP8")
    assert static.weights == fp8.weights and static.act.dtype == "fp8_e4m3" and static.act.granularity == "tensor"
    for name, why in (("NVFP4", "NVFP4A16"), ("MXFP4", "MXFP4A16")):
        with pytest.raises(SignRoundError, match=why):
            named_scheme(name)
    with pytest.raises(SignRoundError, match="unknown scheme 'W5A5'; choose one of W4A16"):
        named_scheme("W5A5")


def test_python_config_takes_a_name_with_its_activations():
    cfg = QuantConfig(scheme="W8A8")
    assert cfg.scheme.name == "W8C-sym" and cfg.act == named_scheme("W8A8").act
    assert QuantConfig(scheme="W4A16").act is None
    from signround.config import ActScheme

    assert QuantConfig(scheme="W4A8", act=ActScheme(bits=4)).act.bits == 4  # an explicit act wins
    json.dumps(cfg.scheme.to_dict())


def test_cli_scheme_fills_what_the_flags_leave_unset():
    cfg = cli("--scheme", "W4A16")
    assert cfg.scheme.name == "W4G128-sym" and cfg.act is None
    assert cli("--scheme", "W4A16", "--group-size", "64").scheme.name == "W4G64-sym"  # explicit flags win
    w8a8 = cli("--scheme", "W8A8")
    assert w8a8.scheme.name == "W8C-sym" and (w8a8.act.bits, w8a8.act.granularity) == (8, "token")
    assert cli("--scheme", "W8A8", "--act-granularity", "channel").act.granularity == "channel"
    assert cli("--scheme", "W4A8", "--act-dtype", "fp8_e4m3").act.dtype == "fp8_e4m3"
    assert cli("--scheme", "FP8_DYNAMIC").scheme.dtype == "fp8_e4m3"
    assert cli("--scheme", "W4A16", "--data-type", "mxfp4").scheme.name == "W4G32-mxfp4"  # another grid entirely
    assert cli().scheme.name == "W4G128-asym" and cli().act is None  # no name, no flags: auto-round's default
    with pytest.raises(SignRoundError, match="NVFP4A16"):
        cli("--scheme", "NVFP4")


def test_formats_imply_and_names_conflict_in_one_line():
    assert cli("--format", "gguf:q4_k_m").scheme.dtype == "q4_k"
    assert cli("--format", "gguf:q4_0").scheme.name == "W4G32-sym"
    assert cli("--format", "native,compressed-tensors").scheme.name == "W4G128-asym"
    assert implied_scheme("gguf:q8_0", bits=8).name == "W8G32-sym"
    with pytest.raises(SignRoundError) as err:
        cli("--scheme", "W4A16", "--format", "gguf:q4_0")
    assert str(err.value) == (
        "--scheme W4A16 conflicts with --format gguf:q4_0, which stores W4G32-sym; drop --scheme W4A16 or choose "
        "another format"
    )
    assert cli("--scheme", "W4A16", "--group-size", "32", "--format", "gguf:q4_0").scheme.name == "W4G32-sym"
