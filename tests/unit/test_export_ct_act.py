"""compressed-tensors exports with quantized activations (W8A8 int8, W4A8, FP8 dynamic / static) and fp8 weights:
what transformers + compressed-tensors loads from them, what signround's own reader loads, and the refusals.

transformers' default load of these folders applies the activation quantization in its forward
(compressed-tensors' ``forward_quantize``): float8 with signround's own convention (``absmax / 448``), int8 with
compressed-tensors' (``absmax / 127.5``, range ``[-128, 127]``), where signround and vLLM's int8 kernels use
``absmax / 127`` and ``[-127, 127]``. The tests pin both: exact logits for fp8, and for int8 exact logits once
signround's input quantizer follows compressed-tensors' convention, different ones otherwise."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import signround
from signround import export
from signround.config import ActScheme, QuantScheme
from signround.errors import SignRoundError
from signround.export.ct_schemes import check_act, ct_format
from signround.pack.packed import QuantLinear
from tests.conftest import VOCAB, quantize_tiny

IDS = torch.tensor([[5, 17, 33, 90, 200, 7, 9, 11, 64, 3]])
W8 = QuantScheme(bits=8, group_size=-1, sym=True)
W4 = QuantScheme(bits=4, group_size=32, sym=True)
FP8 = QuantScheme(dtype="fp8_e4m3", group_size=-1)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _ct_int8_input(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' symmetric int8 fake quantization: scale ``absmax / 127.5`` per token (or the stored
    per-tensor scale), rounded and clamped to ``[-128, 127]``."""
    s = x.abs().amax(-1, keepdim=True) / 127.5 if layer.act.granularity == "token" else layer.input_scale
    return (x / s).round().clamp(-128, 127) * s


def _weights_only(q) -> torch.Tensor:
    """Logits of ``q`` with every layer's input left in float (then restored)."""
    layers = [(m, m.act, getattr(m, "input_scale", None)) for m in q.modules() if isinstance(m, QuantLinear)]
    for m, _, _ in layers:
        m.set_act(None)
    try:
        return _logits(q)
    finally:
        for m, act, scale in layers:
            m.set_act(act, scale)


@pytest.mark.parametrize(
    ("scheme", "granularity", "fmt"),
    [(W8, "token", "int-quantized"), (W8, "tensor", "int-quantized"), (W4, "token", "int-quantized")],
)
def test_int8_activations_load_in_transformers_with_their_quantization(tmp_path, tokenizer, scheme, granularity, fmt):
    q = quantize_tiny(tokenizer, scheme=scheme, act=ActScheme(bits=8, granularity=granularity))
    ref, float_inputs = _logits(q), _weights_only(q)
    export.save(q, tokenizer, tmp_path / "ct", "compressed-tensors")
    group = json.loads((tmp_path / "ct/config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["format"] == fmt
    inputs = {k: group["input_activations"][k] for k in ("num_bits", "type", "symmetric", "strategy", "dynamic")}
    assert inputs == {"num_bits": 8, "type": "int", "symmetric": True, "strategy": granularity,
                      "dynamic": granularity == "token"}  # fmt: skip
    tensors = load_file(tmp_path / "ct/model.safetensors")
    ours = q.get_submodule("model.layers.0.mlp.down_proj")
    stored = tensors["model.layers.0.mlp.down_proj.weight"]
    assert stored.dtype == torch.int8 and torch.equal(stored.to(torch.int16) + 2 ** (scheme.bits - 1), ours.codes())
    if granularity == "tensor":
        assert torch.equal(tensors["model.layers.0.mlp.down_proj.input_scale"], ours.input_scale)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    got = _logits(loaded)
    lin = loaded.get_submodule("model.layers.0.mlp.down_proj")
    assert torch.equal(lin.weight, ours.dequantize())  # decompressed (at the first forward) exactly
    assert not torch.allclose(got, float_inputs, atol=1e-4, rtol=0)  # its forward quantizes the inputs
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m.quantize_input = lambda x, m=m: _ct_int8_input(m, x)
    try:
        assert torch.allclose(got, _logits(q), atol=1e-5, rtol=0)  # ... as compressed-tensors rounds int8
    finally:
        for m in layers:
            del m.quantize_input
    assert torch.equal(_logits(q), ref)

    back, _ = signround.load_model(str(tmp_path / "ct"))  # signround's reader: our own convention, exactly
    assert back.get_submodule("model.layers.0.mlp.down_proj").act == ours.act
    assert torch.equal(_logits(back), ref)


@pytest.mark.parametrize("granularity", ["token", "tensor", None])
def test_fp8_loads_in_transformers_with_our_logits(tmp_path, tokenizer, granularity):
    act = None if granularity is None else ActScheme(dtype="fp8_e4m3", granularity=granularity)
    q = quantize_tiny(tokenizer, scheme=FP8, act=act)
    ref = _logits(q)
    export.save(q, tokenizer, tmp_path / "ct", "compressed-tensors")
    qc = json.loads((tmp_path / "ct/config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == group["format"] == "float-quantized"
    assert (group["weights"]["type"], group["weights"]["strategy"], group["weights"]["num_bits"]) == (
        "float",
        "channel",
        8,
    )
    if act is None:
        assert group["input_activations"] is None
    else:
        inputs = group["input_activations"]
        assert (inputs["type"], inputs["strategy"], inputs["dynamic"]) == ("float", granularity, granularity == "token")
    tensors = load_file(tmp_path / "ct/model.safetensors")
    ours = q.get_submodule("model.layers.1.self_attn.o_proj")
    stored = tensors["model.layers.1.self_attn.o_proj.weight"]
    assert stored.dtype == torch.float8_e4m3fn and torch.equal(stored.view(torch.uint8), ours.codes())
    assert ("model.layers.1.self_attn.o_proj.input_scale" in tensors) == (granularity == "tensor")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    assert torch.allclose(_logits(loaded), ref, atol=1e-5, rtol=0)
    if act is not None:
        assert not torch.allclose(_weights_only(q), ref, atol=1e-4, rtol=0)  # the activations matter here
    back, _ = signround.load_model(str(tmp_path / "ct"))
    assert torch.equal(_logits(back), ref)


def test_w4afp8_writes_packed_weights_with_fp8_inputs(tmp_path, tokenizer):
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    q = quantize_tiny(tokenizer, model=LlamaForCausalLM(cfg).eval(), scheme="W4AFP8")
    ref = _logits(q)
    export.save(q, tokenizer, tmp_path / "ct", "compressed-tensors")
    group = json.loads((tmp_path / "ct/config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["format"] == "pack-quantized" and group["weights"]["group_size"] == 128
    assert (group["input_activations"]["type"], group["input_activations"]["strategy"]) == ("float", "token")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    assert torch.allclose(_logits(loaded), ref, atol=1e-5, rtol=0)
    back, _ = signround.load_model(str(tmp_path / "ct"))
    assert torch.equal(_logits(back), ref)


@pytest.mark.parametrize(
    ("scheme", "act", "message"),
    [
        (W4, ActScheme(bits=4), "stores 8-bit activations"),
        (W4, ActScheme(dtype="fp4_e2m1"), "stores 8-bit activations"),
        (W8, ActScheme(bits=8, granularity="channel"), "--act-granularity tensor"),
        (QuantScheme(bits=8, group_size=-1, sym=False), ActScheme(bits=8), "asymmetric \\(quantize with --sym\\)"),
        (QuantScheme(bits=8, group_size=128, sym=True), ActScheme(bits=8), "per output channel.*--group-size -1"),
        (QuantScheme(bits=3, group_size=128, sym=True), ActScheme(bits=8), "is 3-bit"),
        (W4, ActScheme(bits=8, granularity="tensor"), "use --act-granularity token"),
        (W4, ActScheme(dtype="fp8_e4m3"), "W4A8 \\(4-bit, groups of 128"),
        (FP8, ActScheme(bits=8), "use --act-dtype fp8_e4m3"),
        (QuantScheme(dtype="fp8_e4m3", group_size=32), None, "--group-size -1"),
        (QuantScheme(dtype="mxfp4"), ActScheme(bits=8), "16-bit activations only"),
        (QuantScheme(dtype="fp6_e2m3", group_size=32), None, "uses fp6_e2m3"),
    ],
)
def test_what_compressed_tensors_cannot_serve_is_refused_in_one_line(scheme, act, message):
    with pytest.raises(SignRoundError, match=message) as err:
        if act is not None:
            check_act(act)
        ct_format(scheme, act, "model.layers.0.mlp.down_proj")
    assert "\n" not in str(err.value)


def test_a_refused_plan_fails_before_tuning(tmp_path, tokenizer):
    cfg = signround.QuantConfig(
        scheme=QuantScheme(bits=8, group_size=-1, sym=False),
        act=ActScheme(bits=8),
        export=signround.ExportConfig(formats="compressed-tensors"),
    )
    from signround.plan import make_plan
    from tests.conftest import make_model

    with pytest.raises(SignRoundError, match="symmetric weights"):
        make_plan(make_model("llama"), tokenizer, cfg, None, progress=False)
