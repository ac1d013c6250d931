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
from signround.export import ExportFormat, ExportOptions
from signround.export.gguf_export import GGUF_TYPES
from signround.export.gguf_kquant import KQUANTS, MIXES
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
    export.save(q, tokenizer, tmp_path / "out", "auto_round,gptq,compressed-tensors", options=ExportOptions())
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
    export.save(q, tokenizer, tmp_path / "ct", "compressed-tensors", options=ExportOptions(allow_partial_groups=True))
    assert (tmp_path / "ct" / "model.safetensors").is_file()


def test_unknown_or_repeated_format(tmp_path, tokenizer):
    q = quantize_tiny(tokenizer)
    with pytest.raises(SignRoundError, match="unknown format 'awq'"):
        export.save(q, tokenizer, tmp_path / "x", "native,awq")
    with pytest.raises(SignRoundError, match="twice"):
        export.save(q, tokenizer, tmp_path / "x", "native,native")
    with pytest.raises(SignRoundError, match="no quantized layers"):
        export.save(make_model("llama"), tokenizer, tmp_path / "x", "auto_round")
    with pytest.raises(SignRoundError, match="unknown format 'gguf:q5_k'"):
        export.parse_formats("gguf:q5_k")
    with pytest.raises(SignRoundError, match="--format is empty"):
        export.parse_formats(" , ")


def test_format_names_and_properties():
    assert export.parse_formats("native, gguf:q4_k_m") == [ExportFormat.NATIVE, ExportFormat.GGUF_Q4_K_M]
    assert export.parse_formats([ExportFormat.GPTQ, "auto_round"]) == [ExportFormat.GPTQ, ExportFormat.AUTO_ROUND]
    fmt = ExportFormat.GGUF_Q4_K_M
    assert (str(fmt), f"{fmt}", fmt == "gguf:q4_k_m") == ("gguf:q4_k_m", "gguf:q4_k_m", True)
    assert (fmt.is_gguf, fmt.gguf_type, fmt.is_kquant, fmt.is_mix, fmt.subfolder) == (
        True, "q4_k_m", True, True, "gguf-q4_k_m",
    )  # fmt: skip
    q4_0, ct = ExportFormat.GGUF_Q4_0, ExportFormat.COMPRESSED_TENSORS
    assert (q4_0.gguf_type, q4_0.is_kquant, q4_0.is_mix) == ("q4_0", False, False)
    assert (ct.is_gguf, ct.gguf_type, ct.is_kquant, ct.subfolder) == (False, None, False, "compressed-tensors")
    # one member per GGUF type; the K-quant ones are exactly gguf_kquant's types and mixes
    assert tuple(f.gguf_type for f in ExportFormat if f.is_gguf) == GGUF_TYPES
    assert {f.gguf_type for f in ExportFormat if f.is_kquant} == {*KQUANTS, *MIXES}
    assert {f.gguf_type for f in ExportFormat if f.is_mix} == set(MIXES)


def test_every_format_has_one_registered_exporter():
    for fmt in ExportFormat:
        exporter = export.get_exporter(fmt)
        assert isinstance(exporter, export.Exporter) and exporter.format is fmt
    stores = [ExportFormat.NATIVE, ExportFormat.COMPRESSED_TENSORS]
    assert [f for f in ExportFormat if f.stores_activations] == stores
    with pytest.raises(SignRoundError, match="gptq, gguf:q8_0 cannot store quantized activations"):
        export.refuse_activations([ExportFormat.NATIVE, ExportFormat.GPTQ, ExportFormat.GGUF_Q8_0])


def test_registering_a_format_twice_is_refused(monkeypatch):
    from signround.export import registry

    native = export.get_exporter(ExportFormat.NATIVE)

    class Other(export.Exporter):
        def write(self, model, tokenizer, folder, options):
            raise AssertionError("never registered")

    with pytest.raises(ValueError, match="exporter native is already registered by NativeExporter"):
        export.register_exporter(ExportFormat.NATIVE)(Other)
    with pytest.raises(ValueError, match="exporter gptq is already registered by GPTQExporter"):
        export.register_exporter(ExportFormat.GPTQ, ExportFormat.NATIVE)(Other)
    with pytest.raises(ValueError, match="needs at least one"):
        export.register_exporter()
    assert export.get_exporter(ExportFormat.NATIVE) is native  # nothing of Other was registered
    assert all(type(export.get_exporter(f)) is not Other for f in ExportFormat)
    monkeypatch.delitem(registry._EXPORTERS, ExportFormat.NATIVE)  # restored after the test
    with pytest.raises(LookupError, match="no exporter is registered for native"):
        export.get_exporter("native")
    with pytest.raises(ValueError, match="register_exporter lists native twice for Other"):
        export.register_exporter(ExportFormat.NATIVE, ExportFormat.NATIVE)(Other)
    assert export.register_exporter("native")(Other) is Other
    assert type(export.get_exporter(ExportFormat.NATIVE)) is Other


def test_asymmetric_compressed_tensors_tensors_are_the_librarys_own(tmp_path, tokenizer):
    """Our asymmetric ``pack-quantized`` tensors are byte for byte what compressed-tensors' own compressor
    writes for the same weights, scales and zero points (zero points packed along the output dimension), so
    transformers' refusal of them on its default load (docs/formats.md) is upstream's, not our layout's."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    q = quantize_tiny(tokenizer, scheme=signround.QuantScheme(bits=4, group_size=32, sym=False))
    export.save(q, tokenizer, tmp_path / "ct", "compressed-tensors")
    ours = load_file(tmp_path / "ct/model.safetensors")
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = q.get_submodule(name)
        theirs = PackedQuantizationCompressor.compress(
            {
                "weight": layer.dequantize(),
                "weight_scale": layer.scales.float(),
                "weight_zero_point": (layer.qzeros.to(torch.int16) - 8).to(torch.int8),
            },
            scheme,
        )
        assert theirs["weight_zero_point"].shape[0] == -(-layer.out_features * 4 // 32)  # packed along dim 0
        for key in ("weight_packed", "weight_zero_point", "weight_shape"):
            assert torch.equal(theirs[key], ours[f"{name}.{key}"]), key


def test_auto_round_refuses_groups_its_loader_cannot_run(tmp_path, tokenizer):
    # down_proj's input width 160 is not a multiple of 64: auto-round's CPU backends cannot run that layer
    q = quantize_tiny(tokenizer, scheme=signround.QuantScheme(bits=4, group_size=64, sym=True))
    with pytest.raises(SignRoundError, match=r"down_proj \(input width 160.*--group-size one of 32, -1") as err:
        export.save(q, tokenizer, tmp_path / "ar", "auto_round")
    assert "\n" not in str(err.value) and not (tmp_path / "ar").exists()
    export.save(q, tokenizer, tmp_path / "ar", "auto_round", options=ExportOptions(allow_partial_groups=True))
    assert (tmp_path / "ar" / "model.safetensors").is_file()
