"""GGUF export of mixtures of experts (Qwen3-MoE as llama.cpp's ``qwen3moe``, gpt-oss as ``gpt-oss``, Mixtral as
``llama`` with experts, OLMoE as ``olmoe``) and of dense Qwen3, on tiny random-init models tuned by signround: the
per-expert linears become llama.cpp's fused ``ffn_{gate,up,down}_exps`` tensors holding exactly the tuned codes,
the gguf package decodes them to signround's weights bit for bit, and transformers' GGUF loader runs the file with
signround's logits. transformers 5.24 cannot read the gpt-oss, Mixtral or OLMoE files (below), so for those the
tests rebuild transformers' model from the file itself."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
from gguf import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES, GGUFReader
from gguf.quants import dequantize
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

import signround
from signround.cli import main
from signround.config import ExportConfig, LayerRule
from signround.errors import SignRoundError
from signround.export.gguf_export import write_gguf
from signround.pack.packed import QuantLinear
from tests.conftest import corpus, make_config
from tests.unit.test_experts import COMMON, CONFIGS, build

QUIET = signround.RunOptions(progress=False)
E, H = 4, 64
# Qwen3-MoE's expert width is transformers' default (768): its GGUF loader does not read
# qwen3moe.expert_feed_forward_length, so only then does it build the right shapes from the file alone. 768
# is also a multiple of 256, so the experts' down_proj can be a K-quant. gpt-oss: 96 (its config is not read
# by transformers at all, see the module docstring).
QWEN3_MOE = {**CONFIGS["qwen3_moe"], "moe_intermediate_size": 768, "norm_topk_prob": True}
GPT_OSS = {**CONFIGS["gpt_oss"], "intermediate_size": 96}
# Mixtral and OLMoE: expert width 256 (their intermediate_size), so the experts' down_proj can be a K-quant.
MIXTRAL = {**CONFIGS["mixtral"], "intermediate_size": 256}
OLMOE = {**CONFIGS["olmoe"], "intermediate_size": 256}
# Dense Qwen3: head_dim 128, transformers' default (it reads qwen3.attention.key_length only for qwen3moe).
QWEN3 = dict(hidden_size=64, intermediate_size=96, num_key_value_heads=2, head_dim=128, max_position_embeddings=256)
W4G32_SYM = signround.QuantScheme(bits=4, group_size=32, sym=True)
IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(5))


def _model(family: str, **fields) -> torch.nn.Module:
    """A seeded tiny model of ``family`` whose experts and routers are re-randomized (as test_experts.build)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **COMMON, **fields)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name or ".mlp.gate." in name or ".mlp.router." in name:
                p.copy_(torch.randn_like(p) * 0.05)
    return model


def _quantize(model, tokenizer, scheme=W4G32_SYM, **fields):
    """SignRound, 2 steps, on the test corpus (the codes in the file are these tuned ones); ``method="rtn"``
    for the tests about layout rather than tuning (faster)."""
    cfg = make_config(scheme=scheme, iters=2, nsamples=2, seqlen=32, batch_size=2, **fields)
    return signround.quantize(model, tokenizer, cfg, corpus(20, seed=1), QUIET)


def _save(model, tokenizer, folder, qtype):
    signround.save(model, tokenizer, folder, f"gguf:{qtype}")
    return folder / f"model-{qtype}.gguf"


@pytest.fixture(scope="module")
def qwen3_moe(tokenizer, tmp_path_factory):
    """(Qwen3-MoE quantized W4G32-sym, its gguf:q4_0 file). RTN: SignRound on its 768-wide experts costs tens
    of seconds here; the gpt-oss test exports SignRound-tuned experts."""
    model = _quantize(_model("qwen3_moe", **QWEN3_MOE), tokenizer, method="rtn")
    return model, _save(model, tokenizer, tmp_path_factory.mktemp("qwen3moe"), "q4_0")


@pytest.fixture(scope="module")
def qwen3_moe_k(tokenizer, tmp_path_factory):
    """(Qwen3-MoE tuned on Q4_K for gguf:q4_k_m, its file)."""
    fields = {"export": ExportConfig(formats="gguf:q4_k_m"), "method": "rtn"}
    model = _quantize(_model("qwen3_moe", **QWEN3_MOE), tokenizer, signround.QuantScheme(dtype="q4_k"), **fields)
    return model, _save(model, tokenizer, tmp_path_factory.mktemp("qwen3moe-k"), "q4_k_m")


def _tensors(path):
    return {t.name: t for t in GGUFReader(path).tensors}


def _fields(path) -> dict:
    reader = GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}


def _names_are_the_archs(path) -> None:
    """Every tensor of the file is one gguf-py lists for the file's architecture (MODEL_TENSORS)."""
    arch = GGUFReader(path).fields["general.architecture"].contents()
    kind = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)
    known = {TENSOR_NAMES[t] for t in MODEL_TENSORS[kind]}
    for name in _tensors(path):
        base = name.rsplit(".", 1)[0]  # drop .weight / .bias
        assert re.sub(r"^blk\.\d+\.", "blk.{bid}.", base) in known, name


def _decoded(t) -> np.ndarray:
    """A tensor as the gguf package decodes it, torch order (``[E, out, in]`` for experts)."""
    return dequantize(t.data, t.tensor_type).astype(np.float32)


def _experts_weight(model, i: int, proj: str) -> np.ndarray:
    """signround's dequantized expert weights of layer ``i``, stacked: ``[E, out, in]``."""
    layers = [model.get_submodule(f"model.layers.{i}.mlp.experts.{e}.{proj}") for e in range(E)]
    assert all(isinstance(layer, QuantLinear) for layer in layers)
    return np.stack([layer.dequantize().numpy() for layer in layers])


def _experts_and_router_match(tensors: dict, model, i: int, i_width: int) -> None:
    """Layer ``i``'s fused ``ffn_*_exps`` (Q4_0, ``ne`` innermost first) decode, expert-major, to signround's
    dequantized expert weights bit for bit; its router ``ffn_gate_inp`` is the float ``mlp.gate`` in F32."""
    for gg, proj in EXPERT_TENSORS.items():
        t = tensors[f"blk.{i}.{gg}.weight"]
        assert t.tensor_type.name == "Q4_0"
        ne = [H, i_width, E] if proj != "down_proj" else [i_width, H, E]  # GGUF lists innermost first
        assert [int(d) for d in t.shape] == ne
        np.testing.assert_array_equal(_decoded(t), _experts_weight(model, i, proj), err_msg=t.name)
    router = tensors[f"blk.{i}.ffn_gate_inp.weight"]
    assert router.tensor_type.name == "F32" and [int(d) for d in router.shape] == [H, E]
    np.testing.assert_array_equal(
        _decoded(router), model.get_submodule(f"model.layers.{i}.mlp.gate").weight.detach().numpy()
    )


def _as_file_stores(model):
    """A copy whose float matrices (embeddings, output head) are what the file stores: rounded through f16."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for module in ref.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(module.weight.half().float())
    return ref


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


EXPERT_TENSORS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}


def test_qwen3_moe_experts_are_fused_tensors_of_the_quantized_codes(qwen3_moe):
    model, path = qwen3_moe
    tensors = _tensors(path)
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm",
                 "ffn_gate_inp", *EXPERT_TENSORS, "ffn_norm"]  # fmt: skip
    want = {"token_embd.weight", "output_norm.weight", "output.weight"}
    want |= {f"blk.{i}.{n}.weight" for i in range(2) for n in per_layer}
    assert set(tensors) == want  # no per-expert tensors, no dense ffn_gate/up/down
    _names_are_the_archs(path)
    i_width = QWEN3_MOE["moe_intermediate_size"]
    for i in range(2):
        _experts_and_router_match(tensors, model, i, i_width)
        q = tensors[f"blk.{i}.attn_q.weight"]  # NeoX rotary: rows stay in HF's order (no LLaMA permutation)
        np.testing.assert_array_equal(
            _decoded(q), model.get_submodule(f"model.layers.{i}.self_attn.q_proj").dequantize().numpy()
        )
        assert tensors[f"blk.{i}.attn_q_norm.weight"].tensor_type.name == "F32"
    meta = _fields(path)
    assert meta["general.architecture"] == "qwen3moe"
    assert meta["general.file_type"] == 2  # MOSTLY_Q4_0
    expected = {"expert_count": E, "expert_used_count": 2, "expert_feed_forward_length": i_width,
                "feed_forward_length": 128, "block_count": 2, "embedding_length": H, "attention.head_count": 4,
                "attention.head_count_kv": 2, "attention.key_length": 16, "attention.value_length": 16}  # fmt: skip
    assert {k: meta[f"qwen3moe.{k}"] for k in expected} == expected


def test_transformers_loads_the_qwen3_moe_file(qwen3_moe, tokenizer):
    model, path = qwen3_moe
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    cfg = theirs.config
    assert (cfg.model_type, cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob) == ("qwen3_moe", E, 2, True)
    assert (cfg.moe_intermediate_size, cfg.head_dim, cfg.hidden_size) == (768, 16, H)
    # transformers fuses the experts back into its own module (gate rows then up rows)
    gate_up = theirs.model.layers[1].mlp.experts.gate_up_proj.detach().numpy()
    np.testing.assert_array_equal(gate_up[:, :768], _experts_weight(model, 1, "gate_proj"))
    np.testing.assert_array_equal(gate_up[:, 768:], _experts_weight(model, 1, "up_proj"))
    # Against what the file stores (embeddings and head rounded to f16), the only difference left is the fused
    # vs per-expert summation order (about 1e-7, see test_experts).
    torch.testing.assert_close(_logits(theirs), _logits(_as_file_stores(model)), rtol=1e-5, atol=1e-5)
    ours = _logits(model)
    assert (_logits(theirs) - ours).abs().max() <= 2e-3 * ours.abs().max()  # ... and the f16 embeddings


def test_q4_k_m_experts_share_one_type_per_layer_and_decode_exactly(qwen3_moe_k):
    """llama.cpp's Q4_K_M on 2 layers upgrades layer 1's attn_v and ffn_down (here: every expert's down_proj,
    one fused tensor) to Q6_K; rows of 64 weights take the fallbacks (Q5_0 for Q4_K, Q8_0 for Q6_K)."""
    model, path = qwen3_moe_k
    tensors = _tensors(path)
    types = {n: t.tensor_type.name for n, t in tensors.items() if "exps" in n or "attn_v" in n}
    assert types == {
        "blk.0.attn_v.weight": "Q5_0", "blk.1.attn_v.weight": "Q8_0",
        "blk.0.ffn_gate_exps.weight": "Q5_0", "blk.0.ffn_up_exps.weight": "Q5_0", "blk.0.ffn_down_exps.weight": "Q4_K",
        "blk.1.ffn_gate_exps.weight": "Q5_0", "blk.1.ffn_up_exps.weight": "Q5_0", "blk.1.ffn_down_exps.weight": "Q6_K",
    }  # fmt: skip
    for i in range(2):
        for gg, proj in EXPERT_TENSORS.items():
            np.testing.assert_array_equal(_decoded(tensors[f"blk.{i}.{gg}.weight"]), _experts_weight(model, i, proj))
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    torch.testing.assert_close(_logits(theirs), _logits(_as_file_stores(model)), rtol=1e-5, atol=1e-5)


def test_experts_of_one_layer_in_different_types_are_refused_before_tuning(tokenizer):
    model = _model("qwen3_moe", **QWEN3_MOE)
    rules = (LayerRule(r"model\.layers\.0\.mlp\.experts\.1\.down_proj$", signround.QuantScheme(dtype="q6_k")),)
    cfg = make_config(scheme=signround.QuantScheme(dtype="q4_k"), export=ExportConfig(formats="gguf:q4_k_m"),
                      layer_config=rules, method="rtn")  # fmt: skip
    with pytest.raises(SignRoundError) as err:
        signround.quantize(model, tokenizer, cfg, corpus(20, seed=1), QUIET)
    assert str(err.value) == (
        "model.layers.0.mlp.experts.{e}.down_proj: llama.cpp stores the experts of a layer as one ffn_down_exps "
        "tensor of one type, but gguf:q4_k_m would hold Q4_K for experts [0, 2, 3]; Q6_K for experts [1]; give "
        "every expert of a layer the same scheme (one layer rule for model.layers.0.mlp.experts.*.down_proj)"
    )
    assert not [m for m in model.modules() if isinstance(m, QuantLinear)]  # refused before any tuning
    # an expert a rule keeps float would be F16 among Q4_0 experts: refused the same way
    keep_float = (LayerRule(r"model\.layers\.1\.mlp\.experts\.2\.up_proj$", None),)
    cfg = make_config(scheme=W4G32_SYM, export=ExportConfig(formats="gguf:q4_0"), layer_config=keep_float,
                      method="rtn")  # fmt: skip
    with pytest.raises(
        SignRoundError, match=r"experts\.\{e\}\.up_proj: .* Q4_0 for experts \[0, 1, 3\]; F16 for experts \[2\]"
    ):
        signround.quantize(model, tokenizer, cfg, corpus(20, seed=1), QUIET)


def test_deepseek_v3_is_refused_before_tuning(tokenizer):
    """DeepSeek-V3 (multi-head latent attention, llama.cpp's ``deepseek2``) is not written."""
    model = build("deepseek_v3")
    per_channel = signround.QuantScheme(bits=4, group_size=-1, sym=True)  # fits DeepSeek-V3's 16-wide kv_b_proj
    cfg = make_config(scheme=per_channel, export=ExportConfig(formats="gguf:q4_0"), method="rtn")
    with pytest.raises(SignRoundError) as err:
        signround.quantize(model, tokenizer, cfg, corpus(20, seed=1), QUIET)
    assert str(err.value) == (
        "gguf export supports llama (llama), qwen3 (qwen3), qwen3_moe (qwen3moe), gpt_oss (gpt-oss), "
        "mixtral (llama), olmoe (olmoe) models; deepseek_v3 is not supported yet "
        "(use --format native, gptq, auto_round or compressed-tensors)"
    )
    assert not [m for m in model.modules() if isinstance(m, QuantLinear)]


def test_qwen3_moe_without_renormalized_routing_is_refused(tokenizer):
    model = _model("qwen3_moe", **{**QWEN3_MOE, "norm_topk_prob": False})
    cfg = make_config(scheme=W4G32_SYM, export=ExportConfig(formats="gguf:q4_0"), method="rtn")
    with pytest.raises(SignRoundError, match=r"^gguf export of qwen3_moe \(qwen3moe\): llama.cpp always renormal"):
        signround.quantize(model, tokenizer, cfg, corpus(20, seed=1), QUIET)


def test_float_moe_with_fused_experts_exports_f16(tokenizer, tmp_path):
    """`signround export --format gguf:f16` of a float model: transformers' fused experts, never unfused."""
    model = _model("qwen3_moe", **QWEN3_MOE)
    path = write_gguf(model, tokenizer, tmp_path, "f16")
    t = _tensors(path)["blk.0.ffn_up_exps.weight"]
    assert t.tensor_type.name == "F16"
    up = model.model.layers[0].mlp.experts.gate_up_proj.detach()[:, 768:]  # [E, I, H]: up rows follow gate rows
    np.testing.assert_array_equal(_decoded(t), up.half().float().numpy())
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    stored = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in stored.named_parameters():
            if p.dim() >= 2 and ".mlp.gate." not in name:  # the file's matrices are f16; norms, routers f32
                p.copy_(p.half().float())
    torch.testing.assert_close(_logits(theirs), _logits(stored), rtol=1e-5, atol=1e-5)


def test_dense_qwen3_with_qk_norms(tokenizer, tmp_path):
    model = _quantize(_model("qwen3", **QWEN3), tokenizer, method="rtn")
    path = _save(model, tokenizer, tmp_path / "q", "q4_0")
    tensors = _tensors(path)
    assert _fields(path)["general.architecture"] == "qwen3"
    assert {"blk.1.attn_q_norm.weight", "blk.1.attn_k_norm.weight", "blk.1.ffn_down.weight"} <= set(tensors)
    _names_are_the_archs(path)
    q = model.get_submodule("model.layers.1.self_attn.q_proj")
    np.testing.assert_array_equal(_decoded(tensors["blk.1.attn_q.weight"]), q.dequantize().numpy())  # no permutation
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    torch.testing.assert_close(_logits(theirs), _logits(_as_file_stores(model)), rtol=1e-5, atol=1e-5)


# ---- gpt-oss: transformers 5.24's GGUF loader cannot read a gpt-oss file (its config reader fails on
# gpt-oss.rope.scaling.factor, and it expects ffn_*_projs tensors no llama.cpp file has), so this reader, written
# from llama.cpp's converter layout and independent of signround.model.experts, rebuilds transformers' model.


def _gpt_oss_from_gguf(path, config) -> torch.nn.Module:
    t = {n: torch.from_numpy(_decoded(x)) for n, x in _tensors(path).items()}
    state = {"model.embed_tokens.weight": t["token_embd.weight"], "model.norm.weight": t["output_norm.weight"],
             "lm_head.weight": t["output.weight"]}  # fmt: skip
    for i in range(config.num_hidden_layers):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = t[b + "attn_norm.weight"]
        state[p + "post_attention_layernorm.weight"] = t[b + "post_attention_norm.weight"]
        for gg, hf in {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj"}.items():
            state[f"{p}self_attn.{hf}.weight"] = t[f"{b}{gg}.weight"]
            state[f"{p}self_attn.{hf}.bias"] = t[f"{b}{gg}.bias"]
        state[p + "self_attn.sinks"] = t[b + "attn_sinks.weight"]
        state[p + "mlp.router.weight"] = t[b + "ffn_gate_inp.weight"]
        state[p + "mlp.router.bias"] = t[b + "ffn_gate_inp.bias"]
        gate, up = t[b + "ffn_gate_exps.weight"], t[b + "ffn_up_exps.weight"]  # [E, I, H]
        gate_up = torch.empty(gate.shape[0], gate.shape[2], 2 * gate.shape[1])  # [E, H, 2I], gate at even columns
        gate_up[..., 0::2], gate_up[..., 1::2] = gate.transpose(1, 2), up.transpose(1, 2)
        bias = torch.empty(gate.shape[0], 2 * gate.shape[1])
        bias[:, 0::2], bias[:, 1::2] = t[b + "ffn_gate_exps.bias"], t[b + "ffn_up_exps.bias"]
        state[p + "mlp.experts.gate_up_proj"], state[p + "mlp.experts.gate_up_proj_bias"] = gate_up, bias
        state[p + "mlp.experts.down_proj"] = t[b + "ffn_down_exps.weight"].transpose(1, 2).contiguous()  # [E, I, H]
        state[p + "mlp.experts.down_proj_bias"] = t[b + "ffn_down_exps.bias"]
    rebuilt = AutoModelForCausalLM.from_config(config).eval()
    result = rebuilt.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return rebuilt


def test_gpt_oss_layout_and_a_rebuilt_model_from_the_file(tokenizer, tmp_path):
    model = _quantize(_model("gpt_oss", **GPT_OSS), tokenizer)  # SignRound: the file holds the tuned codes
    path = _save(model, tokenizer, tmp_path / "g", "q4_0")
    tensors = _tensors(path)
    meta = _fields(path)
    assert meta["general.architecture"] == "gpt-oss"
    expected = {"expert_count": E, "expert_used_count": 2, "expert_feed_forward_length": 96,
                "attention.sliding_window": 128, "rope.scaling.type": "yarn", "rope.scaling.factor": 32.0,
                "rope.scaling.original_context_length": 4096, "rope.freq_base": 150000.0}  # fmt: skip
    assert {k: meta[f"gpt-oss.{k}"] for k in expected} == expected
    for gg, proj in EXPERT_TENSORS.items():
        w, bias = tensors[f"blk.0.{gg}.weight"], tensors[f"blk.0.{gg}.bias"]
        assert w.tensor_type.name == "Q4_0" and bias.tensor_type.name == "F32"
        assert [int(d) for d in w.shape] == ([H, 96, E] if proj != "down_proj" else [96, H, E])
        np.testing.assert_array_equal(_decoded(w), _experts_weight(model, 0, proj))
        biases = [model.get_submodule(f"model.layers.0.mlp.experts.{e}.{proj}").bias for e in range(E)]
        np.testing.assert_array_equal(_decoded(bias), torch.stack(biases).detach().numpy())
    assert {"blk.1.attn_sinks.weight", "blk.1.ffn_gate_inp.bias", "blk.1.attn_q.bias"} <= set(tensors)
    _names_are_the_archs(path)
    rebuilt = _gpt_oss_from_gguf(path, AutoConfig.for_model("gpt_oss", **COMMON, **GPT_OSS))
    torch.testing.assert_close(_logits(rebuilt), _logits(_as_file_stores(model)), rtol=1e-5, atol=1e-5)


def test_cli_gguf_run_equals_export_of_the_streamed_checkpoint(tokenizer, tmp_path):
    """`signround quantize --format gguf:q4_0` on a Qwen3-MoE folder (the command of issue 26) writes the same
    tensors as `quantize --low-memory` (per-expert native checkpoint) followed by `signround export`."""
    _model("qwen3_moe", **QWEN3_MOE).save_pretrained(tmp_path / "float")
    tokenizer.save_pretrained(tmp_path / "float")
    (tmp_path / "calib.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus(20, seed=1)))
    argv = ["quantize", "--model", str(tmp_path / "float"), "--bits", "4", "--group-size", "32", "--sym",
            "--method", "rtn", "--dataset", str(tmp_path / "calib.jsonl"), "--quiet"]  # fmt: skip
    assert main([*argv, "--format", "gguf:q4_0", "--output", str(tmp_path / "direct")]) == 0
    assert main([*argv, "--low-memory", "--output", str(tmp_path / "native")]) == 0
    export = ["export", "--model", str(tmp_path / "native"), "--format", "gguf:q4_0", "--output", str(tmp_path / "g")]
    assert main([*export, "--quiet"]) == 0
    direct, exported = _tensors(tmp_path / "direct" / "model-q4_0.gguf"), _tensors(tmp_path / "g" / "model-q4_0.gguf")
    assert direct.keys() == exported.keys() and "blk.1.ffn_down_exps.weight" in direct
    assert all(np.array_equal(direct[k].data, exported[k].data) for k in direct)


def test_float_gpt_oss_with_fused_experts_exports_f16(tokenizer, tmp_path):
    """The fused gpt-oss layout (input-major, gate and up interleaved) is split into llama.cpp's tensors too."""
    model = _model("gpt_oss", **GPT_OSS)
    path = write_gguf(model, tokenizer, tmp_path, "f16")
    assert _tensors(path)["blk.0.ffn_gate_exps.weight"].tensor_type.name == "F16"
    stored = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in stored.named_parameters():
            if p.dim() >= 2 and ".mlp.router." not in name and not name.endswith("_bias"):  # the rest is f32
                p.copy_(p.half().float())
    rebuilt = _gpt_oss_from_gguf(path, AutoConfig.for_model("gpt_oss", **COMMON, **GPT_OSS))
    torch.testing.assert_close(_logits(rebuilt), _logits(stored), rtol=1e-5, atol=1e-5)


# ---- Mixtral (llama.cpp's `llama` with expert_count) and OLMoE (`olmoe`). transformers 5.24's GGUF loader reads
# neither: it has no `olmoe` config mapping, and it builds a dense LlamaForCausalLM from a `llama` file (no
# expert_count in its mapping, no ffn_*_exps processor for llama). So this reader, written from llama.cpp's
# tensor layout and independent of signround.model.experts, rebuilds transformers' model; the LLaMA q/k row
# permutation is undone by transformers' own LlamaTensorProcessor (its inverse of llama.cpp's converter).

FAMILIES = {"mixtral": MIXTRAL, "olmoe": OLMOE}
GGUF_ARCH = {"mixtral": "llama", "olmoe": "olmoe"}


def _config(family: str, **fields):
    return AutoConfig.for_model(family, **COMMON, **{**FAMILIES[family], **fields})


def _moe_from_gguf(path, config) -> torch.nn.Module:
    """transformers' Mixtral or OLMoE of ``config`` with every weight taken from the file."""
    t = {n: _decoded(x) for n, x in _tensors(path).items()}
    unpermute = LlamaTensorProcessor({"num_attention_heads": config.num_attention_heads,
                                      "num_key_value_heads": config.num_key_value_heads})  # fmt: skip

    def rows(name: str) -> torch.Tensor:  # Mixtral's q/k back to HF's rotary order; OLMoE's (NeoX) kept
        w = t[name]
        if config.model_type == "mixtral" and (".attn_q." in name or ".attn_k." in name):
            w = unpermute.process(w, name).weights
        return torch.from_numpy(np.ascontiguousarray(w))

    state = {"model.embed_tokens.weight": rows("token_embd.weight"), "model.norm.weight": rows("output_norm.weight"),
             "lm_head.weight": rows("output.weight")}  # fmt: skip
    for i in range(config.num_hidden_layers):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = rows(b + "attn_norm.weight")
        state[p + "post_attention_layernorm.weight"] = rows(b + "ffn_norm.weight")
        for gg, hf in {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj"}.items():
            state[f"{p}self_attn.{hf}.weight"] = rows(f"{b}{gg}.weight")
        if config.model_type == "olmoe":
            state[p + "self_attn.q_norm.weight"] = rows(b + "attn_q_norm.weight")
            state[p + "self_attn.k_norm.weight"] = rows(b + "attn_k_norm.weight")
        state[p + "mlp.gate.weight"] = rows(b + "ffn_gate_inp.weight")
        gate, up = rows(b + "ffn_gate_exps.weight"), rows(b + "ffn_up_exps.weight")  # [E, I, H]
        state[p + "mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)  # [E, 2I, H]: gate rows, then up rows
        state[p + "mlp.experts.down_proj"] = rows(b + "ffn_down_exps.weight")  # [E, H, I]
    rebuilt = AutoModelForCausalLM.from_config(config).eval()
    rebuilt.tie_weights()
    result = rebuilt.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return rebuilt


@pytest.fixture(scope="module", params=list(FAMILIES))
def mixture(request, tokenizer, tmp_path_factory):
    """(family, the model quantized W4G32-sym by RTN, its gguf:q4_0 file)."""
    family = request.param
    model = _quantize(_model(family, **FAMILIES[family]), tokenizer, method="rtn")
    return family, model, _save(model, tokenizer, tmp_path_factory.mktemp(family), "q4_0")


def test_mixtral_and_olmoe_experts_are_fused_tensors_of_the_quantized_codes(mixture):
    family, model, path = mixture
    tensors = _tensors(path)
    i_width = FAMILIES[family]["intermediate_size"]
    qk_norms = ["attn_q_norm", "attn_k_norm"] if family == "olmoe" else []
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", *qk_norms, "ffn_gate_inp",
                 *EXPERT_TENSORS, "ffn_norm"]  # fmt: skip
    want = {"token_embd.weight", "output_norm.weight", "output.weight"}
    want |= {f"blk.{i}.{n}.weight" for i in range(2) for n in per_layer}
    assert set(tensors) == want  # no per-expert tensors, no dense ffn_gate/up/down
    _names_are_the_archs(path)
    heads, kv_heads = 4, FAMILIES[family]["num_key_value_heads"]
    unpermute = LlamaTensorProcessor({"num_attention_heads": heads, "num_key_value_heads": kv_heads})
    for i in range(2):
        _experts_and_router_match(tensors, model, i, i_width)
        for gg, hf in {"attn_q": "q_proj", "attn_k": "k_proj"}.items():
            name = f"blk.{i}.{gg}.weight"
            ours = model.get_submodule(f"model.layers.{i}.self_attn.{hf}").dequantize().numpy()
            if family == "mixtral":  # LLaMA rotary: rows permuted, and transformers' inverse gives them back
                assert not np.array_equal(_decoded(tensors[name]), ours)
                np.testing.assert_array_equal(unpermute.process(_decoded(tensors[name]), name).weights, ours)
            else:  # NeoX rotary: HF's order
                np.testing.assert_array_equal(_decoded(tensors[name]), ours)
        for norm in qk_norms:  # OLMoE: one norm over the whole q (k) projection, hidden_size wide
            assert tensors[f"blk.{i}.{norm}.weight"].tensor_type.name == "F32"
            assert [int(d) for d in tensors[f"blk.{i}.{norm}.weight"].shape] == [H]
    meta = _fields(path)
    arch = GGUF_ARCH[family]
    assert meta["general.architecture"] == arch
    assert meta["general.file_type"] == 2  # MOSTLY_Q4_0
    theta = float(model.config.rope_parameters["rope_theta"])  # Mixtral's default 1e6, OLMoE's 1e4
    expected = {"expert_count": E, "expert_used_count": 2, "feed_forward_length": i_width, "block_count": 2,
                "embedding_length": H, "attention.head_count": heads, "attention.head_count_kv": kv_heads,
                "rope.dimension_count": 16, "rope.freq_base": theta}  # fmt: skip
    assert {k: meta[f"{arch}.{k}"] for k in expected} == expected


def test_mixtral_and_olmoe_rebuilt_from_the_file_give_the_same_logits(mixture):
    family, model, path = mixture
    rebuilt = _moe_from_gguf(path, _config(family))
    # against what the file stores (embeddings, head f16): only the fused vs per-expert summation order differs
    torch.testing.assert_close(_logits(rebuilt), _logits(_as_file_stores(model)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mixtral_and_olmoe_q4_k_m(family, tokenizer, tmp_path):
    """Q4_K_M as for Qwen3-MoE: every expert's down_proj (256 wide) a K-quant, Q6_K in layer 1; rows of 64
    weights take the fallbacks. Decoded bit for bit, and the rebuilt model gives signround's logits."""
    fields = {"export": ExportConfig(formats="gguf:q4_k_m"), "method": "rtn"}
    scheme = signround.QuantScheme(dtype="q4_k")
    model = _quantize(_model(family, **FAMILIES[family]), tokenizer, scheme, **fields)
    path = _save(model, tokenizer, tmp_path, "q4_k_m")
    tensors = _tensors(path)
    types = {n: t.tensor_type.name for n, t in tensors.items() if "exps" in n or "attn_v" in n}
    assert types == {
        "blk.0.attn_v.weight": "Q5_0", "blk.1.attn_v.weight": "Q8_0",
        "blk.0.ffn_gate_exps.weight": "Q5_0", "blk.0.ffn_up_exps.weight": "Q5_0", "blk.0.ffn_down_exps.weight": "Q4_K",
        "blk.1.ffn_gate_exps.weight": "Q5_0", "blk.1.ffn_up_exps.weight": "Q5_0", "blk.1.ffn_down_exps.weight": "Q6_K",
    }  # fmt: skip
    for i in range(2):
        for gg, proj in EXPERT_TENSORS.items():
            np.testing.assert_array_equal(_decoded(tensors[f"blk.{i}.{gg}.weight"]), _experts_weight(model, i, proj))
    rebuilt = _moe_from_gguf(path, _config(family))
    torch.testing.assert_close(_logits(rebuilt), _logits(_as_file_stores(model)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_float_mixtral_and_olmoe_with_fused_experts_export_f16(family, tokenizer, tmp_path):
    """A float model (transformers' fused experts) as gguf:f16. OLMoE tied to its embeddings still gets an
    output.weight: llama.cpp's olmoe graph requires one (its llama graph falls back to token_embd)."""
    tied = family == "olmoe"
    model = _model(family, **FAMILIES[family], tie_word_embeddings=tied)
    path = write_gguf(model, tokenizer, tmp_path, "f16")
    tensors = _tensors(path)
    assert tensors["blk.0.ffn_down_exps.weight"].tensor_type.name == "F16"
    assert "output.weight" in tensors
    if tied:
        np.testing.assert_array_equal(_decoded(tensors["output.weight"]), _decoded(tensors["token_embd.weight"]))
    stored = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in stored.named_parameters():
            if p.dim() >= 2 and ".mlp.gate." not in name:  # the file's matrices are f16; norms, routers f32
                p.copy_(p.half().float())
    rebuilt = _moe_from_gguf(path, _config(family, tie_word_embeddings=tied))
    torch.testing.assert_close(_logits(rebuilt), _logits(stored), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("family", "fields", "message"),
    [
        ("olmoe", {"norm_topk_prob": True}, "llama.cpp's olmoe graph never renormalizes the top-k router weights; "
                                            "this model has norm_topk_prob=True"),
        ("olmoe", {"num_key_value_heads": 2}, "llama.cpp's olmoe graph norms keys over hidden_size and needs as many "
                                              "key/value heads as heads, this model has 2 of 4"),
        ("olmoe", {"clip_qkv": 8.0}, "llama.cpp's olmoe graph does not clip q/k/v, this model has clip_qkv=8.0"),
        ("mixtral", {"sliding_window": 16}, "llama.cpp's llama graph has no sliding window, this model has "
                                            "sliding_window=16"),
    ],
)  # fmt: skip
def test_configs_llama_cpp_runs_differently_are_refused_before_tuning(family, fields, message, tokenizer):
    model = _model(family, **{**FAMILIES[family], **fields})
    cfg = make_config(scheme=W4G32_SYM, export=ExportConfig(formats="gguf:q4_0"), method="rtn")
    with pytest.raises(SignRoundError) as err:
        signround.quantize(model, tokenizer, cfg, corpus(20, seed=1), QUIET)
    name = {"mixtral": "mixtral (llama)", "olmoe": "olmoe (olmoe)"}[family]
    assert str(err.value) == f"gguf export of {name}: {message}; use --format native instead"
    assert not [m for m in model.modules() if isinstance(m, QuantLinear)]
