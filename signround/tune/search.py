"""The clipping search alone (``--method search``): calibrated rounding to nearest with no signed steps.

Each quantized linear's input mean square per channel is recorded over every calibration sample while the
block runs with its round-to-nearest weights (the same pass that measures RTN's loss in
:func:`signround.tune.signround.tune_block`), and each group's clipping factors are set to the shrink ratio of
least power-weighted weight error (:func:`signround.tune.init.init_clipping`, llama.cpp's imatrix idea). This is
SignRound's starting point (``--init search``) with zero steps: the first point of the quality-time frontier,
and signround's counterpart of auto-round's optimized RTN.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from signround.act.quant import quantized_inputs
from signround.config import QuantScheme, TuneConfig
from signround.model.blocks import block_linears
from signround.tune.init import InputPower, init_clipping
from signround.tune.signround import NO_HOOKS, ActInputs, BlockData, BlockResult, TuneHooks, block_mse, finalized
from signround.tune.wrapper import TunableWeight


@torch.no_grad()
def search_block(
    block: nn.Module,
    data: BlockData,
    schemes: dict[str, QuantScheme],
    cfg: TuneConfig,
    seed: int = 0,
    act: ActInputs | None = None,
    hooks: TuneHooks = NO_HOOKS,
) -> BlockResult:
    """Clipping-searched rounding of the linears of ``block`` named in ``schemes`` (``tune_block``'s signature;
    ``seed`` and ``hooks`` do not change the result: nothing is sampled and no step is taken).

    ``data.inputs`` ``[n, seqlen, H]`` run through the block with round-to-nearest weights (and, with ``act``,
    quantized inputs to the tuned linears, as in tuning); the result's ``rtn_loss`` is that pass's
    ``cfg.loss`` against ``data.targets``, its ``last_loss`` the same error after the search. ``block`` is left
    unchanged.
    """
    t0 = time.perf_counter()
    linears = block_linears(block)
    tunables = {name: TunableWeight.from_linear(linears[name], s, learn=False) for name, s in schemes.items()}
    dtype = data.inputs.dtype

    def weights() -> dict[str, torch.Tensor]:
        return {f"{name}.weight": t.fake_quant_weight(dtype) for name, t in tunables.items()}

    act_scheme, act_scales = act if act is not None else (None, None)
    with quantized_inputs(block, list(schemes), act_scheme, act_scales):
        power = InputPower()
        with power.recording({n: linears[n] for n in schemes}):
            rtn_loss = block_mse(block, data.inputs, data.targets, data.kwargs, cfg.batch_size, weights(), cfg.loss)
        init_clipping(tunables, power)
        loss = block_mse(block, data.inputs, data.targets, data.kwargs, cfg.batch_size, weights(), cfg.loss)
    return BlockResult(finalized(tunables), rtn_loss, rtn_loss, loss, loss, -1, 0, time.perf_counter() - t0)
