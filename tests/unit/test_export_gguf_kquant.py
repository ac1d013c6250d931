"""Q4_K: the grid (two-level scales, exact storage), its GGUF bytes against the gguf package's own
decoder, and a tuned tiny model written as gguf:q4_k that transformers' GGUF loader reads back."""

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
from signround.config import DType, QuantScheme
from signround.export.gguf_export import KQUANT_FALLBACK, rope_permutation
from signround.export.gguf_kquant import encode_q4_k, encode_q5_0
from signround.formats import get_format, int_affine
from signround.formats.kquant import Q4_K
from signround.pack.packed import QuantLinear
from signround.primitives import from_groups, to_groups
from tests.conftest import VOCAB, build_tokenizer, corpus


def _grid(out=16, width=512, seed=0):
    torch.manual_seed(seed)
    wg = to_groups(torch.randn(out, width) * 0.02, 32)
    wmin, wmax = Q4_K.group_minmax(wg)
    a = torch.rand_like(wmin) * 0.4 + 0.6
    b = torch.rand_like(wmin) * 0.4 + 0.6
    scale, zero = Q4_K.compute_qparams(wmin, wmax, 4, True, a, b)
    v = (torch.rand_like(wg) - 0.5) * 0.8
    return wg, scale, zero, v


def test_scheme_fixes_width_and_group():
    s = QuantScheme(dtype="q4_k")
    assert (s.bits, s.group_size, s.dtype) == (4, 32, DType.Q4_K) and get_format(s.dtype) is Q4_K
    assert Q4_K.group_bits(s) == 16  # 4.5 bits per weight with the codes, as llama.cpp's Q4_K


@pytest.mark.parametrize("width", [512, 576])  # 576: a partial last super-block (18 groups = 2 x 8 + 2)
def test_two_level_parameters_are_stored_exactly(width):
    wg, scale, zero, v = _grid(width=width)
    stored = Q4_K.to_stored(scale, zero, None)
    assert stored["d"].dtype == torch.float16 and stored["scales"].dtype == torch.uint8
    assert int(stored["scales"].max()) <= 63 and int(stored["mins"].max()) <= 63
    assert stored["d"].shape == (16, -(-width // 256))
    s2, z2 = Q4_K.from_stored(stored, None)
    assert torch.equal(s2, scale) and torch.equal(z2, zero)
    codes = Q4_K.quantize_codes(wg, scale, zero, 4, v)
    assert torch.equal(Q4_K.dequantize_codes(codes, s2, z2), Q4_K.fake_quant(wg, scale, zero, 4, v))


def test_minimum_is_not_tied_to_the_step():
    """Unlike the int grid, the decoded minimum is dmin * m, not an integer number of steps."""
    _, scale, zero, _ = _grid()
    steps = zero / scale
    assert not torch.equal(steps, steps.round())


def test_gradients_reach_offsets_and_clipping():
    wg, _, _, v = _grid()
    wmin, wmax = Q4_K.group_minmax(wg)
    a = torch.full_like(wmin, 0.9, requires_grad=True)
    b = torch.full_like(wmin, 0.9, requires_grad=True)
    v = v.clone().requires_grad_()
    scale, zero = Q4_K.compute_qparams(wmin, wmax, 4, True, a, b)
    (Q4_K.fake_quant(wg, scale, zero, 4, v) - wg).pow(2).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (a, b, v))


def test_q4_k_bytes_decode_exactly_with_the_gguf_package():
    wg, scale, zero, v = _grid(out=8, width=768)
    codes = from_groups(Q4_K.quantize_codes(wg, scale, zero, 4, v), 768).numpy()
    st = {k: t.numpy() for k, t in Q4_K.to_stored(scale, zero, None).items()}
    raw = encode_q4_k(codes, st["scales"], st["mins"], st["d"], st["dmin"])
    assert raw.shape == (8, 3 * 144)
    want = from_groups(Q4_K.dequantize_codes(torch.from_numpy(codes).reshape(8, 24, 32), scale, zero), 768)
    np.testing.assert_array_equal(dequantize(raw, GGMLQuantizationType.Q4_K), want.numpy())
    # every bit of the 6-bit scale packing: the extremes 0 and 63 in every position
    sc = np.tile(np.array([0, 63, 21, 42, 63, 0, 37, 26], np.uint8), (1, 1))
    m = sc[:, ::-1].copy()
    one = np.ones((1, 1), np.float16)
    got = dequantize(encode_q4_k(np.ones((1, 256), np.uint8), sc, m, one, one), GGMLQuantizationType.Q4_K)
    np.testing.assert_array_equal(got.reshape(8, 32)[:, 0], sc[0].astype(np.float32) - m[0])


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


def test_tuned_q4_k_model_reads_back_through_transformers(wide, capsys):
    root, tok = wide
    out = root / "out"
    # fmt: off
    assert main(["quantize", "--model", str(root / "model"), "--data-type", "q4_k", "--format", "native,gguf:q4_k",
                 "--dataset", str(root / "calib.jsonl"), "--nsamples", "4", "--seqlen", "32", "--batch-size", "2",
                 "--iters", "3", "--output", str(out), "--quiet"]) == 0
    # fmt: on
    ours, _ = signround.load_model(str(out / "native"))
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
    assert {m.scheme for n, m in layers.items() if n.endswith("down_proj")} == {KQUANT_FALLBACK}
    assert {m.scheme.dtype for n, m in layers.items() if not n.endswith("down_proj")} == {DType.Q4_K}

    (path,) = (out / "gguf-q4_k").glob("*.gguf")
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    for i in range(2):
        q = tensors[f"blk.{i}.attn_q.weight"]
        assert q.tensor_type == GGMLQuantizationType.Q4_K
        assert tensors[f"blk.{i}.ffn_down.weight"].tensor_type == GGMLQuantizationType.Q5_0
        hf_rows = np.empty((256, 256), np.float32)
        hf_rows[rope_permutation(256, 4)] = dequantize(q.data, q.tensor_type)
        want = layers[f"model.layers.{i}.self_attn.q_proj"].dequantize().numpy()
        np.testing.assert_array_equal(hf_rows, want)  # bit exact, rows in llama.cpp's rotary order undone
        down = tensors[f"blk.{i}.ffn_down.weight"]
        want = layers[f"model.layers.{i}.mlp.down_proj"].dequantize().numpy()
        np.testing.assert_array_equal(dequantize(down.data, down.tensor_type), want)

    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog.")])
    with torch.no_grad():
        got, want = hf(ids).logits, ours(ids).logits
    # the only difference: the file's embeddings are f16
    assert (got - want).abs().max().item() <= 1e-3 * want.abs().max().item()


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
