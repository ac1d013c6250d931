"""Starved experts: an expert the calibration data barely reaches, quantized on its own objective.

In a mixture-of-experts block the block-output loss reaches an expert only through the tokens the router
sends it. An expert that gets a handful of them (rare domains, an uneven router, little calibration data)
is tuned on almost nothing: SignRound then fits its rounding to those few tokens. Here such an expert is
quantized alone instead, on every calibration token's hidden state (the float model's inputs to the
experts module), against the float expert's own output on them (:func:`tune_alone`).

Shapes: an expert is a module ``x [..., H] -> [..., H]`` (``signround.model.experts.ExpertMLP``);
``inputs`` are ``[n, seqlen, H]`` (one row per calibration sample, so the tuning batches are samples as
in a block); layer names are relative to the expert (``gate_proj``, ``up_proj``, ``down_proj``).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from signround.config import QuantScheme, StarvedExperts, TuneConfig
from signround.formats import get_format
from signround.model.blocks import block_linears
from signround.primitives import from_groups, to_groups
from signround.tune.init import InputPower, init_clipping
from signround.tune.rtn import tune_rtn
from signround.tune.signround import ActInputs, BlockData, BlockResult, LayerResult, block_mse, finalized, tune_block
from signround.tune.wrapper import TunableWeight


def starved(tokens: dict[str, list[int]], min_tokens: int) -> dict[str, list[int]]:
    """The starved experts: ``{experts module: [expert ids]}`` of those routed fewer than ``min_tokens``
    tokens, from per-expert counts ``{experts module: [E]}``; modules with none are left out."""
    out = {name: [e for e, c in enumerate(counts) if c < min_tokens] for name, counts in tokens.items()}
    return {name: ids for name, ids in out.items() if ids}


@torch.no_grad()
def expert_targets(expert: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The float expert's outputs ``[n, seqlen, H]`` on ``inputs`` ``[n, seqlen, H]``, ``batch_size`` samples
    at a time."""
    return torch.cat([expert(inputs[i : i + batch_size]) for i in range(0, inputs.shape[0], batch_size)])


@torch.no_grad()
def _search_only(
    expert: nn.Module, data: BlockData, schemes: dict[str, QuantScheme], cfg: TuneConfig
) -> dict[str, LayerResult]:
    """The clipping search (:func:`signround.tune.init.init_clipping`) weighted by the input power of every
    sample in ``data``, then plain rounding: no signed steps."""
    linears = block_linears(expert)
    tunables = {name: TunableWeight.from_linear(linears[name], s, learn=False) for name, s in schemes.items()}
    power = InputPower()
    with power.recording({n: linears[n] for n in schemes}):
        expert_targets(expert, data.inputs, cfg.batch_size)
    init_clipping(tunables, power)
    return finalized(tunables)


def tune_alone(
    expert: nn.Module,
    inputs: torch.Tensor,
    schemes: dict[str, QuantScheme],
    cfg: TuneConfig,
    seed: int,
    mode: StarvedExperts,
    act: ActInputs | None = None,
) -> BlockResult:
    """Quantize one expert on its own output error over ``inputs`` ``[n, seqlen, H]`` (every calibration
    token, whether or not the router picks this expert for it).

    ``mode`` ``own``: :func:`signround.tune.signround.tune_block` on the expert as if it were a block (clipping
    search, ``cfg.iters`` signed steps, the loss ``cfg.loss``); ``init``: the clipping search and no steps.
    The result's ``rtn_loss`` and ``last_loss`` are the expert's round-to-nearest and final errors on all of
    ``inputs`` (``cfg.loss``, with the weights alone quantized); ``act`` (names relative to the expert)
    quantizes the linears' inputs during the signed steps, as in a block. ``expert`` is left unchanged.
    """
    t0 = time.perf_counter()
    data = BlockData(inputs, expert_targets(expert, inputs, cfg.batch_size), {})
    holdout = None
    if mode is StarvedExperts.OWN and cfg.iters > 0:
        result = tune_block(expert, data, schemes, cfg, seed, act)
        layers, holdout = result.layers, result.holdout
    else:
        layers = _search_only(expert, data, schemes, cfg)
    rtn = _dequantized(tune_rtn(expert, None, schemes, cfg).layers, inputs.dtype)
    rtn_loss = block_mse(expert, inputs, data.targets, {}, cfg.batch_size, rtn, cfg.loss)
    final = block_mse(expert, inputs, data.targets, {}, cfg.batch_size, _dequantized(layers, inputs.dtype), cfg.loss)
    steps = cfg.iters if mode is StarvedExperts.OWN else 0
    return BlockResult(layers, rtn_loss, rtn_loss, final, final, -1, steps, time.perf_counter() - t0, holdout=holdout)


def _dequantized(layers: dict[str, LayerResult], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``{name.weight: [out, in]}`` ``dtype`` weights of quantized layers (as ``QuantLinear`` computes them),
    for ``functional_call``."""
    out = {}
    for name, r in layers.items():
        fmt = get_format(r.scheme.dtype)
        w = fmt.dequantize_codes(to_groups(r.codes, r.scheme.group_size), r.scale.float(), r.zero.float())
        out[f"{name}.weight"] = from_groups(w, r.codes.shape[1]).to(dtype)
    return out
