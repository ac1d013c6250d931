"""The held-out check (TuneConfig.holdout): held samples are never stepped on, and a block the steps made worse
on them keeps its starting rounding."""

import json

import pytest
import torch

from signround.config import TuneConfig
from signround.errors import SignRoundError
from signround.report import BlockReport, RunReport, holdout_summary
from signround.tune.signround import BlockData, TuneHooks, block_mse, holdout_split, tune_block
from tests.unit.test_tune import _block_setup, _weights


def test_holdout_split_is_a_seeded_partition():
    pool, held = holdout_split(16, 4, seed=3)
    assert len(held) == 4 and len(pool) == 12
    assert sorted(pool.tolist() + held.tolist()) == list(range(16))
    again = holdout_split(16, 4, seed=3)
    assert torch.equal(again[1], held) and not torch.equal(holdout_split(16, 4, seed=4)[1], held)
    for k in (0, 16, 20):
        with pytest.raises(SignRoundError, match="at least one"):
            holdout_split(16, k, seed=0)
    with pytest.raises(SignRoundError, match="holdout"):
        TuneConfig(holdout=-1)


def test_held_out_samples_never_enter_a_batch_and_off_changes_nothing():
    block, x, y, kw, schemes = _block_setup(bits=3)
    seen: list[int] = []
    hooks = TuneHooks(on_batch=lambda idx: seen.extend([] if idx is None else idx.tolist()))
    r = tune_block(block, BlockData(x, y, kw), schemes, TuneConfig(iters=30, batch_size=4, holdout=4), 0, hooks=hooks)
    _, held = holdout_split(16, 4, seed=0)
    assert seen and not set(seen) & set(held.tolist())
    assert r.holdout["samples"] == 4 and r.steps == 30
    # a real improvement is kept: the tuned block is better on the held samples, and finalized as tuned
    assert r.holdout["tuned"] < r.holdout["start"] and not r.holdout["kept_start"]
    tuned_there = block_mse(block, x[held], y[held], kw, 8, _weights(block, r), "relative")
    assert tuned_there == pytest.approx(r.holdout["tuned"], rel=1e-3)
    off = tune_block(block, BlockData(x, y, kw), schemes, TuneConfig(iters=30, batch_size=4), 0)
    assert off.holdout is None and len(off.losses) == 30


def test_a_block_the_steps_made_worse_keeps_its_start():
    block, x, y, kw, schemes = _block_setup(bits=3)
    # unclipped start (plain rounding) and steps far too large, last step kept: the steps wreck the rounding
    cfg = TuneConfig(iters=6, batch_size=4, init="none", lr=2.0, use_best=False, holdout=4)
    r = tune_block(block, BlockData(x, y, kw), schemes, cfg, 0)
    assert r.holdout["kept_start"] and r.holdout["tuned"] > r.holdout["start"]
    rtn = tune_block(block, BlockData(x, y, kw), schemes, TuneConfig(iters=0), 0)
    for name, layer in r.layers.items():  # what it keeps is exactly the start, round-to-nearest here
        assert torch.equal(layer.codes, rtn.layers[name].codes)
        assert torch.equal(layer.scale, rtn.layers[name].scale) and torch.equal(layer.zero, rtn.layers[name].zero)
    unguarded = tune_block(block, BlockData(x, y, kw), schemes, TuneConfig(**{**vars(cfg), "holdout": 0}), 0)
    assert any(not torch.equal(unguarded.layers[n].codes, rtn.layers[n].codes) for n in rtn.layers)


def test_the_report_says_which_blocks_kept_their_start():
    def block(i, kept):
        return BlockReport(i, f"b.{i}", 1.0, 1.0, 1.0, 1.0, 5, 0.1, holdout={"samples": 2, "start": 1.0,
                           "tuned": 2.0 if kept else 0.5, "kept_start": kept})  # fmt: skip

    assert holdout_summary(RunReport(blocks=[BlockReport(0, "b.0", 1, 1, 1, 1, 5, 0.1)])) is None
    line = holdout_summary(RunReport(blocks=[block(0, False), block(1, True), block(2, False)]))
    assert line.startswith("held-out check (--holdout 2): 1 of 3 blocks kept") and line.endswith("(blocks 1)")
    json.dumps(vars(block(1, True)))  # the run report stays JSON


def test_cli_holdout_reaches_the_report(tmp_path, model_dir, calib_jsonl, capsys):
    from signround.cli import main

    report = tmp_path / "run.json"
    args = ["quantize", "--model", str(model_dir), "--dataset", str(calib_jsonl), "--bits", "4", "--group-size",
            "32", "--iters", "4", "--nsamples", "6", "--seqlen", "32", "--batch-size", "2", "--quiet"]  # fmt: skip
    assert main([*args, "--holdout", "2", "--output", str(tmp_path / "out"), "--report", str(report)]) == 0
    blocks = json.loads(report.read_text())["blocks"]
    assert blocks and all(b["holdout"]["samples"] == 2 for b in blocks)
    capsys.readouterr()
    assert main([*args, "--holdout", "6", "--output", str(tmp_path / "o2")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--holdout 6 must leave at least one of the 6" in err[0]
    assert not (tmp_path / "o2").exists()  # refused before anything is written
