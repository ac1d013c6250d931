"""Activation quantization through the pipeline: schemes, tuning with quantized inputs, W4A8 checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

import signround
from signround import export
from signround.act.quant import fake_quant_channel, fake_quant_token
from signround.cli import main
from signround.config import ActScheme, QuantConfig, QuantScheme, TuneConfig
from signround.errors import SignRoundError
from signround.pack.packed import QuantLinear
from tests.conftest import quantize_tiny

IDS = torch.tensor([[5, 17, 33, 90, 200, 7, 9, 11, 64, 3]])


def test_act_scheme_rules():
    assert ActScheme() == ActScheme(bits=8, dtype="int", granularity="token")
    assert ActScheme(dtype="fp4_e2m1").bits == 4 and ActScheme(dtype="fp8_e4m3").bits == 8
    for kwargs, match in (
        ({"dtype": "fp8_e4m3", "bits": 4}, "--act-bits 8"),
        ({"bits": 1}, "from 2 to 8"),
        ({"dtype": "nf4"}, "unknown activation dtype"),
        ({"granularity": "row"}, "one of token, channel, tensor"),
        ({"bits": 4, "clip": 0.0}, "in \\(0, 1\\]"),
        ({"bits": 4, "clip": 1.2}, "in \\(0, 1\\]"),
        ({"bits": 4, "granularity": "channel", "clip": 0.9}, "search their clip ratio"),
    ):
        with pytest.raises(SignRoundError, match=match):
            ActScheme(**kwargs)
    with pytest.raises(SignRoundError, match="add --act-bits"):
        QuantConfig(smooth=True)
    rtn = TuneConfig(iters=0)
    assert not QuantConfig(act=ActScheme(), tune=rtn).needs_calibration  # per-token RTN needs no data
    assert QuantConfig(act=ActScheme(granularity="channel"), tune=rtn).needs_calibration
    assert QuantConfig(act=ActScheme(granularity="tensor"), tune=rtn).needs_calibration
    assert QuantConfig(act=ActScheme(), smooth=True, tune=rtn).needs_calibration


def test_quant_linear_quantizes_its_input():
    torch.manual_seed(0)
    layer = QuantLinear.from_codes(
        torch.randint(0, 16, (6, 32), dtype=torch.uint8), torch.rand(6, 1), torch.full((6, 1), 8.0),
        QuantScheme(bits=4, group_size=-1), None,
    )  # fmt: skip
    x = torch.randn(3, 32)
    w = layer.dequantize()
    layer.set_act(ActScheme(bits=4))
    assert torch.allclose(layer(x), fake_quant_token(x, 4) @ w.T)
    scale = torch.rand(32) + 0.1
    layer.set_act(ActScheme(bits=8, granularity="channel"), scale)
    assert torch.allclose(layer(x), fake_quant_channel(x, scale, 8) @ w.T)
    assert "input_scale" in layer.state_dict()
    layer.set_act(None)
    assert torch.allclose(layer(x), x @ w.T) and "input_scale" not in layer.state_dict()


@pytest.mark.parametrize("granularity", ["token", "channel"])
def test_w4a8_checkpoint_saves_reloads_and_evaluates_the_same(tmp_path, tokenizer, granularity):
    act = ActScheme(bits=8, granularity=granularity)
    q = quantize_tiny(tokenizer, act=act)
    assert q.config.quantization_config["activations"] == {**act.to_dict(), "smooth": False}
    layer = q.model.layers[0].mlp.down_proj
    assert layer.act == act
    if granularity == "channel":
        assert bool((layer.input_scale > 0).all())
    with torch.no_grad():
        ref = q(IDS).logits
        scale = getattr(layer, "input_scale", None)
        layer.set_act(None)  # quantized inputs change the output
        assert not torch.equal(q(IDS).logits, ref)
        layer.set_act(act, scale)
        assert torch.equal(q(IDS).logits, ref)
    signround.save(q, tokenizer, tmp_path / "w4a8")
    loaded, _ = signround.load_model(str(tmp_path / "w4a8"))
    assert loaded.model.layers[0].mlp.down_proj.act == act
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, ref)
    with pytest.raises(SignRoundError, match="cannot store quantized activations"):
        export.save(q, tokenizer, tmp_path / "gptq", "gptq")
    assert not (tmp_path / "gptq").exists()


@pytest.mark.parametrize("granularity", ["token", "channel"])
def test_tuning_with_quantized_inputs_beats_rtn_under_the_same_inputs(granularity):
    from signround.act.calibrate import input_absmax, static_scales
    from signround.act.quant import quantized_inputs
    from signround.tune.signround import ActInputs, BlockData, block_mse, tune_block
    from tests.unit.test_fp_formats import _block_setup, _weights

    block, x, y, kw, schemes = _block_setup(QuantScheme(bits=3, group_size=32))
    act = ActScheme(bits=4, granularity=granularity)
    scales = static_scales(input_absmax(block, x, kw, list(schemes), 8), act) if granularity == "channel" else None
    data, inputs = BlockData(x, y, kw), ActInputs(act, scales)
    rtn = tune_block(block, data, schemes, TuneConfig(iters=0), seed=0, act=inputs)
    sr = tune_block(block, data, schemes, TuneConfig(iters=60, batch_size=4), seed=0, act=inputs)
    with quantized_inputs(block, list(schemes), act, scales):
        loss_rtn = block_mse(block, x, y, kw, 8, _weights(rtn), "relative")
        loss_sr = block_mse(block, x, y, kw, 8, _weights(sr), "relative")
    loss_rtn_float_inputs = block_mse(block, x, y, kw, 8, _weights(rtn), "relative")
    assert abs(loss_rtn - sr.rtn_loss) < 1e-6 * max(1.0, loss_rtn)  # tuning measured RTN with quantized inputs
    assert loss_rtn > loss_rtn_float_inputs  # 4-bit inputs add error
    assert loss_sr < 0.9 * loss_rtn


def test_cli_takes_activation_options_and_refuses_other_formats(tmp_path, model_dir, calib_jsonl, capsys):
    out = tmp_path / "out"
    base = ["quantize", "--model", str(model_dir), "--output", str(out), "--iters", "2", "--nsamples", "4",
            "--seqlen", "32", "--dataset", str(calib_jsonl), "--group-size", "32", "--quiet"]  # fmt: skip
    assert main([*base, "--act-bits", "8", "--act-granularity", "channel"]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["activations"] == {"bits": 8, "dtype": "int", "granularity": "channel", "smooth": False}
    capsys.readouterr()
    clipped = tmp_path / "clipped"
    assert main([*base[:4], str(clipped), *base[5:], "--act-bits", "4", "--act-clip", "0.9"]) == 0
    qc = json.loads((clipped / "config.json").read_text())["quantization_config"]
    assert qc["activations"] == {"bits": 4, "dtype": "int", "granularity": "token", "clip": 0.9, "smooth": False}
    loaded, _ = signround.load_model(str(clipped))
    assert loaded.model.layers[0].mlp.down_proj.act == ActScheme(bits=4, clip=0.9)
    capsys.readouterr()
    ct = ["--act-bits", "8", "--act-clip", "0.9", "--format", "compressed-tensors"]
    for extra, match in ((["--act-clip", "0.9"], "add --act-bits"), (ct, "need --format native")):
        assert main([*base[:4], str(tmp_path / "refused"), *base[5:], *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0] and not (tmp_path / "refused").exists()
    bad = tmp_path / "bad"
    argv = [*base[:4], str(bad), *base[5:], "--act-dtype", "fp8_e4m3", "--format", "gptq"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot store quantized activations" in err[0] and not bad.exists()


def test_smoothing_keeps_the_float_function_and_lowers_the_quantized_error():
    from signround.act.calibrate import input_absmax
    from signround.act.smooth import (
        _producer_width,
        _quantized_loss,
        apply_smoothing,
        smooth_block,
        smooth_groups,
        smoothing_scales,
    )
    from signround.calib.capture import block_output
    from tests.unit.test_fp_formats import _block_setup

    block, x, y, kw, schemes = _block_setup(QuantScheme(bits=4, group_size=32))
    with torch.no_grad():  # outlier input channels, as in real LLMs: a few norm weights 30x larger
        block.input_layernorm.weight[:3] *= 30
        block.post_attention_layernorm.weight[5:7] *= 30
        y = torch.cat([block_output(block(x[i : i + 8], **kw)) for i in range(0, x.shape[0], 8)])
    act = ActScheme(bits=4)
    # applying any scales leaves the float block's output unchanged
    import copy

    trial = copy.deepcopy(block)
    groups = smooth_groups(trial)
    assert [g.producer for g in groups][-1] == "self_attn.v_proj"  # GQA: 4 query heads read 2 kv heads
    for g in groups:
        a = input_absmax(trial, x, kw, [g.consumers[0]], 8)[g.consumers[0]]
        weights = [trial.get_submodule(c).weight for c in g.consumers]
        s = smoothing_scales(a, weights, 0.5, _producer_width(trial, g), g.head_dim)
        assert s.std() > 0  # a real rescaling, not a no-op
        apply_smoothing(trial, g, s)
    with torch.no_grad():
        out = torch.cat([block_output(trial(x[i : i + 8], **kw)) for i in range(0, x.shape[0], 8)])
    assert torch.allclose(out, y, atol=1e-4, rtol=1e-4)
    before = _quantized_loss(block, x, y, kw, schemes, act, 8)
    chosen = smooth_block(block, x, y, kw, schemes, act, 8)
    after = _quantized_loss(block, x, y, kw, schemes, act, 8)
    assert chosen["input_layernorm"] is not None
    assert after < 0.8 * before


def test_cli_smooth_with_rtn_runs_on_calibration_data(tmp_path, model_dir, calib_jsonl):
    out = tmp_path / "out"
    argv = ["quantize", "--model", str(model_dir), "--output", str(out), "--method", "rtn", "--nsamples", "4",
            "--seqlen", "32", "--dataset", str(calib_jsonl), "--group-size", "32", "--quiet",
            "--act-bits", "8", "--act-granularity", "channel", "--smooth"]  # fmt: skip
    assert main(argv) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["activations"]["smooth"] is True and qc["tuning"]["iters"] == 0
    loaded, _ = signround.load_model(str(out))
    assert bool((loaded.model.layers[0].self_attn.q_proj.input_scale > 0).all())


def test_tie_and_untie_follow_the_grouped_query_layout():
    from signround.act.smooth import tie, untie

    # o_proj inputs of 4 query heads x head_dim 2 reading 2 kv heads: head h reads kv head h // 2
    v = torch.tensor([1.0, 2, 5, 0, 3, 1, 0, 9])  # heads 0..3, channels (h, d)
    tied = tie(v, 4, 2)  # kv 0 = max(heads 0, 1), kv 1 = max(heads 2, 3)
    assert tied.tolist() == [5, 2, 3, 9]
    assert untie(tied, 8, 2).tolist() == [5, 2, 5, 2, 3, 9, 3, 9]
    assert tie(v, 8, 2) is v and untie(v, 8, 2) is v


def test_adaptive_clipping_of_static_scales_lowers_the_output_error():
    from signround.act.calibrate import CLIPS, calibrate_static, input_absmax, static_scales
    from signround.act.quant import quantized_inputs
    from signround.tune.signround import block_mse
    from tests.unit.test_fp_formats import _block_setup

    block, x, y, kw, schemes = _block_setup(QuantScheme(bits=4, group_size=32))
    act = ActScheme(bits=4, granularity="channel")
    names = list(schemes)
    scales, clips = calibrate_static(block, x, kw, names, act, 8)
    assert set(clips) == set(names) and all(c in CLIPS for c in clips.values())
    plain = static_scales(input_absmax(block, x, kw, names, 8), act)
    for name in names:
        assert torch.allclose(scales[name], plain[name] * clips[name])
    assert any(c < 1.0 for c in clips.values())  # 4-bit inputs: saturating rare outliers pays off
    with quantized_inputs(block, names, act, scales):
        clipped = block_mse(block, x, y, kw, 8)
    with quantized_inputs(block, names, act, plain):
        unclipped = block_mse(block, x, y, kw, 8)
    assert clipped < 0.9 * unclipped
