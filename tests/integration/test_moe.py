"""Mixture-of-experts families end to end on tiny random-init models: the fused experts are unfused into one
linear per expert, every expert is quantized (none left float), the native checkpoint reloads with the same
logits, and the streamed (--low-memory) run writes the same tensors as the whole-model one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import signround
from signround.cli import main
from signround.model.accounting import Fate
from signround.pack.packed import QuantLinear
from tests.conftest import corpus, make_config
from tests.unit.test_experts import MOE_LAYERS, build

FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss", "olmoe", "deepseek_v3"]
QUIET = signround.RunOptions(progress=False)


def _cfg():
    return make_config(scheme=signround.QuantScheme(bits=4, group_size=16), iters=2, nsamples=4, seqlen=32,
                       batch_size=2)  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_every_expert_is_quantized_and_the_checkpoint_reloads(family, tokenizer, tmp_path):
    model = build(family)
    result = signround.quantize_run(model, tokenizer, _cfg(), corpus(20, seed=1), QUIET)
    weights = result.plan.weights
    assert not weights.of(Fate.UNSUPPORTED)
    experts = [n for n, m in model.named_modules() if ".mlp.experts." in n and isinstance(m, QuantLinear)]
    layers = MOE_LAYERS.get(family, [0, 1])
    assert len(experts) == len(layers) * 4 * 3  # 4 experts x gate/up/down in every MoE layer
    assert f"model.layers.{layers[0]}.mlp.experts.3.down_proj" in experts
    for b in result.report.blocks:  # every calibration token routed to top-k = 2 experts of each MoE layer
        if b.index in layers:
            assert list(b.expert_tokens) == ["mlp.experts"] and sum(b.expert_tokens["mlp.experts"]) == 4 * 32 * 2
        else:
            assert b.expert_tokens is None  # DeepSeek-V3's dense first layer
    floats = {f.why for f in weights.fates if f.fate is not Fate.QUANTIZED}
    assert floats <= {"norm/bias", "router"}  # routers stay float by default; nothing else is left float
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x).logits
    signround.save(model, tokenizer, tmp_path / "q")
    reloaded, _ = signround.load_model(str(tmp_path / "q"))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, expected)


def _tensors(folder):
    """Every tensor of a checkpoint folder (one file, or the streamed run's shards)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])  # per-expert and fused names on disk
def test_streamed_and_whole_runs_write_the_same_moe_checkpoint(family, tokenizer, tmp_path):
    build(family).save_pretrained(tmp_path / "float")
    tokenizer.save_pretrained(tmp_path / "float")
    (tmp_path / "calib.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus(20, seed=1)))
    argv = ["quantize", "--model", str(tmp_path / "float"), "--bits", "4", "--group-size", "16", "--iters", "2",
            "--nsamples", "4", "--seqlen", "32", "--batch-size", "2", "--dataset", str(tmp_path / "calib.jsonl"),
            "--quiet"]  # fmt: skip
    assert main([*argv, "--output", str(tmp_path / "whole")]) == 0
    assert main([*argv, "--low-memory", "--output", str(tmp_path / "streamed")]) == 0
    whole, streamed = _tensors(tmp_path / "whole"), _tensors(tmp_path / "streamed")
    assert whole.keys() == streamed.keys() and "model.layers.1.mlp.experts.3.up_proj.qweight" in whole
    assert all(torch.equal(whole[k], streamed[k]) for k in whole)


def test_compressed_tensors_export_of_a_moe_loads_in_transformers(tokenizer, tmp_path):
    """Third-party reader: transformers + compressed-tensors loads the per-expert export (fusing it into its own
    experts module) with the logits of signround's checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        head_dim=16,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name or ".mlp.gate." in name:
                p.copy_(torch.randn_like(p) * 0.05)
    cfg = make_config(scheme=signround.QuantScheme(bits=4, group_size=32, sym=True), method="rtn")
    signround.quantize(model, tokenizer, cfg, None, QUIET)
    x = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x).logits
    signround.save(model, tokenizer, tmp_path / "ct", "compressed-tensors")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours, rtol=1e-5, atol=1e-5)
    assert not torch.equal(ours, AutoModelForCausalLM.from_config(model.config)(x).logits)  # not a fresh init
