"""Learning the rounding: pure per-block tuning functions (no devices, files or progress bars)."""

from signround.tune.signround import BlockResult, LayerResult, tune_block

__all__ = ["BlockResult", "LayerResult", "tune_block"]
