"""K-quants (Q4_K, Q2_K): the grids (two-level scales, exact storage), their GGUF bytes against the gguf
package's own decoder, and tuned tiny models written as gguf:q4_k / gguf:q2_k that transformers' GGUF
loader reads back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import signround
from signround.cli import main
from signround.config import QuantScheme
from signround.export.gguf_export import rope_permutation
from signround.export.gguf_kquant import KQUANTS, encode_kquant, encode_q2_k, encode_q4_k, encode_q5_0
from signround.formats import get_format, int_affine
from signround.formats.kquant import Q2_K, Q3_K, Q4_K, Q6_K
from signround.pack.packed import QuantLinear
from signround.primitives import from_groups, to_groups
from tests.conftest import VOCAB, build_tokenizer, corpus

FORMATS = {"q4_k": Q4_K, "q2_k": Q2_K, "q6_k": Q6_K, "q3_k": Q3_K}
BLOCK_BYTES = {"q4_k": 144, "q2_k": 84, "q6_k": 210, "q3_k": 110}


def _grid(fmt=Q4_K, out=16, width=512, seed=0):
    torch.manual_seed(seed)
    wg = to_groups(torch.randn(out, width) * 0.02, fmt.fixed_group_size)
    wmin, wmax = fmt.group_minmax(wg)
    a = torch.rand_like(wmin) * 0.4 + 0.6
    b = torch.rand_like(wmin) * 0.4 + 0.6
    scale, zero = fmt.choose_qparams((wmin, wmax), QuantScheme(dtype=fmt.dtype), a, b)
    v = (torch.rand_like(wg) - 0.5) * 0.8
    return wg, scale, zero, v


@pytest.mark.parametrize(
    "name,bits,group,bpw",
    [("q4_k", 4, 32, 4.5), ("q2_k", 2, 16, 2.625), ("q6_k", 6, 16, 6.5625), ("q3_k", 3, 16, 3.4375)],
)
def test_scheme_fixes_width_and_group(name, bits, group, bpw):
    s = QuantScheme(dtype=name)
    fmt = get_format(s.dtype)
    assert (s.bits, s.group_size) == (bits, group) and fmt is FORMATS[name]
    assert s.bits + fmt.group_bits(s) / group == bpw  # llama.cpp's bits per weight for the type


@pytest.mark.parametrize(
    "name,width",
    [("q4_k", 512), ("q4_k", 576), ("q2_k", 512), ("q2_k", 592), ("q6_k", 512), ("q6_k", 592), ("q3_k", 512)],
)
def test_two_level_parameters_are_stored_exactly(name, width):
    """576 / 592: a partial last super-block (native checkpoints only)."""
    fmt = FORMATS[name]
    wg, scale, zero, v = _grid(fmt, width=width)
    stored = fmt.to_stored(scale, zero, None)
    assert stored["d"].dtype == torch.float16
    assert stored["scales"].dtype == (torch.int8 if name in ("q6_k", "q3_k") else torch.uint8)
    assert all(int(stored[k].int().abs().max()) <= fmt.smax for k in ("scales", "mins") if k in stored)
    assert stored["d"].shape == (16, -(-width // 256))
    s2, z2 = fmt.from_stored(stored, None)
    assert torch.equal(s2, scale) and torch.equal(z2, zero)
    codes = fmt.quantize_codes(wg, scale, zero, fmt.implied_bits, v)
    assert int(codes.max()) <= fmt.qmax
    assert torch.equal(fmt.dequantize_codes(codes, s2, z2), fmt.fake_quant(wg, scale, zero, fmt.implied_bits, v))


def test_minimum_is_not_tied_to_the_step():
    """Unlike the int grid, the decoded minimum is dmin * m, not an integer number of steps."""
    _, scale, zero, _ = _grid()
    steps = zero / scale
    assert not torch.equal(steps, steps.round())


@pytest.mark.parametrize("name", ["q4_k", "q2_k", "q6_k", "q3_k"])
def test_gradients_reach_offsets_and_clipping(name):
    fmt = FORMATS[name]
    wg, _, _, v = _grid(fmt)
    wmin, wmax = fmt.group_minmax(wg)
    a = torch.full_like(wmin, 0.9, requires_grad=True)
    b = torch.full_like(wmin, 0.9, requires_grad=True)
    v = v.clone().requires_grad_()
    scale, zero = fmt.choose_qparams((wmin, wmax), QuantScheme(dtype=fmt.dtype), a, b)
    (fmt.fake_quant(wg, scale, zero, fmt.implied_bits, v) - wg).pow(2).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (a, b, v))


@pytest.mark.parametrize("name", ["q4_k", "q2_k", "q6_k", "q3_k"])
def test_k_quant_bytes_decode_exactly_with_the_gguf_package(name):
    fmt, ggml = FORMATS[name], KQUANTS[name].ggml
    wg, scale, zero, v = _grid(fmt, out=8, width=768)
    codes = from_groups(fmt.quantize_codes(wg, scale, zero, fmt.implied_bits, v), 768).numpy()
    st = {k: t.numpy() for k, t in fmt.to_stored(scale, zero, None).items()}
    raw = encode_kquant(name, codes, st)
    assert raw.shape == (8, 3 * BLOCK_BYTES[name])
    want = from_groups(
        fmt.dequantize_codes(torch.from_numpy(codes).reshape(8, -1, fmt.fixed_group_size), scale, zero), 768
    )
    np.testing.assert_array_equal(dequantize(raw, ggml), want.numpy())


def test_every_bit_of_the_scale_packing():
    """The extremes 0 and max of the scales and minimums in every position of a super-block."""
    one = np.ones((1, 1), np.float16)
    sc = np.array([[0, 63, 21, 42, 63, 0, 37, 26]], np.uint8)
    m = sc[:, ::-1].copy()
    got = dequantize(encode_q4_k(np.ones((1, 256), np.uint8), sc, m, one, one), GGMLQuantizationType.Q4_K)
    np.testing.assert_array_equal(got.reshape(8, 32)[:, 0], sc[0].astype(np.float32) - m[0])
    sc = np.array([[0, 15, 5, 10, 15, 0, 7, 8, 1, 14, 3, 12, 9, 6, 11, 4]], np.uint8)
    m = sc[:, ::-1].copy()
    codes = np.tile(np.arange(4, dtype=np.uint8), 64).reshape(1, 256)
    got = dequantize(encode_q2_k(codes, sc, m, one, one), GGMLQuantizationType.Q2_K).reshape(16, 16)
    want = codes.reshape(16, 16).astype(np.float32) * sc[0, :, None] - m[0, :, None]
    np.testing.assert_array_equal(got, want)


def test_q5_0_bytes_decode_exactly_with_the_gguf_package():
    wg, _, _, _ = _grid(out=8, width=96)
    wmin, wmax = int_affine.group_minmax(wg)
    scale, zero = int_affine.compute_qparams(wmin, wmax, 5, True)
    codes = int_affine.quantize_codes(wg, scale, zero, 5)
    want = from_groups(int_affine.dequantize_codes(codes, scale, zero), 96).numpy()
    raw = encode_q5_0(from_groups(codes, 96).numpy(), scale.numpy().astype(np.float16))
    assert raw.shape == (8, 3 * 22)
    np.testing.assert_array_equal(dequantize(raw, GGMLQuantizationType.Q5_0), want)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A tiny LLaMA whose attention and up/gate rows hold 256 weights (Q4_K) and down_proj rows 288 (the
    Q5_0 fallback), saved with its tokenizer, and a calibration file."""
    root = tmp_path_factory.mktemp("kquant")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=288, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=0,
        eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    tok = build_tokenizer()
    tok.save_pretrained(root / "model")
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus(40, seed=1)))
    return root, tok


def _quantize(root, qtype, data_type):
    out = root / f"out-{qtype}"
    # fmt: off
    assert main(["quantize", "--model", str(root / "model"), "--data-type", data_type, "--format",
                 f"native,gguf:{qtype}", "--dataset", str(root / "calib.jsonl"), "--nsamples", "4", "--seqlen", "32",
                 "--batch-size", "2", "--iters", "3", "--output", str(out), "--quiet"]) == 0
    # fmt: on
    ours, _ = signround.load_model(str(out / "native"))
    (path,) = (out / f"gguf-{qtype}").glob("*.gguf")
    return ours, path


def _file_types(ours, path) -> dict[str, str]:
    """Each linear's block type in the file, after checking that it decodes bit for bit to our layer."""
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip
    heads = {"q_proj": 4, "k_proj": 2}
    types = {}
    for name, layer in ours.named_modules():
        if not isinstance(layer, QuantLinear):
            continue
        i, short = int(name.split(".")[2]), name.rsplit(".", 1)[1]
        t = tensors[f"blk.{i}.{names[short]}.weight"]
        got = dequantize(t.data, t.tensor_type)
        if short in heads:  # rows in llama.cpp's rotary order, undone
            hf = np.empty_like(got)
            hf[rope_permutation(layer.out_features, heads[short])] = got
            got = hf
        np.testing.assert_array_equal(got, layer.dequantize().numpy(), err_msg=name)
        types[f"{i}.{short}"] = t.tensor_type.name
    return types


def _logits_match(ours, path, tok):
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog.")])
    with torch.no_grad():
        got, want = hf(ids).logits, ours(ids).logits
    # the only difference: the file's embeddings are f16
    assert (got - want).abs().max().item() <= 1e-3 * want.abs().max().item()


@pytest.mark.parametrize("qtype", ["q4_k", "q2_k", "q6_k", "q3_k"])
def test_tuned_k_quant_model_reads_back_through_transformers(wide, qtype):
    """down_proj (288-wide rows) gets the type's fallback grid; every other layer the K-quant."""
    root, tok = wide
    kind = KQUANTS[qtype]
    ours, path = _quantize(root, qtype, qtype)
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
    assert {m.scheme for n, m in layers.items() if n.endswith("down_proj")} == {kind.fallback}
    assert {m.scheme.dtype for n, m in layers.items() if not n.endswith("down_proj")} == {kind.dtype}
    types = _file_types(ours, path)
    assert {t for k, t in types.items() if k.endswith("down_proj")} == {kind.fallback_ggml.name}
    assert {t for k, t in types.items() if not k.endswith("down_proj")} == {kind.ggml.name}
    _logits_match(ours, path, tok)


def test_q4_k_m_mix_follows_llama_cpp(wide):
    """Of 2 layers, use_more_bits picks layer 1: its v_proj becomes Q6_K and its down_proj Q6_K's fallback
    Q8_0 (288-wide rows); layer 0's down_proj gets Q4_K's fallback Q5_0; everything else Q4_K."""
    root, tok = wide
    ours, path = _quantize(root, "q4_k_m", "q4_k")
    types = _file_types(ours, path)
    special = {"1.v_proj": "Q6_K", "1.down_proj": "Q8_0", "0.down_proj": "Q5_0"}
    assert types == {k: special.get(k, "Q4_K") for k in types}
    assert GGUFReader(path).fields["general.file_type"].contents() == 15  # LlamaFileType.MOSTLY_Q4_K_M
    _logits_match(ours, path, tok)


def test_use_more_bits_matches_llama_cpp_rule():
    from signround.export.gguf_kquant import use_more_bits

    # 32 layers: the first and last 4, and every third from layer 6
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_export_refuses_a_q4_k_layer_of_another_width(wide, tmp_path, capsys):
    root, _ = wide
    out = tmp_path / "q"
    # fmt: off
    assert main(["quantize", "--model", str(root / "model"), "--data-type", "q4_k", "--method", "rtn",
                 "--output", str(out), "--quiet"]) == 0  # native: a partial super-block is fine
    # fmt: on
    assert main(["export", "--model", str(out), "--format", "gguf:q4_k", "--output", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "multiple of 256" in err[0] and "down_proj" in err[0]
    assert not (tmp_path / "g").exists()
