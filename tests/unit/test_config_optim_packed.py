import dataclasses
import json

import pytest
import torch

from signround.config import (
    ActDType,
    ActGranularity,
    ActScheme,
    CalibConfig,
    Init,
    Loss,
    QuantConfig,
    QuantScheme,
    TuneConfig,
    parse_layer_config,
)
from signround.errors import SignRoundError
from signround.formats import int_affine
from signround.pack.packed import QuantLinear
from signround.primitives import from_groups, to_groups
from signround.tune.optim import linear_decay, sign_step


@pytest.mark.parametrize(
    "kwargs", [{"bits": 1}, {"bits": 9}, {"bits": 4.0}, {"group_size": 0}, {"group_size": -2}, {"group_size": 4}]
)
def test_scheme_validation(kwargs):
    with pytest.raises(SignRoundError):
        QuantScheme(**kwargs)


def test_scheme_is_frozen_and_round_trips():
    s = QuantScheme(bits=3, group_size=64, sym=True)
    with pytest.raises(AttributeError):
        s.bits = 4
    assert QuantScheme.from_dict(s.to_dict()) == s
    assert s.name == "W3G64-sym"


def test_tune_and_calib_validation():
    assert TuneConfig(iters=200).effective_lr == pytest.approx(1 / 200)
    assert TuneConfig(iters=200, lr=0.01).effective_minmax_lr == 0.01
    assert TuneConfig(method="rtn").iters == 0
    for bad in ({"iters": -1}, {"batch_size": 0}, {"lr": 0.0}):
        with pytest.raises(SignRoundError):
            TuneConfig(**bad)
    with pytest.raises(SignRoundError):
        CalibConfig(nsamples=0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"dtype": "q4_k", "bits": 3}, "q4_k has 4 bits per weight, not 3; drop --bits or use --bits 4"),
        (
            {"dtype": "mxfp4", "group_size": 64},
            "mxfp4 uses blocks of 32 weights, not 64; drop --group-size or use --group-size 32",
        ),
        (
            {"dtype": "fp8_e4m3", "sym": False},
            "fp8_e4m3 fixes its own grid (no symmetric/asymmetric choice); drop sym=false",
        ),
        ({"sym": 1}, "sym must be true or false, got 1"),
    ],
)
def test_scheme_refusals_say_what_to_do(kwargs, message):
    """The registered format's facts (width, block, symmetry) decide; the messages are the ones of the tables
    they replaced."""
    with pytest.raises(SignRoundError) as err:
        QuantScheme(**kwargs)
    assert str(err.value) == message


def test_scheme_defaults_come_from_the_format():
    assert (QuantScheme().bits, QuantScheme().group_size, QuantScheme().sym) == (4, 128, False)
    assert (QuantScheme(dtype="nvfp4").bits, QuantScheme(dtype="nvfp4").group_size) == (4, 16)
    assert QuantScheme(dtype="q2_k").sym and QuantScheme(dtype="fp6_e3m2").name == "W6G128-fp6_e3m2"


def test_string_options_are_enums_that_read_as_their_strings():
    tune = TuneConfig(loss="mse", init="none")
    assert tune.loss is Loss.MSE and tune.init is Init.NONE
    assert tune.loss == "mse" and f"{tune.loss}/{tune.init}" == "mse/none" and str(tune.init) == "none"
    assert {"mse": 1}[tune.loss] == 1
    act = ActScheme(dtype="fp8_e4m3", granularity="channel")
    assert act.dtype is ActDType.FP8_E4M3 and act.granularity is ActGranularity.CHANNEL and act.bits == 8
    assert act.name == "A8-fp8_e4m3-channel"
    assert act.to_dict() == {"bits": 8, "dtype": "fp8_e4m3", "granularity": "channel"}
    assert all(type(v) is not ActDType and type(v) is not ActGranularity for v in act.to_dict().values())
    assert ActScheme() == ActScheme(bits=8, dtype=ActDType.INT, granularity=ActGranularity.TOKEN)
    assert TuneConfig(loss=Loss.RELATIVE) == TuneConfig()


def test_config_dumps_are_the_strings_ones():
    """``json.dumps(dataclasses.asdict(cfg))`` (resume fingerprints) holds every enum as its bare string."""
    cfg = QuantConfig(act=ActScheme(bits=4), tune=TuneConfig(loss="mse"))
    got = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    assert got == (
        '{"act": {"bits": 4, "clip": 1.0, "dtype": "int", "granularity": "token"}, '
        '"calib": {"data_dir": null, "dataset": null, '
        '"nsamples": 128, "seed": 42, "seqlen": 2048}, "export": {"allow_partial_groups": false, '
        '"formats": ["native"]}, '
        '"format_search": [], "layer_rules": [], "mixed": null, "rotate": "none", "scheme": {"bits": 4, '
        '"dtype": "int", "group_size": 128, "sym": false}, "serve_bits": [], "smooth": false, "tune": {"amp": false, '
        '"batch_size": 8, "derivation": "shift", "drop_outliers": 0.0, "expert_min_tokens": 64, '
        '"holdout": 0, "init": "search", '
        '"iters": 200, "loss": "mse", "lr": null, "method": "signround", "minmax_lr": null, "nested": [], '
        '"quant_inputs": true, '
        '"routing": "teacher", "seed": 42, "starved_experts": "own", "torch_compile": false, "use_best": true}}'
    )


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: TuneConfig(loss="l1"), "loss must be one of relative, mse, got 'l1'"),
        (lambda: TuneConfig(init="zero"), "init must be one of search, none, got 'zero'"),
        (
            lambda: ActScheme(dtype="fp16"),
            "unknown activation dtype 'fp16'; choose one of ['int', 'fp8_e4m3', 'fp4_e2m1']",
        ),
        (lambda: ActScheme(dtype="fp8_e4m3", bits=4), "fp8_e4m3 activations are 8-bit; use --act-bits 8 or drop it"),
        (
            lambda: ActScheme(granularity="row"),
            "activation granularity must be one of token, channel, tensor, got 'row'",
        ),
    ],
)
def test_option_refusals_are_worded_as_before(make, message):
    with pytest.raises(SignRoundError) as err:
        make()
    assert str(err.value) == message


def test_layer_config_parsing(tmp_path):
    base = QuantScheme(bits=4)
    rules = parse_layer_config('{"down_proj": {"bits": 8}, "q_proj": null}', base)
    assert rules[0].scheme == base.replace(bits=8) and rules[1].scheme is None
    f = tmp_path / "lc.json"
    f.write_text('{"mlp": {"group_size": 32}}')
    assert parse_layer_config(str(f), base)[0].scheme.group_size == 32
    for bad in ("[1]", "{not json", '{"x": 3}', '{"(": {"bits": 4}}', '{"x": {"bitz": 4}}'):
        with pytest.raises(SignRoundError):
            parse_layer_config(bad, base)


def test_linear_decay_and_sign_step():
    assert linear_decay(0.1, 0, 10) == pytest.approx(0.1)
    assert linear_decay(0.1, 5, 10) == pytest.approx(0.05)
    assert linear_decay(0.1, 10, 10) == 0.0
    p = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)
    p.grad = torch.tensor([3.0, -0.001, 0.0])
    sign_step([p], 0.25)
    assert p.tolist() == [0.75, 1.25, 1.0]
    assert p.grad is None


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [32, 48, -1])
def test_quant_linear_matches_fake_quant(sym, group_size):
    torch.manual_seed(0)
    scheme = QuantScheme(bits=3, group_size=group_size, sym=sym)
    w = torch.randn(24, 80)
    wg = to_groups(w, group_size)
    wmin, wmax = int_affine.group_minmax(wg)
    scale, zero = int_affine.compute_qparams(wmin, wmax, 3, sym)
    codes = from_groups(int_affine.quantize_codes(wg, scale, zero, 3), 80)
    bias = torch.randn(24)
    layer = QuantLinear.from_codes(codes, scale.half(), zero, scheme, bias)
    expected = from_groups(int_affine.fake_quant(wg, scale, zero, 3), 80)
    assert torch.equal(layer.dequantize(), expected)
    assert torch.equal(layer.codes(), codes)
    x = torch.randn(5, 80)
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, expected, bias))
    assert ("qzeros" in dict(layer.named_buffers())) == (not sym)


def test_dequantized_weight_cache_is_scoped_and_invalidated():
    from signround.pack.packed import dequantized_weights

    torch.manual_seed(0)
    scheme = QuantScheme(bits=4, group_size=32)
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    layer = QuantLinear.from_codes(codes, torch.rand(8, 2).half(), torch.randint(0, 16, (8, 2)), scheme, None)
    model = torch.nn.Sequential(layer)
    x = torch.randn(3, 64)
    plain = model(x)
    assert layer.dequantized is None  # nothing kept outside the context
    with dequantized_weights(model):
        assert torch.equal(model(x), plain)
        kept = layer.dequantized
        model(x)
        assert layer.dequantized is kept  # reused, not recomputed
        other = QuantLinear.from_codes(15 - codes, layer.scales, layer.qzeros, scheme, None)
        layer.load_state_dict(other.state_dict())
        assert layer.dequantized is None  # new codes invalidate it
        assert torch.equal(model(x), other(x))
    assert layer.dequantized is None and not layer.keep_dequantized
