"""Starved experts: an expert the calibration data does not reach is quantized on its own objective.

A tiny DeepSeek-V3 whose router's selection bias shuts expert 3 of its MoE layer out entirely: the block
loss has no gradient for it. ``--starved-experts own`` tunes it alone on every calibration token; ``block``
leaves it where the clipping search (with no input statistics) put it. Judged on held-out text."""

from __future__ import annotations

import copy

import pytest
import torch

import signround
from signround.cli import main
from signround.config import StarvedExperts, TuneConfig
from signround.errors import SignRoundError
from signround.model.experts import unfuse_experts
from signround.pack.packed import QuantLinear
from signround.tune.experts import starved
from tests.conftest import corpus, make_config
from tests.unit.test_experts import build

QUIET = signround.RunOptions(progress=False)
SHUT_OUT = 3  # the expert no token reaches
PREFIX = "model.layers.1.mlp.experts"  # DeepSeek-V3's first layer is dense


def _model():
    model = build("deepseek_v3")
    unfuse_experts(model)  # as quantize_run does: the float copies below are then comparable per expert
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias[SHUT_OUT] = -1e4  # selection only
    return model


def _quantize(model, tokenizer, mode: str, min_tokens: int = 64, nsamples: int = 16):
    cfg = make_config(scheme=signround.QuantScheme(bits=3, group_size=16), iters=12, nsamples=nsamples, seqlen=64,
                      batch_size=2, expert_min_tokens=min_tokens, starved_experts=mode)  # fmt: skip
    return signround.quantize_run(model, tokenizer, cfg, corpus(40, seed=1), QUIET)


def _held_out_inputs(model, tokenizer) -> torch.Tensor:
    """The hidden states entering the experts module on text the run never saw: ``[T, H]``."""
    seen = []
    handle = model.get_submodule(PREFIX).register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, 64)))
    ids = tokenizer(" ".join(corpus(10, seed=7)), return_tensors="pt").input_ids[:, :128]
    with torch.no_grad():
        model(ids)
    handle.remove()
    return torch.cat(seen)


def _expert_error(float_model, quantized, x: torch.Tensor) -> float:
    name = f"{PREFIX}.{SHUT_OUT}"
    with torch.no_grad():
        ref = float_model.get_submodule(name)(x)
        return (quantized.get_submodule(name)(x) - ref).pow(2).mean().item() / ref.pow(2).mean().item()


def test_starved_lists_the_experts_below_the_threshold():
    assert starved({"mlp.experts": [70, 3, 0, 64]}, 64) == {"mlp.experts": [1, 2]}
    assert starved({"mlp.experts": [70, 64]}, 64) == {}
    assert starved({"mlp.experts": [1]}, 0) == {}


def test_an_expert_no_token_reaches_is_tuned_alone_and_comes_out_better(tokenizer):
    float_model = _model()
    x = _held_out_inputs(float_model, tokenizer)
    errors, reports = {}, {}
    for mode in ("own", "init", "block"):
        model = copy.deepcopy(float_model)
        result = _quantize(model, tokenizer, mode)
        block = result.report.blocks[1]
        assert block.expert_tokens["mlp.experts"][SHUT_OUT] == 0
        entry = next(s for s in block.starved if s["expert"] == SHUT_OUT)
        assert entry["module"] == "mlp.experts" and entry["tokens"] == 0 and entry["mode"] == mode
        assert isinstance(model.get_submodule(f"{PREFIX}.{SHUT_OUT}.down_proj"), QuantLinear)
        errors[mode], reports[mode] = _expert_error(float_model, model, x), entry
    assert "loss" not in reports["block"]  # tuned (or not) with its block: no error of its own was measured
    assert reports["own"]["loss"] < reports["own"]["rtn_loss"]  # its own objective, on the calibration tokens
    # on held-out text: tuning it on every token beats leaving it at the data-free start
    assert errors["own"] < errors["block"]
    assert errors["init"] < errors["block"]


def test_experts_routed_enough_tokens_are_tuned_with_their_block(tokenizer):
    model = _model()
    result = _quantize(model, tokenizer, "own", min_tokens=1, nsamples=4)
    assert [s["expert"] for s in result.report.blocks[1].starved] == [SHUT_OUT]
    assert result.report.blocks[0].starved is None  # the dense layer
    cfg = model.config.quantization_config["tuning"]
    assert cfg["expert_min_tokens"] == 1 and cfg["starved_experts"] == "own"


def test_a_rule_that_keeps_a_starved_expert_float_is_honoured(tokenizer):
    model = _model()
    cfg = make_config(scheme=signround.QuantScheme(bits=4, group_size=16), iters=2, nsamples=4, seqlen=32,
                      batch_size=2, layer_config={rf"experts\.{SHUT_OUT}\.": {"bits": 16}})  # fmt: skip
    signround.quantize_run(model, tokenizer, cfg, corpus(20, seed=1), QUIET)
    assert isinstance(model.get_submodule(f"{PREFIX}.{SHUT_OUT}.down_proj"), torch.nn.Linear)
    assert isinstance(model.get_submodule(f"{PREFIX}.2.down_proj"), QuantLinear)


def test_bad_starved_settings_are_refused(capsys):
    with pytest.raises(SignRoundError, match="starved_experts must be one of own, init, block"):
        TuneConfig(starved_experts="skip")
    with pytest.raises(SignRoundError, match="expert_min_tokens must be >= 0"):
        TuneConfig(expert_min_tokens=-1)
    with pytest.raises(SignRoundError, match="routing must be one of student, teacher"):
        TuneConfig(routing="router")
    assert TuneConfig(starved_experts="init").starved_experts is StarvedExperts.INIT
    assert main(["quantize", "--model", "x", "--output", "y", "--starved-experts", "skip"]) == 2
    assert "invalid choice: 'skip'" in capsys.readouterr().err
