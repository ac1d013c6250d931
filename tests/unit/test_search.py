"""``--method search``: the calibrated clipping search that starts SignRound, with no steps."""

import json

import pytest
import torch

from signround.cli import main
from signround.config import CalibConfig, Method, QuantConfig, QuantScheme, TuneConfig
from signround.errors import SignRoundError
from signround.tune.search import search_block
from signround.tune.signround import BlockData, block_mse, tune_block
from tests.conftest import corpus, make_config, make_model
from tests.unit.test_tune import _block_setup, _weights


@pytest.mark.parametrize("bits", [2, 3])
def test_search_block_is_signrounds_start(bits):
    """Its codes are exactly those SignRound starts from: one step whose best (kept) state is step 0's."""
    block, x, y, kw, schemes = _block_setup(bits=bits)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    data = BlockData(x, y, kw)
    found = search_block(block, data, schemes, TuneConfig(method="search"))
    start = tune_block(block, data, schemes, TuneConfig(iters=1, use_best=True), seed=0)
    assert found.steps == 0 and start.best_step == 0
    for name, layer in found.layers.items():
        assert torch.equal(layer.codes, start.layers[name].codes), name
        assert torch.equal(layer.scale, start.layers[name].scale), name
    # the RTN pass is the same one tune_block measures, and the losses are of the stated weights
    assert found.rtn_loss == pytest.approx(start.rtn_loss, rel=1e-6)
    assert found.last_loss == pytest.approx(block_mse(block, x, y, kw, 8, _weights(block, found), "relative"), rel=1e-4)
    rtn = tune_block(block, data, schemes, TuneConfig(iters=0), seed=0)
    assert any(not torch.equal(layer.codes, rtn.layers[n].codes) for n, layer in found.layers.items())
    assert all(torch.equal(v, before[k]) for k, v in block.state_dict().items())


def test_search_config_needs_data_and_refuses_what_needs_steps():
    cfg = TuneConfig(method="search", iters=50)
    assert cfg.method is Method.SEARCH and cfg.iters == 0
    q = QuantConfig(tune=cfg, calib=CalibConfig(nsamples=4, seqlen=32))
    assert q.needs_calibration
    assert not QuantConfig(tune=TuneConfig(method="rtn")).needs_calibration
    for fields, match in [({"init": "none"}, "needs init search"), ({"nested": "4"}, "nested widths"),
                          ({"holdout": 2}, "holdout")]:  # fmt: skip
        with pytest.raises(SignRoundError, match=match):
            TuneConfig(method="search", **fields)


def test_search_run_beats_rtn_in_the_report(tokenizer, tmp_path):
    import signround

    scheme = QuantScheme(bits=2, group_size=32)
    cfg = make_config(scheme=scheme, method="search", nsamples=8, seqlen=32)
    quiet = signround.RunOptions(progress=False)
    report = signround.quantize_run(make_model("llama"), tokenizer, cfg, corpus(40, seed=1), quiet).report
    assert report.blocks and all(b.steps == 0 for b in report.blocks)
    # each block's RTN loss is measured on the same inputs as its searched one: the search lowers it
    assert sum(b.final_loss for b in report.blocks) < sum(b.rtn_loss for b in report.blocks)


def test_cli_method_search_records_it(tmp_path, model_dir, calib_jsonl):
    out = tmp_path / "out"
    argv = [
        "quantize",
        "--model",
        str(model_dir),
        "--output",
        str(out),
        "--method",
        "search",
        "--bits",
        "3",
        "--group-size",
        "32",
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--dataset",
        str(calib_jsonl),
        "--quiet",
    ]
    assert main(argv) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["tuning"] == {"method": "search", "iters": 0}
