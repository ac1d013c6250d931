"""Double Rounding: lower widths derived from a higher-precision checkpoint's codes, in memory, from disk, by
the CLI, and exported."""

from __future__ import annotations

import json

import pytest
import torch

import signround
from signround.cli import main
from signround.config import ActScheme, Derivation, QuantConfig, QuantScheme
from signround.errors import SignRoundError
from signround.formats import int_affine
from signround.pack.derive import derive_codes, derive_layer, serve_at_bits
from signround.pack.packed import QuantLinear
from signround.primitives import from_groups, to_groups
from tests.conftest import quantize_tiny

IDS = torch.tensor([[5, 17, 33, 90, 200, 7, 9, 11, 64, 3]])


def _round_half_even(num: int, div: int) -> int:
    q, r = divmod(num, div)
    return q + (1 if 2 * r > div or (2 * r == div and q % 2 == 1) else 0)


@pytest.mark.parametrize(("src", "dst"), [(8, 4), (8, 2), (6, 3), (4, 4)])
def test_codes_are_the_high_codes_rounded_once_more(src, dst):
    codes = torch.arange(2**src, dtype=torch.uint8).reshape(1, -1)
    zero = torch.tensor([[0, 2 ** (src - 1), 2**src - 1]], dtype=torch.uint8)
    new_codes, new_zero = derive_codes(codes, zero, src, dst)
    div, top = 2 ** (src - dst), 2**dst - 1
    assert new_codes.flatten().tolist() == [min(_round_half_even(c, div), top) for c in range(2**src)]
    assert new_zero.flatten().tolist() == [min(_round_half_even(int(z), div), top) for z in zero.flatten()]
    assert new_zero[0, 1] == 2 ** (dst - 1)  # the symmetric grid's zero maps to the symmetric grid's zero


def _layer(bits: int, sym: bool, seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    scheme = QuantScheme(bits=bits, group_size=32, sym=sym)
    w = torch.randn(16, 96) * 0.05
    wg = to_groups(w, 32)
    scale, zero = int_affine.compute_qparams(*int_affine.group_minmax(wg), bits, sym)
    codes = from_groups(int_affine.quantize_codes(wg, scale, zero, bits), 96)
    return QuantLinear.from_codes(codes, scale, zero, scheme, None)


@pytest.mark.parametrize("sym", [False, True])
def test_derived_layer_dequantizes_to_the_rounded_grid(sym):
    high = _layer(8, sym)
    low = derive_layer(high, 4)
    assert low.scheme == QuantScheme(bits=4, group_size=32, sym=sym)
    scale, zero = high.qparams()
    codes = to_groups(high.codes(), 32).float()
    want_codes = torch.round(codes / 16).clamp(0, 15)
    want_zero = torch.round(zero.float() / 16).clamp(0, 15).unsqueeze(-1)
    want = from_groups((want_codes - want_zero) * (scale.float() * 16).unsqueeze(-1), 96)
    assert torch.equal(low.dequantize(), want)
    # the derived 4-bit weight is about as close to the 8-bit one as a direct 4-bit quantization is
    high.set_act(ActScheme(granularity="channel"), torch.rand(96) + 0.5)
    kept = derive_layer(high, 4)
    assert kept.act == high.act and torch.equal(kept.input_scale, high.input_scale)
    direct = _layer(4, sym)
    err_derived = (low.dequantize() - high.dequantize()).pow(2).mean()
    err_direct = (direct.dequantize() - high.dequantize()).pow(2).mean()
    assert err_derived < 2.0 * err_direct


def test_serve_bits_is_validated():
    assert QuantConfig(scheme=QuantScheme(bits=8), serve_bits="2,4,6,4").serve_bits == (6, 4, 2)
    for value, match in (("8", "below --bits 8"), ("1", "at least 2"), ("4,x", "widths like")):
        with pytest.raises(SignRoundError, match=match):
            QuantConfig(scheme=QuantScheme(bits=8), serve_bits=value)
    with pytest.raises(SignRoundError, match="integer grids"):
        QuantConfig(scheme=QuantScheme(dtype="fp8_e4m3"), serve_bits=(4,))


def test_one_checkpoint_serves_every_width(tmp_path, tokenizer):
    q = quantize_tiny(tokenizer, scheme=QuantScheme(bits=8, group_size=32), serve_bits=(4, 2))
    assert q.config.quantization_config["serve_bits"] == [4, 2]
    signround.save(q, tokenizer, tmp_path / "w8")
    full, _ = signround.load_model(str(tmp_path / "w8"))
    with torch.no_grad():
        ref8 = full(IDS).logits
        serve_at_bits(q, 4)
        ref4 = q(IDS).logits
    w4, _ = signround.load_model(str(tmp_path / "w8"), bits=4)
    qc = w4.config.quantization_config
    assert qc["bits"] == 4 and qc["derived_from_bits"] == 8
    assert all(m["bits"] == 4 for m in qc["modules"].values())
    with torch.no_grad():
        assert torch.equal(w4(IDS).logits, ref4)
        assert not torch.equal(ref4, ref8)
    # the derived model is an ordinary 4-bit checkpoint: it exports and reloads unchanged
    assert main(["export", "--model", str(tmp_path / "w8"), "--bits", "4", "--format", "gptq",
                 "--output", str(tmp_path / "gptq4"), "--quiet"]) == 0  # fmt: skip
    gptq, _ = signround.load_model(str(tmp_path / "gptq4"))
    with torch.no_grad():
        assert torch.allclose(gptq(IDS).logits, ref4, atol=1e-4)


def test_cli_serves_lower_bits_and_refuses_bad_widths(tmp_path, model_dir, capsys):
    out = tmp_path / "w8"
    base = ["quantize", "--model", str(model_dir), "--output", str(out), "--method", "rtn", "--quiet"]
    assert main([*base, "--bits", "8", "--group-size", "32", "--serve-bits", "4,3"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["serve_bits"] == [4, 3]
    assert main(["eval", "--model", str(out), "--bits", "3", "--ppl", str(model_dir / "config.json"),
                 "--seqlen", "32", "--max-windows", "1", "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    for argv, match in (
        (["eval", "--model", str(out), "--bits", "9", "--quiet"], "--bits can be 2..8"),
        (["eval", "--model", str(model_dir), "--bits", "4", "--quiet"], "not one"),
        ([*base[:4], str(tmp_path / "x"), *base[5:], "--bits", "4", "--serve-bits", "4"], "below --bits 4"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("signround: error:") and match in err[0], err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("src", "dst"), [(8, 4), (8, 2), (8, 3), (6, 3)])
def test_range_derivation_keeps_the_asymmetric_grids_range(src, dst):
    """``range``: code ``round(c (2^b-1) / (2^B-1))`` (exact integer arithmetic: never a tie), the top code on
    the top code; symmetric grids still shift (their shifted grid is the lower full-range grid)."""
    top, low = 2**src - 1, 2**dst - 1
    codes = torch.arange(2**src, dtype=torch.uint8).reshape(1, -1)
    zero = torch.tensor([[0, 5, top]], dtype=torch.uint8)
    new_codes, new_zero = derive_codes(codes, zero, src, dst, sym=False, derivation=Derivation.RANGE)
    assert new_codes.flatten().tolist() == [(2 * c * low + top) // (2 * top) for c in range(2**src)]
    assert new_zero.flatten().tolist() == [(2 * int(z) * low + top) // (2 * top) for z in zero.flatten()]
    assert new_codes[0, -1] == low and torch.bincount(new_codes.flatten().long()).min() > 0
    shifted = derive_codes(codes, zero, src, dst, sym=True)
    ranged = derive_codes(codes, zero, src, dst, True, Derivation.RANGE)
    assert all(torch.equal(a, b) for a, b in zip(shifted, ranged, strict=True))


def test_range_derived_layer_serves_the_whole_range():
    """At 8 -> 2 bits the shift derivation cuts an asymmetric group's top quarter off; range reaches the
    group's largest code. (Its weight error is not smaller on Gaussian groups: their zero point, about 128,
    is a multiple of 64 but not of 85, so the range grid is shifted by up to half a step. Nested tuning puts
    the zero point on the lowest grid, :func:`signround.tune.nested.nested_zero`.)"""
    high = _layer(8, sym=False)
    scale, _ = high.qparams()
    shift, rng = derive_layer(high, 2), derive_layer(high, 2, Derivation.RANGE)
    assert torch.allclose(rng.qparams()[0].float(), scale.float() * 85, rtol=1e-3)  # float16 scales: s * 85 rounded
    top = high.codes() == 255  # each asymmetric group's largest weight
    assert int(top.sum()) == 16 * 3
    assert (rng.codes()[top].float() * 85 == 255).all() and (shift.codes()[top].float() * 64 == 192).all()


def test_the_checkpoint_records_its_derivation_and_the_reader_follows_it(tmp_path, model_dir, capsys):
    out = tmp_path / "w8"
    base = ["quantize", "--model", str(model_dir), "--method", "rtn", "--quiet", "--bits", "8", "--group-size", "32"]
    assert main([*base, "--output", str(out), "--serve-bits", "2", "--derivation", "range"]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["serve_bits"] == [2] and qc["derivation"] == "range"
    stored, _ = signround.load_model(str(out))
    want = {n: derive_layer(m, 2, Derivation.RANGE).dequantize() for n, m in stored.named_modules()
            if isinstance(m, QuantLinear)}  # fmt: skip
    served, _ = signround.load_model(str(out), bits=2)
    got = {n: m.dequantize() for n, m in served.named_modules() if isinstance(m, QuantLinear)}
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    # a shift checkpoint does not carry the key (every checkpoint before it reads as shift)
    assert main([*base, "--output", str(tmp_path / "shift"), "--serve-bits", "2"]) == 0
    assert "derivation" not in json.loads((tmp_path / "shift" / "config.json").read_text())["quantization_config"]
    # a derivation this version does not know is refused in one line
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["derivation"] = "spiral"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SignRoundError, match="derivation 'spiral' is unknown"):
        signround.load_model(str(out), bits=2)
    capsys.readouterr()
    assert main([*base, "--output", str(tmp_path / "x"), "--derivation", "range"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "add --serve-bits" in err[0], err
    assert not (tmp_path / "x").exists()
