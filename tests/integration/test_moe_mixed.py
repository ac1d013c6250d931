"""Mixed precision on mixtures of experts: all experts of a MoE layer are one allocation unit (one width), as the
serving engines store them fused (vLLM's FusedMoE, GGUF's ``ffn_*_exps``); the unit's sensitivity and size are
those of all its members; the budget holds; the fused-expert exporters take the result."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from signround.calib.data import sample_tokens
from signround.cli import main
from signround.config import CalibConfig, QuantConfig, QuantScheme
from signround.mixed import MixedSpec, allocate_bits
from signround.mixed.allocate import total_size
from signround.mixed.units import ExpertUnits, expert_units
from signround.model.blocks import find_blocks, resolve_schemes
from signround.model.experts import unfuse_experts
from signround.model.load import load_model
from tests.conftest import corpus
from tests.integration.test_moe_ct import PACKED, vllm_fused_moe_weights
from tests.integration.test_moe_gptq import build as build_wide
from tests.unit.test_experts import MOE_LAYERS, build

FAMILIES = ["qwen3_moe", "gpt_oss", "deepseek_v3"]  # output-major; input-major with biases; dense + shared
CFG = QuantConfig(scheme=QuantScheme(bits=4, group_size=16))


def tokens(tokenizer, n=8):
    return sample_tokens(corpus(40, seed=1), tokenizer, CalibConfig(nsamples=n, seqlen=32))


def allocate(family, tokenizer, experts=ExpertUnits.LAYER, sensitivity="block", avg_bits=3.5):
    model = build(family)
    unfuse_experts(model)
    spec = MixedSpec(avg_bits=avg_bits, sensitivity=sensitivity, nsamples=8)
    return model, allocate_bits(model, tokens(tokenizer), CFG, spec, progress=False, experts=experts)


def moe_prefixes(family):
    return [f"model.layers.{i}.mlp.experts" for i in MOE_LAYERS.get(family, [0, 1])]


@pytest.mark.parametrize("family", FAMILIES)
def test_all_experts_of_a_layer_share_one_width_and_the_budget_holds(family, tokenizer):
    model, alloc = allocate(family, tokenizer)
    assert total_size(alloc.size, alloc.choice) <= alloc.budget and alloc.avg_bits <= 3.5
    bits = alloc.layer_bits()
    assert len(set(bits.values())) > 1, "a 3.5-bit budget over 2/3/4/8 must mix widths"
    for prefix in moe_prefixes(family):
        members = [f"{prefix}.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")]
        assert sorted(members) in [sorted(g) for g in alloc.groups]  # one unit: gate, up and down of every expert
        assert len({bits[n] for n in members}) == 1
    # The table names each unit in one short row.
    rows = alloc.table().splitlines()
    assert any(re.search(r"experts\.\{4 experts\}\.gate_proj/up_proj/down_proj \(12 linears\)", r) for r in rows)
    # The rules (one per MoE layer for its experts) reproduce the allocation on the model's own layer names.
    rules = alloc.rules()
    assert sum(r"experts\.\d+" in r.pattern for r in rules) == len(moe_prefixes(family))
    prefix, blocks = find_blocks(model)
    resolved = {}
    for i, block in enumerate(blocks):
        resolved.update(
            {f"{prefix}.{i}.{n}": s.bits for n, s in resolve_schemes(f"{prefix}.{i}", block, CFG.scheme, rules).items()}
        )
    assert resolved == bits
    assert alloc.to_config()["expert_units"] == "layer"


@pytest.mark.parametrize("sensitivity", ["fisher", "block"])
def test_a_units_sensitivity_and_size_are_those_of_all_its_members(sensitivity, tokenizer):
    _, layer = allocate("qwen3_moe", tokenizer, ExpertUnits.LAYER, sensitivity)
    _, expert = allocate("qwen3_moe", tokenizer, ExpertUnits.EXPERT, sensitivity)
    for prefix in moe_prefixes("qwen3_moe"):
        (k,) = [k for k, g in enumerate(layer.groups) if g[0].startswith(prefix + ".")]
        parts = [k2 for k2, g in enumerate(expert.groups) if g[0].startswith(prefix + ".")]
        assert len(parts) == 8  # per expert: gate+up, down
        assert sorted(n for k2 in parts for n in expert.groups[k2]) == sorted(layer.groups[k])
        assert np.array_equal(layer.size[k], expert.size[parts].sum(axis=0))  # exact integer bits
        summed = expert.cost[parts].sum(axis=0)
        if sensitivity == "fisher":  # a weight-space sum: exactly additive over the members
            np.testing.assert_allclose(layer.cost[k], summed, rtol=1e-9)
        else:  # measured with every member rounded at once: the members' errors plus their small interactions
            assert (layer.cost[k] > 0.5 * summed).all() and (layer.cost[k] < 2 * summed).all()
        assert (np.diff(layer.cost[k]) < 0).all()  # more bits, less loss
    # Per expert (native only) the same budget may give a layer's experts several widths.
    assert expert.to_config()["expert_units"] == "expert" and total_size(expert.size, expert.choice) <= expert.budget


def test_units_are_structural_even_for_an_expert_the_grouping_sample_never_routes(tokenizer):
    model = build("qwen3_moe")
    unfuse_experts(model)
    block = model.model.layers[0]
    # What the input-identity grouping gives when expert 3 received no token: its gate and up apart.
    groups = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]
    for e in range(3):
        groups += [[f"mlp.experts.{e}.gate_proj", f"mlp.experts.{e}.up_proj"], [f"mlp.experts.{e}.down_proj"]]
    groups += [["mlp.experts.3.gate_proj"], ["mlp.experts.3.up_proj"], ["mlp.experts.3.down_proj"]]
    per_expert = expert_units(block, groups, ExpertUnits.EXPERT)
    assert ["mlp.experts.3.gate_proj", "mlp.experts.3.up_proj"] in per_expert and len(per_expert) == 2 + 8
    whole = expert_units(block, groups, ExpertUnits.LAYER)
    assert whole[:2] == groups[:2] and len(whole) == 3 and len(whole[2]) == 12


def mixed_cli_args(tokenizer, tmp_path, out, avg_bits: str) -> list[str]:
    """Save the wide Qwen3-MoE and a calibration file under ``tmp_path``; the ``quantize`` flags of an RTN mixed
    run at ``--avg-bits avg_bits`` over widths 4 and 8 writing to ``out``."""
    build_wide().save_pretrained(tmp_path / "float")
    tokenizer.save_pretrained(tmp_path / "float")
    (tmp_path / "calib.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus(20, seed=1)))
    return ["quantize", "--model", str(tmp_path / "float"), "--output", str(out), "--bits", "8", "--group-size",
            "16", "--sym", "--method", "rtn", "--nsamples", "4", "--seqlen", "32", "--dataset",
            str(tmp_path / "calib.jsonl"), "--avg-bits", avg_bits, "--bit-options", "4,8", "--sensitivity-nsamples",
            "4", "--quiet"]  # fmt: skip


def test_mixed_cli_run_on_a_moe_exports_to_every_fused_expert_format(tokenizer, tmp_path):
    """The default allocation passes the gptq / auto_round / compressed-tensors checks (one scheme per MoE
    layer). The GPTQ layouts are read back by signround's own reader; compressed-tensors is checked against the
    rule of vLLM's ``CompressedTensorsMoEMethod.get_moe_method`` (tests/integration/test_moe_ct.py's mirror of it:
    each layer's FusedMoE resolves to the width the allocation gave its experts)."""
    out = tmp_path / "out"
    argv = mixed_cli_args(tokenizer, tmp_path, out, "7") + ["--format", "native,auto_round,gptq,compressed-tensors"]
    assert main(argv) == 0
    mixed = json.loads((out / "native/config.json").read_text())["quantization_config"]["mixed_precision"]
    assert mixed["avg_bits"] <= 7 and mixed["expert_units"] == "layer"
    bits = mixed["layer_bits"]
    for i in range(2):
        assert len({b for n, b in bits.items() if n.startswith(f"model.layers.{i}.mlp.experts.")}) == 1
    assert len(set(bits.values())) == 2, bits
    x = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = load_model(str(out / "native"))[0](x).logits
        for fmt in ("auto_round", "gptq"):
            assert torch.equal(load_model(str(out / fmt))[0](x).logits, ref), fmt
    qc = json.loads((out / "compressed-tensors/config.json").read_text())["quantization_config"]
    for i in range(2):
        prefix = f"model.layers.{i}.mlp.experts"
        assert vllm_fused_moe_weights(qc, prefix, PACKED["qwen3_moe"])["num_bits"] == bits[f"{prefix}.0.gate_proj"]


def test_per_expert_widths_from_the_cli_in_the_native_format(tokenizer, tmp_path):
    """``--expert-units expert``: each expert its own allocation units; the native checkpoint records the mode and
    reloads. Any other format is refused before any work (they store a layer's experts in one scheme)."""
    out = tmp_path / "out"
    argv = mixed_cli_args(tokenizer, tmp_path, out, "6") + ["--expert-units", "expert"]
    assert main([*argv, "--format", "native,gptq"]) == 2
    assert not out.exists()
    assert main(argv) == 0
    mixed = json.loads((out / "config.json").read_text())["quantization_config"]["mixed_precision"]
    assert mixed["expert_units"] == "expert" and mixed["avg_bits"] <= 6
    bits = mixed["layer_bits"]
    for i in range(2):
        for e in range(4):
            p = f"model.layers.{i}.mlp.experts.{e}"
            assert bits[f"{p}.gate_proj"] == bits[f"{p}.up_proj"]  # gate+up: one unit per expert
    per_expert = [{bits[f"model.layers.{i}.mlp.experts.{e}.down_proj"] for e in range(4)} for i in range(2)]
    assert any(len(widths) == 2 for widths in per_expert), bits  # some layer's experts got different widths
    load_model(str(out))
