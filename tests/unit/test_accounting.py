"""Every decoder weight accounted for: quantized, kept float by a rule, kept float by default (norms, biases,
routers), or refused before any work (a weight matrix the pipeline cannot quantize, such as fused experts)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from signround import CalibConfig, QuantConfig, RunOptions, TuneConfig, quantize
from signround.cli import main
from signround.config import QuantScheme, parse_layer_config
from signround.errors import SignRoundError
from signround.model.accounting import Fate, account_model
from signround.model.blocks import find_blocks
from signround.pack.packed import QuantLinear
from tests.conftest import VOCAB, make_model

GPT_OSS = dict(
    hidden_size=64, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, head_dim=16, bos_token_id=0, eos_token_id=1,
    pad_token_id=1,
)  # fmt: skip


def gpt_oss():
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt_oss", **GPT_OSS)).eval()


def account(model, rules=None):
    prefix, blocks = find_blocks(model)
    base = QuantScheme(bits=4, group_size=32)
    return account_model(prefix, blocks, base, parse_layer_config(rules, base))


def test_a_dense_model_quantizes_every_linear_and_keeps_norms_float():
    acc = account(make_model("llama"), {r"self_attn\.o_proj": None})
    fates = {f.name: f for f in acc.fates}
    assert fates["model.layers.0.mlp.down_proj.weight"].fate is Fate.QUANTIZED
    assert fates["model.layers.0.mlp.down_proj.weight"].why == "W4G32-asym"
    assert fates["model.layers.1.self_attn.o_proj.weight"].fate is Fate.FLOAT_BY_RULE
    assert fates["model.layers.1.input_layernorm.weight"].why == "norm/bias"
    assert not acc.of(Fate.UNSUPPORTED)
    # 2 blocks x (7 linears + 2 norms); o_proj kept float in both
    assert acc.summary().startswith("quantized 12 of 18 decoder weight tensors (")
    acc.refuse_unsupported()


def test_fused_experts_are_refused_not_left_float():
    """Fused 3-D experts (gpt-oss's, before they are unfused) are not linears: refused with what to do, never
    silently float."""
    acc = account(gpt_oss())
    bad = {f.name for f in acc.of(Fate.UNSUPPORTED)}
    assert "model.layers.0.mlp.experts.gate_up_proj" in bad and "model.layers.1.mlp.experts.down_proj" in bad
    routers = [f for f in acc.fates if f.why == "router"]
    assert [f.name for f in routers] == ["model.layers.0.mlp.router.weight", "model.layers.1.mlp.router.weight"]
    with pytest.raises(SignRoundError, match=r"8 decoder weight tensor\(s\) cannot be quantized.*mlp\.experts"):
        acc.refuse_unsupported()
    kept = account(gpt_oss(), {"mlp.experts": None})
    kept.refuse_unsupported()
    assert {f.name for f in kept.of(Fate.FLOAT_BY_RULE)} >= bad


class FusedThing(torch.nn.Module):
    """A module of a family signround does not know, holding a 3-D weight."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2, 64, 64))

    def forward(self, x):
        return x


def test_an_unknown_fused_weight_is_refused_before_any_work(tokenizer):
    model = make_model("llama")
    model.model.layers[1].mlp.fused = FusedThing()
    cfg = QuantConfig(scheme=QuantScheme(bits=4, group_size=32), tune=TuneConfig(iters=2))
    with pytest.raises(SignRoundError, match=r"1 decoder weight tensor\(s\) cannot be quantized, e\.g\. "
                       r"model\.layers\.1\.mlp\.fused\.weight \[2, 64, 64\] \(FusedThing"):  # fmt: skip
        quantize(model, tokenizer, cfg, dataset=["never read"], options=RunOptions(progress=False))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # refused before any block was touched


def test_the_cli_reports_every_fate_of_a_moe_model(tmp_path, tokenizer, capsys):
    gpt_oss().save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    capsys.readouterr()  # the saving's own progress bars
    argv = ["quantize", "--model", str(tmp_path / "moe"), "--bits", "4", "--group-size", "32", "--method", "rtn",
            "--quiet", "--report", str(tmp_path / "r.json")]  # fmt: skip
    assert main([*argv, "--output", str(tmp_path / "all")]) == 0
    assert "quantized 32 of 74 decoder weight tensors" in capsys.readouterr().out  # experts unfused and quantized
    fates = {t["name"]: t["fate"] for t in json.loads((tmp_path / "r.json").read_text())["weights"]["tensors"]}
    assert fates["model.layers.0.mlp.experts.3.down_proj.weight"] == "quantized"
    assert fates["model.layers.0.mlp.router.weight"] == "float by default"
    # experts kept float by a rule: the report says which rule
    rule = ["--layer-config", '{"mlp.experts": null}']
    assert main([*argv, *rule, "--output", str(tmp_path / "kept")]) == 0
    assert "float by rule: mlp.experts x48" in capsys.readouterr().out
    fates = {t["name"]: t["fate"] for t in json.loads((tmp_path / "r.json").read_text())["weights"]["tensors"]}
    assert fates["model.layers.0.mlp.experts.0.gate_proj.weight"] == "float by rule"
    assert fates["model.layers.0.self_attn.q_proj.weight"] == "quantized"


def test_a_block_kept_float_whole_by_a_rule_is_passed_through_untuned(tokenizer):
    """A --layer-config rule that keeps every linear of a block float leaves SignRound nothing to tune there: the
    run goes on (no steps for that block), the block stays float and the others are tuned."""
    from tests.conftest import corpus

    model = make_model("llama", layers=3)
    before = {n: p.detach().clone() for n, p in model.model.layers[1].named_parameters()}
    keep = {r"model\.layers\.1\.": {"bits": 16}}
    cfg = QuantConfig(scheme=QuantScheme(bits=4, group_size=32), tune=TuneConfig(iters=2, batch_size=2),
                      calib=CalibConfig(nsamples=4, seqlen=16), layer_rules=keep)  # fmt: skip
    quantize(model, tokenizer, cfg, corpus(20, seed=1), RunOptions(progress=False))
    layers = model.model.layers
    assert not [m for m in layers[1].modules() if isinstance(m, QuantLinear)]
    assert all(torch.equal(p, before[n]) for n, p in layers[1].named_parameters())
    assert isinstance(layers[0].self_attn.q_proj, QuantLinear) and isinstance(layers[-1].mlp.down_proj, QuantLinear)
