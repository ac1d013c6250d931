"""Round-to-nearest as a tuning function with :func:`signround.tune.signround.tune_block`'s signature.

RTN needs only the weights: ``data`` may be None (no calibration pass), and then the result carries no
losses (NaN); the orchestrator measures the block-output loss itself when it has data. The codes are those
of ``tune_block`` with ``iters == 0``: the grid's parameters from each group's extremes, no clipping search.
"""

from __future__ import annotations

import math
import time

from torch import nn

from signround.config import QuantScheme, TuneConfig
from signround.model.blocks import block_linears
from signround.tune.signround import NO_HOOKS, ActInputs, BlockData, BlockResult, LayerResult, TuneHooks
from signround.tune.wrapper import TunableWeight


def tune_rtn(
    block: nn.Module,
    data: BlockData | None,
    schemes: dict[str, QuantScheme],
    cfg: TuneConfig,
    seed: int = 0,
    act: ActInputs | None = None,
    hooks: TuneHooks = NO_HOOKS,
) -> BlockResult:
    """Round the linears of ``block`` named in ``schemes`` to nearest (``data``, ``cfg``, ``seed``, ``act`` and
    ``hooks`` are accepted for the shared signature and do not change the result: activation quantization does
    not move a weight's nearest grid point)."""
    t0 = time.perf_counter()
    linears = block_linears(block)
    layers = {}
    for name, scheme in schemes.items():
        codes, scale, zero = TunableWeight.from_linear(linears[name], scheme, learn=False).finalize()
        layers[name] = LayerResult(codes, scale, zero, scheme)
    nan = math.nan
    return BlockResult(layers, nan, nan, nan, nan, -1, 0, time.perf_counter() - t0)
