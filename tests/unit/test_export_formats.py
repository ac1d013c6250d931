"""auto_round / gptq / compressed-tensors exporters: tensors decoded by a third-party unpacker equal our
codes bit for bit, and transformers (+ compressed-tensors) loads our files with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

import signround
from signround import export
from signround.errors import SignRoundError
from signround.pack.packed import QuantLinear
from tests.conftest import make_model, quantize_tiny

IDS = torch.tensor([[5, 17, 33, 90, 200, 7, 9, 11, 64, 3]])


def _unsigned(x: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' unpacker returns signed values (stored value - 2^(b-1)); undo the offset."""
    return (x.to(torch.int16) + 2 ** (bits - 1)).to(torch.int64)


def _decode_gptq(t: dict[str, torch.Tensor], prefix: str, bits: int, out: int, inp: int, zero_offset: int):
    """Dequantize a GPTQ-layout layer with compressed-tensors' dense-bitstream unpacker."""
    codes = _unsigned(unpack_from_int32(t[f"{prefix}.qweight"], bits, torch.Size([inp, out]), packed_dim=0), bits)
    scales = t[f"{prefix}.scales"].float()  # [G, out]
    groups = scales.shape[0]
    zeros = _unsigned(unpack_from_int32(t[f"{prefix}.qzeros"], bits, torch.Size([groups, out])), bits)
    zeros = zeros + zero_offset
    g_idx = t.get(f"{prefix}.g_idx", torch.arange(inp) // -(-inp // groups))
    w = (codes - zeros[g_idx.long()]) * scales[g_idx.long()]  # [in, out]
    return w.t()


@pytest.mark.parametrize(("bits", "sym"), [(4, False), (4, True), (3, False), (2, True), (8, False)])
def test_auto_round_and_gptq_tensors_decode_to_our_weights(tmp_path, tokenizer, bits, sym):
    q = quantize_tiny(tokenizer, scheme=signround.QuantScheme(bits=bits, group_size=32, sym=sym))
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    fmts = ["auto_round"] + (["gptq"] if sym or all((m.qzeros > 0).all() for m in layers.values()) else [])
    export.save(q, tokenizer, tmp_path / "out", fmts)
    for fmt in fmts:
        folder = tmp_path / "out" / fmt if len(fmts) > 1 else tmp_path / "out"
        tensors = load_file(folder / "model.safetensors")
        for name, layer in layers.items():
            w = _decode_gptq(tensors, name, bits, layer.out_features, layer.in_features, 1 if fmt == "gptq" else 0)
            assert torch.equal(w, layer.dequantize()), (fmt, name)
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert qc["bits"] == bits and qc["group_size"] == 32 and qc["sym"] == sym
        if fmt == "auto_round":
            assert qc["quant_method"] == "auto-round" and qc["packing_format"] == "auto_round"
        else:
            assert qc["quant_method"] == "gptq" and qc["desc_act"] is False and "meta" not in qc


def test_mixed_precision_configs(tmp_path, tokenizer):
    q = quantize_tiny(
        tokenizer,
        layer_config={r"down_proj": {"bits": 8}, r"layers\.1\.self_attn\.o_proj": None},
    )
    export.save(q, tokenizer, tmp_path / "out", "auto_round,gptq,compressed-tensors", allow_partial_groups=False)
    ar = json.loads((tmp_path / "out/auto_round/config.json").read_text())["quantization_config"]
    assert ar["extra_config"]["model.layers.0.mlp.down_proj"]["bits"] == 8
    assert ar["extra_config"]["model.layers.1.self_attn.o_proj"]["bits"] == 16
    gq = json.loads((tmp_path / "out/gptq/config.json").read_text())["quantization_config"]
    assert gq["dynamic"][r"+:^model\.layers\.1\.mlp\.down_proj$"]["bits"] == 8
    assert r"-:^model\.layers\.1\.self_attn\.o_proj$" in gq["dynamic"]
    ct = json.loads((tmp_path / "out/compressed-tensors/config.json").read_text())["quantization_config"]
    bits = {g["weights"]["num_bits"]: g["targets"] for g in ct["config_groups"].values()}
    assert "model.layers.0.mlp.down_proj" in bits[8] and "model.layers.0.mlp.up_proj" in bits[4]
    assert "model.layers.1.self_attn.o_proj" in ct["ignore"]


def test_gptq_refuses_a_zero_point_of_zero(tmp_path, tokenizer):
    q = quantize_tiny(tokenizer)
    layer = q.model.layers[0].self_attn.q_proj
    layer.qzeros[0, 0] = 0
    with pytest.raises(SignRoundError, match="auto_round"):
        export.save(q, tokenizer, tmp_path / "out", "gptq")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sym", [True, False])
def test_compressed_tensors_loads_in_transformers_with_our_logits(tmp_path, tokenizer, sym):
    q = quantize_tiny(tokenizer, scheme=signround.QuantScheme(bits=4, group_size=32, sym=sym))
    with torch.no_grad():
        ref = q(IDS).logits
    export.save(q, tokenizer, tmp_path / "ct", "compressed-tensors")
    # transformers 5.23 + compressed-tensors 0.20 build asymmetric layers with an unpacked zero-point buffer
    # and refuse the packed one that compressed-tensors itself writes (as llm-compressor's own asym files);
    # the dequantize-at-load route reads it. Symmetric checkpoints load the default way.
    kwargs = {} if sym else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", **kwargs)
    with torch.no_grad():
        got = loaded(IDS).logits
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)


def test_compressed_tensors_refuses_partial_groups_with_a_fix(tmp_path, tokenizer):
    # intermediate width 160 is not a multiple of 64: down_proj's last group would be partial
    q = quantize_tiny(tokenizer, scheme=signround.QuantScheme(bits=4, group_size=64))
    with pytest.raises(SignRoundError, match="--group-size 32"):
        export.save(q, tokenizer, tmp_path / "ct", "compressed-tensors")
    export.save(q, tokenizer, tmp_path / "ct", "compressed-tensors", allow_partial_groups=True)
    assert (tmp_path / "ct" / "model.safetensors").is_file()


def test_unknown_or_repeated_format(tmp_path, tokenizer):
    q = quantize_tiny(tokenizer)
    with pytest.raises(SignRoundError, match="unknown format 'awq'"):
        export.save(q, tokenizer, tmp_path / "x", "native,awq")
    with pytest.raises(SignRoundError, match="twice"):
        export.save(q, tokenizer, tmp_path / "x", "native,native")
    with pytest.raises(SignRoundError, match="no quantized layers"):
        export.save(make_model("llama"), tokenizer, tmp_path / "x", "auto_round")
