"""compressed-tensors exports of a mixture of experts at several schemes, checked against the rules by which vLLM
picks the scheme of a ``FusedMoE`` (mirrored below by :func:`vllm_fused_moe_weights`), on tiny Qwen3-MoE and
Mixtral models whose widths are multiples of the group size.

- Config: dense layers are targeted by name; every MoE layer by one ``re:`` target on its serving prefix
  (``model.layers.{i}.mlp.experts``, Mixtral's ``model.layers.{i}.block_sparse_moe.experts``), in the group of its
  experts' scheme; a MoE layer kept float is one ``re:`` entry of ``ignore``. Each FusedMoE prefix then resolves to
  its experts' width, Mixtral's included (vLLM looks the layer up by ``gate_proj`` / ``up_proj`` / ``down_proj``
  names that Mixtral's ``w1`` / ``w3`` / ``w2`` checkpoint names never equal).
- Readers: signround's own reader (``load_model``) rebuilds the same logits; transformers + compressed-tensors
  loads the export with signround's logits when all experts share one scheme (transformers 5.24 decompresses every
  expert with one config group; exports with several expert schemes warn about it).
- A MoE layer whose experts differ in scheme is refused before tuning, in one line naming ``--format native``.
"""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, CompressedTensorsConfig

import signround
from signround.config import ExportConfig, LayerRule
from signround.errors import SignRoundError
from signround.model.load import load_model
from signround.pack.packed import QuantLinear
from tests.conftest import corpus, make_config
from tests.integration.test_moe_gptq import LAYERS, QUIET, E, G, H, I, X

W4 = signround.QuantScheme(bits=4, group_size=G, sym=True)
W8 = signround.QuantScheme(bits=8, group_size=G, sym=True)
# vLLM's ``packed_modules_mapping`` of Qwen3MoeForCausalLM / MixtralForCausalLM (its fused linears' shards).
PACKED = {
    "qwen3_moe": {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]},
    "mixtral": {"qkv_proj": ["q_proj", "k_proj", "v_proj"]},
}
MOE_MODULE = {"qwen3_moe": "mlp", "mixtral": "block_sparse_moe"}  # where vLLM's model puts each layer's FusedMoE


def build(family: str) -> torch.nn.Module:
    """A seeded tiny ``family`` model: hidden 64, experts 4 x 64 wide, 2 layers (every width divides by G)."""
    common = dict(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=320, num_experts_per_tok=2)  # fmt: skip
    if family == "qwen3_moe":
        kw = dict(intermediate_size=128, moe_intermediate_size=I, num_experts=E, head_dim=16)
    else:
        kw = dict(intermediate_size=I, num_local_experts=E)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **common, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name or ".gate." in name:
                p.copy_(torch.randn_like(p) * 0.05)
    return model


def quantized(family: str, tokenizer, *rules: LayerRule) -> torch.nn.Module:
    """``family`` at W4 (groups of G) with ``rules`` on top, round-to-nearest."""
    model = build(family)
    signround.quantize(model, tokenizer, make_config(scheme=W4, method="rtn", layer_rules=rules), None, QUIET)
    return model


def _matches(value: str, target: str, contains: bool = False) -> bool:
    """One target against a name (or class name): ``re:`` patterns by ``re.match``, else equality (or, for class
    names, case-insensitive containment)."""
    if target.startswith("re:"):
        return re.match(target[3:], value) is not None
    return target.lower() in value.lower() if contains else target == value


def vllm_layer_weights(qc: dict, name: str, cls: str, packed: dict[str, list[str]]) -> dict | None:
    """The ``weights`` args vLLM gives the layer ``name`` of class ``cls`` (None: unquantized), as vLLM's
    compressed-tensors integration resolves it (written from its rules, not copied):

    - ``CompressedTensorsConfig._quantization_scheme_map_from_config``: ``{target: group}`` over the config groups
      in order;
    - ``get_scheme_dict``: first ``utils.should_ignore_layer(name, ignore, packed_modules_mapping)`` (a fused name,
      e.g. ``qkv_proj``, is ignored when its shards are; entries match exactly or by ``re:`` ``re.match``), then
      ``utils.find_matched_target``: the first target equal to ``name`` or whose ``re:`` pattern matches it
      (``_find_first_match``), else the first one contained in the class name, case-insensitively, else the fused
      layer whose every shard matches a target (``_match_fused_layer``, the first shard's target); no target at all
      fails (vLLM raises).
    """
    ignore = qc.get("ignore", [])
    proj = name.rsplit(".", 1)[-1]
    shards = [name[: -len(proj)] + s for s in packed[proj]] if proj in packed else [name]
    ignored = [any(_matches(s, t) for t in ignore) for s in shards]
    if any(ignored):
        return None  # vLLM raises (older) or treats a partly ignored fused layer as ignored (newer)
    scheme_map: dict[str, dict] = {}
    for group in qc["config_groups"].values():
        for target in group["targets"]:
            scheme_map[target] = group["weights"]
    hit = next((t for t in scheme_map if _matches(name, t)), None)
    hit = hit or next((t for t in scheme_map if _matches(cls, t, contains=True)), None)
    fused = next((key for key in packed if name.endswith(key)), None)
    if hit is None and fused is not None:
        per_shard = [next((t for t in scheme_map if _matches(name.replace(fused, s), t)), None) for s in packed[fused]]
        hit = per_shard[0] if all(per_shard) else None
    assert hit is not None, f"vLLM finds no config group for {name}"
    return scheme_map[hit]


def vllm_fused_moe_weights(qc: dict, prefix: str, packed: dict[str, list[str]]) -> dict | None:
    """The ``weights`` args of the ``FusedMoE`` at ``prefix`` (None: ``UnquantizedFusedMoEMethod``), as vLLM's
    ``CompressedTensorsConfig.get_quant_method`` -> ``CompressedTensorsMoEMethod.get_moe_method(config, layer,
    layer_name=prefix)`` resolves it: ``_add_fused_moe_to_target_scheme_map`` lets a ``Linear`` target stand for the
    class ``FusedMoE``; the layer is then looked up (:func:`vllm_layer_weights`, class ``FusedMoE``) under expert
    0's names ``prefix.0.gate_proj``, ``prefix.0.up_proj`` and ``prefix.0.down_proj`` (those words for every
    family, Mixtral's ``w1`` / ``w3`` / ``w2`` checkpoints included), which must all agree (vLLM raises
    "All MoE projections need to have same quantization scheme")."""
    groups = qc["config_groups"].values()
    if any("Linear" in g["targets"] for g in groups) and not any("FusedMoE" in g["targets"] for g in groups):
        linear = next(g for g in groups if "Linear" in g["targets"])
        qc = {**qc, "config_groups": {**qc["config_groups"], "_fused_moe": {**linear, "targets": ["FusedMoE"]}}}
    found = [
        vllm_layer_weights(qc, f"{prefix}.0.{p}", "FusedMoE", packed) for p in ("gate_proj", "up_proj", "down_proj")
    ]
    assert all(f == found[0] for f in found), f"vLLM refuses {prefix}: its projections disagree"
    return found[0]


def bits(weights: dict | None) -> int | None:
    return None if weights is None else weights["num_bits"]


def export(model, tokenizer, folder) -> dict:
    signround.save(model, tokenizer, folder, "compressed-tensors")
    return json.loads((folder / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_experts_at_8_bits_attention_at_4_resolve_per_fused_moe_and_load_everywhere(family, tokenizer, tmp_path):
    model = quantized(family, tokenizer, LayerRule(r"\.experts\.", W8))
    qc = export(model, tokenizer, tmp_path / "ct")
    packed, moe = PACKED[family], MOE_MODULE[family]
    for i in range(LAYERS):
        prefix = f"model.layers.{i}.{moe}.experts"
        assert bits(vllm_fused_moe_weights(qc, prefix, packed)) == 8
        attn = f"model.layers.{i}.self_attn"
        assert bits(vllm_layer_weights(qc, f"{attn}.qkv_proj", "QKVParallelLinear", packed)) == 4
        assert bits(vllm_layer_weights(qc, f"{attn}.o_proj", "RowParallelLinear", packed)) == 4
        assert vllm_layer_weights(qc, f"model.layers.{i}.{moe}.gate", "ReplicatedLinear", packed) is None
    # one target per MoE layer, not one per expert
    targets = [t for g in qc["config_groups"].values() for t in g["targets"]]
    assert sum(".experts" in t for t in targets) == LAYERS
    with torch.no_grad():
        expected = model(X).logits
        assert torch.equal(load_model(str(tmp_path / "ct"))[0](X).logits, expected)  # signround's reader
        for kw in ({}, {"quantization_config": CompressedTensorsConfig(dequantize=True)}):
            theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", **kw).eval()
            torch.testing.assert_close(theirs(X).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_moe_layers_at_different_widths_or_float_resolve_each_to_its_own(family, tokenizer, tmp_path, caplog):
    model = quantized(family, tokenizer, LayerRule(r"^model\.layers\.0\.mlp\.experts\.", W8))
    with caplog.at_level(logging.WARNING, logger="signround"):
        qc = export(model, tokenizer, tmp_path / "mixed")
    assert "transformers 5.24 decompresses every expert with one config group" in caplog.text
    packed, moe = PACKED[family], MOE_MODULE[family]
    widths = [bits(vllm_fused_moe_weights(qc, f"model.layers.{i}.{moe}.experts", packed)) for i in range(LAYERS)]
    assert widths == [8, 4]
    with torch.no_grad():
        assert torch.equal(load_model(str(tmp_path / "mixed"))[0](X).logits, model(X).logits)

    model = quantized(family, tokenizer, LayerRule(r"^model\.layers\.1\.mlp\.experts\.", None))  # layer 1 float
    assert not any(isinstance(m, QuantLinear) for n, m in model.named_modules() if ".layers.1.mlp.experts." in n)
    qc = export(model, tokenizer, tmp_path / "float")
    assert bits(vllm_fused_moe_weights(qc, f"model.layers.0.{moe}.experts", packed)) == 4
    assert vllm_fused_moe_weights(qc, f"model.layers.1.{moe}.experts", packed) is None  # UnquantizedFusedMoEMethod
    # (transformers 5.24 cannot load float experts from a compressed-tensors checkpoint, whatever its config: its
    # expert decompression keeps only ``weight_packed`` tensors, so signround's reader alone is checked here.)
    with torch.no_grad():
        assert torch.equal(load_model(str(tmp_path / "float"))[0](X).logits, model(X).logits)


def test_the_experts_target_matches_its_layer_only():
    from signround.export.ct import experts_target

    target = experts_target("model.layers.1.block_sparse_moe.experts")
    hits = ["model.layers.1.block_sparse_moe.experts", "model.layers.1.block_sparse_moe.experts.0.gate_proj",
            "model.layers.1.block_sparse_moe.experts.7.w2"]  # fmt: skip
    misses = ["model.layers.10.block_sparse_moe.experts.0.w1", "model.layers.1.block_sparse_moe.gate",
              "model.layers.1.block_sparse_moe.experts_x.0.w1",
              "model.layers.1.mlp.shared_experts.gate_proj"]  # fmt: skip
    assert all(_matches(n, target) for n in hits) and not any(_matches(n, target) for n in misses)


def test_dense_mixed_exports_keep_their_per_layer_names(tokenizer, tmp_path):
    from tests.conftest import make_model

    model = make_model("llama")
    rule = LayerRule(r"\.mlp\.", W8)
    signround.quantize(model, tokenizer, make_config(scheme=W4, method="rtn", layer_rules=(rule,)), None, QUIET)
    qc = export(model, tokenizer, tmp_path / "dense")
    targets = [t for g in qc["config_groups"].values() for t in g["targets"]]
    assert not [t for t in targets if t.startswith("re:")]
    assert "model.layers.0.mlp.gate_proj" in targets and "model.layers.1.self_attn.q_proj" in targets


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_experts_of_one_layer_at_different_schemes_are_refused_before_tuning(family, tokenizer):
    rule = LayerRule(r"^model\.layers\.1\.mlp\.experts\.2\.", W8)
    cfg = make_config(scheme=W4, iters=2, nsamples=4, seqlen=32, layer_rules=(rule,),
                      export=ExportConfig(formats="compressed-tensors"))  # fmt: skip
    model = build(family)
    with pytest.raises(SignRoundError, match=r"model\.layers\.1\.mlp\.experts mixes W4G16sym, W8G16sym") as err:
        signround.quantize(model, tokenizer, cfg, corpus(20, seed=1), QUIET)
    assert "\n" not in str(err.value) and "--format native" in str(err.value)
    assert str(err.value).startswith("compressed-tensors: ")
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # nothing was tuned
