"""GGUF export: block layouts decode to our exact weights, and transformers' GGUF loader reads the file."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import signround
from signround.errors import SignRoundError
from signround.export.gguf_export import GGUF_TYPES, check_gguf_plan, q4_1_offsets, rope_permutation, write_gguf
from signround.export.gguf_tokenizer import pre_tokenizer_name
from signround.model.blocks import Planned
from signround.pack.packed import QuantLinear
from tests.conftest import build_tokenizer, make_model, quantize_tiny

SCHEMES = {
    "q8_0": signround.QuantScheme(bits=8, group_size=32, sym=True),
    "q4_0": signround.QuantScheme(bits=4, group_size=32, sym=True),
    "q4_1": signround.QuantScheme(bits=4, group_size=32, sym=False),
}
GGML = {
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0,
    "q4_1": GGMLQuantizationType.Q4_1,
    "f16": GGMLQuantizationType.F16,
}
LINEARS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
SENTENCE = "The quick brown fox jumps over the lazy dog. Quantization maps 12345 numbers!"
FP16_HALF_ULP = 2.0**-11
UNSUPPORTED_QWEN2 = r"supports llama \(llama\), qwen3 .* models; qwen2 is not supported yet \(use --format native"


@pytest.fixture(scope="module")
def quantized(tokenizer) -> dict[str, torch.nn.Module]:
    """One tiny quantized LLaMA per block type, in the scheme that type stores."""
    return {qtype: quantize_tiny(tokenizer, scheme=scheme) for qtype, scheme in SCHEMES.items()}


@pytest.fixture(scope="module")
def written(quantized, tokenizer, tmp_path_factory) -> dict[str, Path]:
    """q8_0 / q4_0 / q4_1 files of the fixtures above, and an f16 file of the q4_1 model."""
    out = {}
    for qtype, model in quantized.items():
        out[qtype] = write_gguf(model, tokenizer, tmp_path_factory.mktemp(qtype), qtype)
    out["f16"] = write_gguf(quantized["q4_1"], tokenizer, tmp_path_factory.mktemp("f16"), "f16")
    return out


def _tensors(path: Path) -> dict:
    return {t.name: t for t in GGUFReader(path).tensors}


def _field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def _decoded(tensor, rows: int, n_head: int | None) -> np.ndarray:
    """A linear weight ``[out, in]`` as the file decodes it, with llama.cpp's q/k row order undone."""
    w = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    if n_head is None:
        return w
    hf = np.empty_like(w)
    hf[rope_permutation(rows, n_head)] = w
    return hf


def _linears(model):
    cfg = model.config
    for i in range(cfg.num_hidden_layers):
        for gg, hf in LINEARS.items():
            heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(gg)
            yield f"blk.{i}.{gg}.weight", model.get_submodule(f"model.layers.{i}.{hf}"), heads


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _as_file_stores(model):
    """A copy whose float tensors are what the file holds: matrices rounded through f16, 1-D kept."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for module in ref.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(module.weight.half().float())
    return ref


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_blocks_decode_exactly(quantized, written, qtype):
    tensors = _tensors(written[qtype])
    model = quantized[qtype]
    for name, layer, heads in _linears(model):
        assert isinstance(layer, QuantLinear)
        t = tensors[name]
        assert t.tensor_type == GGML[qtype]
        assert [int(d) for d in t.shape] == [layer.in_features, layer.out_features]  # ne0 = input dim
        got = _decoded(t, layer.out_features, heads)
        np.testing.assert_array_equal(got, layer.dequantize().numpy(), err_msg=name)  # bit exact


def test_q4_1_blocks_within_fp16_offset_rounding(quantized, written):
    tensors = _tensors(written["q4_1"])
    worst = 0.0
    for name, layer, heads in _linears(quantized["q4_1"]):
        t = tensors[name]
        assert t.tensor_type == GGMLQuantizationType.Q4_1
        got = _decoded(t, layer.out_features, heads)
        scales, zeros = layer.scales.numpy(), layer.zeros().numpy()
        m_exact = -scales.astype(np.float64) * zeros  # per group: the value of code 0
        m_file = q4_1_offsets(scales, zeros).astype(np.float64)
        rel = np.abs(m_file - m_exact) / np.maximum(np.abs(m_exact), 1e-30)
        assert rel.max() <= FP16_HALF_ULP, name
        worst = max(worst, float(rel.max()))
        # every weight is off by exactly its group's offset rounding, nothing else
        want = layer.dequantize().numpy().astype(np.float64)
        err = (got - want).reshape(layer.out_features, -1, 32)
        bound = np.abs(m_exact)[..., None] * FP16_HALF_ULP + 1e-12
        assert (np.abs(err) <= bound).all(), name
    print(f"q4_1: worst relative rounding of m = {worst:.3g} (bound 2^-11 = {FP16_HALF_ULP:.3g})")
    assert worst > 0  # the rounding is real: the test would notice a format that hides it


def test_f16_of_quantized_model_is_its_dequantized_weight(quantized, written):
    tensors = _tensors(written["f16"])
    for name, layer, heads in _linears(quantized["q4_1"]):
        assert tensors[name].tensor_type == GGMLQuantizationType.F16
        got = _decoded(tensors[name], layer.out_features, heads)
        np.testing.assert_array_equal(got, layer.dequantize().half().float().numpy(), err_msg=name)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1", "f16"])
def test_layout_and_metadata(written, qtype, tokenizer):
    reader = GGUFReader(written[qtype])
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied embeddings: llama.cpp reuses token_embd
    assert tensors["token_embd.weight"].tensor_type == GGMLQuantizationType.F16
    for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.1.ffn_norm.weight"):
        assert tensors[name].tensor_type == GGMLQuantizationType.F32
    assert len(tensors) == 1 + 2 * 9 + 1
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == 2
    assert _field(reader, "llama.attention.head_count_kv") == 2
    assert _field(reader, "llama.rope.dimension_count") == 16
    assert _field(reader, "llama.feed_forward_length") == 160
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[:3] == [3, 3, 1]  # <s>, </s> are control tokens
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1", "f16"])
def test_transformers_reads_the_file(quantized, written, tokenizer, qtype):
    path = written[qtype]
    ours = quantized["q4_1" if qtype == "f16" else qtype]
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ids = torch.tensor([tokenizer.encode(SENTENCE)])
    got = _logits(hf, ids)
    want = _logits(ours, ids)
    scale = want.abs().max().item()
    # Against what the file stores (embeddings rounded to f16): the only difference left is q4_1's
    # rounding of m, or f16's rounding of the dequantized weights.
    stored = _logits(_as_file_stores(ours), ids)
    tol = {"q8_0": 1e-6, "q4_0": 1e-6, "q4_1": 1e-3, "f16": 1e-3}[qtype]  # measured: 0, 0, 2e-4, 1e-4
    assert (got - stored).abs().max().item() <= tol * scale
    assert (got - want).abs().max().item() <= 1e-3 * scale  # ... and the f16 embeddings on top (measured 3e-4)

    gt = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert gt.encode(SENTENCE, add_special_tokens=True) == tokenizer.encode(SENTENCE, add_special_tokens=True)
    assert (gt.bos_token, gt.eos_token) == (tokenizer.bos_token, tokenizer.eos_token)


def test_float_model_f16_loads_with_matching_logits(tokenizer, tmp_path):
    model = make_model("llama").eval()
    path = write_gguf(model, tokenizer, tmp_path, "f16")
    assert path == tmp_path / "model-f16.gguf"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    ids = torch.tensor([tokenizer.encode(SENTENCE)])
    got, want = _logits(hf, ids), _logits(model, ids)
    stored = _logits(_as_file_stores(model), ids)
    scale = want.abs().max().item()
    assert (got - stored).abs().max().item() <= 1e-5 * scale
    assert (got - want).abs().max().item() <= 2e-3 * scale


def test_chat_template_and_untied_head_are_written(tmp_path):
    tok = build_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}</s>{% endfor %}"
    model = make_model("llama")
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 0.5)
    path = write_gguf(model, tok, tmp_path, "f16")
    reader = GGUFReader(path)
    assert _field(reader, "tokenizer.chat_template") == tok.chat_template
    out = {t.name: t for t in reader.tensors}["output.weight"]
    head = model.lm_head.weight.detach().half().float().numpy()
    np.testing.assert_array_equal(dequantize(out.data, out.tensor_type), head)
    gt = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert gt.chat_template == tok.chat_template
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    assert not hf.config.tie_word_embeddings
    ids = torch.tensor([tok.encode(SENTENCE)])
    got, stored = _logits(hf, ids), _logits(_as_file_stores(model), ids)
    assert (got - stored).abs().max().item() <= 1e-5 * stored.abs().max().item()


def test_mismatched_scheme_names_layer_and_fix(tokenizer, quantized, tmp_path):
    with pytest.raises(SignRoundError) as err:
        write_gguf(quantized["q4_1"], tokenizer, tmp_path, "q4_0")
    assert str(err.value) == (
        "gguf:q4_0 stores symmetric 4-bit groups of 32; model.layers.0.self_attn.q_proj is W4G32-asym; "
        "run `signround quantize --bits 4 --group-size 32 --sym --format gguf:q4_0`"
    )
    assert not list(tmp_path.iterdir())  # failed before writing anything
    with pytest.raises(SignRoundError, match="q8_0 stores symmetric 8-bit .* is W4G32-sym; run .*--bits 8"):
        write_gguf(quantized["q4_0"], tokenizer, tmp_path, "q8_0")
    with pytest.raises(SignRoundError, match="needs a model quantized by signround"):
        write_gguf(make_model("llama"), tokenizer, tmp_path, "q4_1")


def test_check_gguf_plan():
    """The check ``--format gguf:<type>`` runs before tuning, on the planned layers (name, scheme, shape)."""
    llama = make_model("llama", layers=1)

    def plan(*schemes, in_features=64):
        return [Planned(f"model.layers.0.mlp.l{i}", s, in_features, 64) for i, s in enumerate(schemes)]

    for qtype, scheme in SCHEMES.items():
        check_gguf_plan(llama, plan(scheme), qtype)
        check_gguf_plan(llama, plan(scheme), "f16")
    with pytest.raises(SignRoundError, match=r"gguf:q4_1 stores asymmetric 4-bit groups of 32; .*l0 is W4G128-asym"):
        check_gguf_plan(llama, plan(signround.QuantScheme(bits=4, group_size=128)), "q4_1")
    with pytest.raises(SignRoundError, match="--bits 4 --group-size 32 --format gguf:q4_1`$"):
        check_gguf_plan(llama, plan(SCHEMES["q4_1"], SCHEMES["q4_0"]), "q4_1")
    with pytest.raises(SignRoundError, match="l0 has 48 input features, not a multiple of 32"):
        check_gguf_plan(llama, plan(SCHEMES["q4_0"], in_features=48), "q4_0")
    with pytest.raises(SignRoundError, match="unknown gguf type 'q5_k'"):
        check_gguf_plan(llama, [], "q5_k")
    with pytest.raises(SignRoundError, match=UNSUPPORTED_QWEN2):
        check_gguf_plan(make_model("qwen2", layers=1), [], "f16")
    assert GGUF_TYPES == ("f16", "q8_0", "q4_0", "q4_1", "q4_k", "q2_k", "q6_k", "q3_k", "q4_k_m")
    # a K-quant type on rows of a multiple of 256 weights, its fallback grid on any width
    check_gguf_plan(llama, plan(signround.QuantScheme(dtype="q4_k"), in_features=256), "q4_k")
    check_gguf_plan(llama, plan(signround.QuantScheme(bits=5, group_size=32, sym=True)), "q4_k")
    with pytest.raises(SignRoundError, match="gguf:q4_k stores Q4_K rows of a multiple of 256 weights; .*l0 has 64"):
        check_gguf_plan(llama, plan(signround.QuantScheme(dtype="q4_k")), "q4_k")
    wanted = r"gguf:q4_k stores Q4_K \(and W5G32-sym as Q5_0\) layers; .* W4G32-asym; run .*--data-type q4_k"
    with pytest.raises(SignRoundError, match=wanted):
        check_gguf_plan(llama, plan(SCHEMES["q4_1"]), "q4_k")


def test_non_llama_and_non_bpe_are_refused(tokenizer, tmp_path):
    with pytest.raises(SignRoundError, match=UNSUPPORTED_QWEN2):
        write_gguf(make_model("qwen2"), tokenizer, tmp_path, "f16")
    wl = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(SignRoundError, match="byte-level BPE tokenizers .* this one is WordLevel"):
        write_gguf(make_model("llama"), PreTrainedTokenizerFast(tokenizer_object=wl), tmp_path, "f16")
    with pytest.raises(SignRoundError, match="needs the model's tokenizer"):
        write_gguf(make_model("llama"), None, tmp_path, "f16")
    assert not list(tmp_path.iterdir())


def test_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    digits = {"type": "Digits", "individual_digits": True}
    smol_head = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>"]
    assert pre_tokenizer_name({"pre_tokenizer": byte_level}, ["a"]) == "gpt-2"
    seq = {"type": "Sequence", "pretokenizers": [digits, byte_level]}
    assert pre_tokenizer_name({"pre_tokenizer": seq}, ["a"]) == "smollm"
    smol = smol_head + [f"t{i}" for i in range(49152 - len(smol_head))]
    assert pre_tokenizer_name({"pre_tokenizer": byte_level}, smol) == "smollm"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace"}}, ["a"]) == "default"


def test_rope_permutation_matches_transformers_inverse():
    # transformers' LlamaTensorProcessor undoes it by reshape(n_head, dim, 2).swapaxes(2, 1)
    rows, n_head = 32, 2
    w = np.arange(rows * 3).reshape(rows, 3)
    gg = w[rope_permutation(rows, n_head)]
    back = gg.reshape(n_head, rows // n_head // 2, 2, 3).swapaxes(2, 1).reshape(rows, 3)
    np.testing.assert_array_equal(back, w)
    assert list(rope_permutation(8, 1)) == [0, 4, 1, 5, 2, 6, 3, 7]


@pytest.mark.parametrize("name", ["qwen2", "llama-bpe", "gpt-4o"])
def test_split_regex_tokenizers_are_named_and_read_back_alike(name, tmp_path):
    """A Qwen2/3, LLaMA 3 or o200k (gpt-oss) style tokenizer (Split regex, then ByteLevel without a regex) gets
    llama.cpp's name for its regex, which is transformers' own name for the same regex; transformers' GGUF
    tokenizer then splits text as the original does (digits one by one for qwen2, in threes for the others;
    "(quick" one piece, "'S" matched case-insensitively)."""
    from tokenizers import Regex, decoders, trainers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    from signround.export.gguf_tokenizer import SPLIT_NAMES

    regex = next(r for r, n in SPLIT_NAMES.items() if n == name)
    assert GGUF_PRE_TOKENIZER_SPLITS[name] == regex
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([SENTENCE * 3, "12 345 6789 " * 5, "IT'S (quick) (brown) " * 5], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    path = write_gguf(make_model("llama", layers=1), fast, tmp_path, "f16")
    assert _field(GGUFReader(path), "tokenizer.ggml.pre") == name
    gt = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = (
        SENTENCE + " 1234567 IT'S (quick) done\n\nYES"
    )  # measured: GPT-2's regex splits each of the three differently
    assert gt.encode(text, add_special_tokens=False) == fast.encode(text, add_special_tokens=False)
