"""Named recipes (``--recipe fast|default|best``, ``QuantConfig.from_recipe``): what each sets, and that what a
user sets wins."""

from __future__ import annotations

import pytest

from signround.cli_args import build_parser, quant_config
from signround.config import RECIPES, CalibConfig, QuantConfig, Recipe, TuneConfig, fill_from_recipe, recipe_spec
from signround.errors import SignRoundError


def cli(*flags: str) -> QuantConfig:
    return quant_config(build_parser().parse_args(["quantize", "--model", "m", "--output", "o", *flags]))


def budget(cfg: QuantConfig) -> tuple:
    return cfg.tune.iters, cfg.tune.lr, cfg.tune.batch_size, cfg.calib.nsamples, cfg.calib.seqlen


def test_no_recipe_is_the_default_recipe_and_the_configs_defaults():
    # the default recipe must be what a Python user gets from the bare configs too, or the two would drift
    spec = RECIPES[Recipe.DEFAULT]
    assert (spec.iters, spec.lr, spec.batch_size, spec.nsamples, spec.seqlen) == (200, None, 8, 128, 2048)
    bare = QuantConfig()
    assert budget(cli()) == budget(cli("--recipe", "default")) == budget(bare)
    assert budget(QuantConfig.from_recipe(None)) == budget(bare)
    assert recipe_spec(None) == spec


def test_each_recipe_sets_its_numbers():
    fast = cli("--recipe", "fast")
    assert budget(fast) == (50, None, 8, 128, 2048) and fast.tune.effective_lr == pytest.approx(1 / 50)
    assert budget(cli("--recipe", "best")) == (1000, None, 8, 512, 2048)
    assert budget(QuantConfig.from_recipe("best")) == budget(cli("--recipe", "best"))


def test_flags_the_user_sets_win_over_the_recipe():
    cfg = cli("--recipe", "best", "--iters", "10", "--seqlen", "256", "--lr", "0.01")
    assert budget(cfg) == (10, 0.01, 8, 512, 256)
    # a method without steps still has none, whatever the recipe
    assert cli("--recipe", "fast", "--method", "rtn").tune.iters == 0
    assert cli("--recipe", "best", "--method", "search").tune.iters == 0


def test_python_overrides_merge_or_replace():
    cfg = QuantConfig.from_recipe("fast", tune={"seed": 7, "iters": 20}, calib={"seqlen": 512}, scheme="W4A16")
    assert budget(cfg) == (20, None, 8, 128, 512) and cfg.tune.seed == 7 and cfg.scheme.name == "W4G128-sym"
    whole = QuantConfig.from_recipe("best", tune=TuneConfig(iters=3), calib=CalibConfig(nsamples=4))
    assert budget(whole) == (3, None, 8, 4, 2048)


def test_bad_recipe_input_is_refused_in_one_line():
    with pytest.raises(SignRoundError, match=r"unknown recipe 'fastest'; choose one of fast, default, best"):
        QuantConfig.from_recipe("fastest")
    with pytest.raises(SignRoundError, match="a recipe sets .*; not itrs"):
        fill_from_recipe("fast", itrs=3)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--model", "m", "--output", "o", "--recipe", "fastest"])
    # the configs still validate what a recipe fills in
    with pytest.raises(SignRoundError, match="iters must be >= 0"):
        cli("--recipe", "fast", "--iters", "-1")
