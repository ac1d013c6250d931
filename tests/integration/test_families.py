"""The architecture matrix: every supported family, as a tiny random-init model built from its transformers config
(nothing downloaded), quantized through the Python API, with every decoder weight accounted for, the native
checkpoint reloading with the same logits, and a third-party reader loading an export with the same logits:
transformers + compressed-tensors for every family whose experts a reader can load, and the ``gguf`` package +
transformers ``gguf_file=`` for LLaMA. gpt-oss's compressed-tensors export is refused before tuning (no reader
loads its experts one linear per expert; see signround.export.moe_names)."""

from __future__ import annotations

import json

import pytest
import torch
from gguf import GGUFReader
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, CompressedTensorsConfig

import signround
from signround.config import ExportConfig
from signround.errors import SignRoundError
from signround.model.accounting import Fate
from signround.model.blocks import find_blocks
from signround.model.experts import unfuse_experts
from signround.model.load import load_model
from signround.pack.packed import QuantLinear
from tests.conftest import VOCAB, corpus, make_config, make_model
from tests.unit.test_experts import build

QUIET = signround.RunOptions(progress=False)
OSS_REFUSED = r"cannot store this gpt_oss mixture of experts: .*use --format gpt-oss-mxfp4 .*, gguf or native$"
IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))

# Dense families beyond conftest's LLaMA / Qwen2 / OPT: widths 64 (hidden) and 96 (MLP), so group 16 and 32
# divide every layer; Phi-3 fuses q/k/v (out 64 + 2 * 2 * 16 = 128) and gate/up (out 192) into single linears.
DENSE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
             pad_token_id=1)  # fmt: skip
CONFIGS = {
    "qwen3": dict(head_dim=16),
    "mistral": dict(sliding_window=8),  # shorter than the calibration and test sequences: the window is used
    "gemma3_text": dict(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(),
}
MOE = ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3", "olmoe"]
FAMILIES = ["llama", "qwen2", "opt", *CONFIGS, *MOE]


def family_model(family: str) -> nn.Module:
    """A seeded tiny model of ``family`` (float32, eval mode)."""
    if family in ("llama", "qwen2", "opt"):
        return make_model(family)
    if family in MOE:
        return build(family)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **DENSE, **CONFIGS[family])).eval()


def scheme(family: str) -> signround.QuantScheme:
    """W4 groups of 16 (the MoE experts' width is 48); symmetric where a reader needs it: LLaMA's gguf:q4_0, and
    the experts of a mixture (transformers cannot load asymmetric experts, see signround.export.ct.check_moe)."""
    if family == "llama":
        return signround.QuantScheme(bits=4, group_size=32, sym=True)
    return signround.QuantScheme(bits=4, group_size=16, sym=family in MOE)


def run_config(family: str, formats: str = "native"):
    """Two SignRound steps on 2 x 32 tokens, written in ``formats`` (checked before tuning)."""
    return make_config(scheme=scheme(family), iters=2, nsamples=2, seqlen=32, batch_size=2,
                       export=ExportConfig(formats=formats))  # fmt: skip


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def decoder_tensors(family: str) -> tuple[dict[str, int], set[str]]:
    """Of a fresh float model of ``family`` (experts unfused, as a run does): ``{full name: dim}`` of every
    parameter of its decoder blocks, and the names of the blocks' linear weights."""
    model = family_model(family)
    unfuse_experts(model)
    prefix, blocks = find_blocks(model)
    params = {f"{prefix}.{i}.{n}": p.dim() for i, b in enumerate(blocks) for n, p in b.named_parameters()}
    linears = {f"{prefix}.{i}.{n}.weight" for i, b in enumerate(blocks) for n, m in b.named_modules()
               if isinstance(m, nn.Linear)}  # fmt: skip
    return params, linears


@pytest.fixture(scope="module")
def quantized(tokenizer):
    """``{family: (result, logits of the quantized model)}``, each family quantized once for this module."""
    out = {}
    for family in FAMILIES:
        model = family_model(family)
        result = signround.quantize_run(model, tokenizer, run_config(family), corpus(20, seed=1), QUIET)
        out[family] = (result, logits(model))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_every_decoder_weight_is_accounted_for(family, quantized):
    result, _ = quantized[family]
    fates = {f.name: f for f in result.plan.weights.fates}
    params, linears = decoder_tensors(family)
    assert set(fates) == set(params)  # every parameter of every block, nothing else
    assert not result.plan.weights.of(Fate.UNSUPPORTED)
    quantized_names = {n for n, f in fates.items() if f.fate is Fate.QUANTIZED}
    assert quantized_names == linears  # every linear of every block, experts included
    modules = dict(result.model.named_modules())
    assert all(isinstance(modules[n.rpartition(".")[0]], QuantLinear) for n in quantized_names)
    routers = set()
    for name, f in fates.items():
        if f.fate is not Fate.QUANTIZED:  # only norms and biases (1-D) and the routers stay float
            assert f.fate is Fate.FLOAT_BY_DEFAULT and f.why in ("norm/bias", "router"), name
            assert f.why == "router" or params[name] <= 1, name
            if f.why == "router":
                routers.add(name.rpartition(".")[0].split(".", 3)[3])  # the router within its block
    assert routers == ({"mlp.router"} if family == "gpt_oss" else {"mlp.gate"} if family in MOE else set())


@pytest.mark.parametrize("family", FAMILIES)
def test_native_checkpoint_reloads_with_the_same_logits(family, quantized, tokenizer, tmp_path):
    result, expected = quantized[family]
    assert torch.equal(logits(result.model), expected)
    signround.save(result.model, tokenizer, tmp_path / "q")
    reloaded, _ = signround.load_model(str(tmp_path / "q"))
    assert torch.equal(logits(reloaded), expected)
    assert not torch.equal(logits(family_model(family)), expected)  # the quantization changed the model


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gpt_oss"])
def test_compressed_tensors_export_loads_in_transformers(family, quantized, tokenizer, tmp_path):
    """transformers + compressed-tensors (its own decompression, per-expert tensors fused by its conversion
    mapping) gives signround's logits: symmetric models (LLaMA, the mixtures) the default way, asymmetric ones
    dequantized at load."""
    result, expected = quantized[family]
    signround.save(result.model, tokenizer, tmp_path / "ct", "compressed-tensors")
    # asymmetric layers load only dequantized in transformers 5.24 + compressed-tensors 0.20 (docs/formats.md)
    kw = {} if scheme(family).sym else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", **kw).eval()
    assert type(theirs) is type(family_model(family))
    torch.testing.assert_close(logits(theirs), expected, rtol=1e-5, atol=1e-5)


def test_gguf_export_of_llama_loads_in_transformers(quantized, tokenizer, tmp_path):
    """gguf:q4_0 read by the gguf package and transformers' GGUF loader: the logits of signround's model with its
    embedding (tied to the output head) rounded to float16, as GGUF stores it."""
    result, _ = quantized["llama"]
    signround.save(result.model, tokenizer, tmp_path / "g", "gguf:q4_0")
    path = tmp_path / "g" / "model-q4_0.gguf"
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["token_embd.weight"] == "F16"
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ours = result.model
    embed = ours.get_input_embeddings().weight
    original = embed.detach().clone()
    try:
        with torch.no_grad():
            embed.copy_(original.half().float())
        expected = logits(ours)
    finally:
        with torch.no_grad():
            embed.copy_(original)
    torch.testing.assert_close(logits(theirs), expected, rtol=1e-5, atol=1e-5)


def test_mixtral_export_uses_the_original_checkpoint_names(quantized, tokenizer, tmp_path):
    """vLLM's Mixtral loader reads block_sparse_moe.experts.{e}.w1 / w3 / w2 (gate / up / down) and
    block_sparse_moe.gate; so does transformers (the load test above)."""
    result, _ = quantized["mixtral"]
    signround.save(result.model, tokenizer, tmp_path / "ct", "compressed-tensors")
    keys = set(load_file(str(tmp_path / "ct" / "model.safetensors")))
    for layer in (0, 1):
        p = f"model.layers.{layer}.block_sparse_moe."
        assert p + "gate.weight" in keys
        for e in range(4):
            assert {f"{p}experts.{e}.{w}.weight_packed" for w in ("w1", "w2", "w3")} <= keys
    assert not [k for k in keys if ".mlp." in k or (".experts." in k and "_proj." in k)]
    ignore = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["ignore"]
    assert "model.layers.0.block_sparse_moe.gate" in ignore and "lm_head" in ignore
    reloaded, _ = load_model(str(tmp_path / "ct"))  # signround's own reader maps the serving names back
    torch.testing.assert_close(logits(reloaded), logits(result.model), rtol=1e-5, atol=1e-5)


def test_gpt_oss_compressed_tensors_is_refused_before_tuning(tokenizer, quantized, tmp_path):
    cfg = run_config("gpt_oss", "compressed-tensors")
    model = family_model("gpt_oss")
    with pytest.raises(SignRoundError, match=OSS_REFUSED):
        signround.quantize_run(model, tokenizer, cfg, corpus(20, seed=1), QUIET)
    assert not [n for n in model.state_dict() if n.endswith(".qweight")]  # nothing was quantized
    result, _ = quantized["gpt_oss"]  # and saving a quantized gpt-oss in the format is refused the same way
    with pytest.raises(SignRoundError, match="no reader loads gpt-oss experts"):
        signround.save(result.model, tokenizer, tmp_path / "ct", "compressed-tensors")
    assert not (tmp_path / "ct").exists()
