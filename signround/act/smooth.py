"""Smoothing: per-channel scales that move activation outliers into the weights before both are quantized
(SmoothQuant; the migration MergeQuant and LLM-FP4's reparameterization build on), folded into the
preceding norm or linear so inference costs nothing extra.

For a linear group reading ``x [.., in]`` (q/k/v after ``input_layernorm``, gate/up after
``post_attention_layernorm``, down after ``up_proj``), with per-channel scales ``s [in]``:
``x W^T = (x / s) (W * s)^T``. ``x / s`` is folded into the producer (the RMSNorm's weight, or the rows of
``up_proj``, whose output multiplies ``act(gate)`` elementwise, so scaling it scales down_proj's input),
and ``W * s`` into every consumer's columns. ``s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha)`` (the
weight max over all consumers), clamped to ``[1e-5, 1e5]``.

``alpha`` is searched per group on calibration data: each candidate (and "no smoothing") is applied to a
copy of the block, whose consumers are rounded to nearest on their weight grid and whose inputs are
quantized, and the one with the least block-output MSE against the float block wins. o_proj is not smoothed
(with grouped-query attention one v channel feeds several o_proj inputs; left for later).

Supported blocks: LLaMA-style (``self_attn.{q,k,v}_proj``, ``mlp.{gate,up,down}_proj``,
``input_layernorm``, ``post_attention_layernorm``), which covers LLaMA, Mistral, Qwen2 and SmolLM.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from signround.act.calibrate import input_absmax, quantized_inputs, static_scales
from signround.config import ActScheme, QuantScheme
from signround.errors import SignRoundError
from signround.tune.signround import block_mse
from signround.tune.wrapper import TunableWeight

ALPHAS = (0.25, 0.4, 0.5, 0.6, 0.75)


@dataclass(frozen=True)
class SmoothGroup:
    """A producer (a norm, or a linear whose output rows are scaled) and the linears reading its output."""

    producer: str
    consumers: tuple[str, ...]


def smooth_groups(block: nn.Module) -> list[SmoothGroup]:
    """The smoothable groups of a LLaMA-style block (raises for other layouts)."""
    groups = [
        SmoothGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        SmoothGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        SmoothGroup("mlp.up_proj", ("mlp.down_proj",)),
    ]
    names = dict(block.named_modules())
    for g in groups:
        if g.producer not in names or any(c not in names for c in g.consumers):
            raise SignRoundError(
                f"--smooth supports LLaMA-style blocks (q/k/v, gate/up/down, input_layernorm); this block has no "
                f"{g.producer} or {', '.join(g.consumers)}"
            )
    return groups


def smoothing_scales(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s [in] = max|x|^alpha / max|W|^(1-alpha)`` (weight max per input column over ``weights``)."""
    w_max = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)
    s = x_absmax.float().clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(1e-5, 1e5)


@torch.no_grad()
def apply_smoothing(block: nn.Module, group: SmoothGroup, s: torch.Tensor) -> None:
    """Fold ``1 / s`` into the producer and ``s`` into the consumers' input columns, in place."""
    producer = block.get_submodule(group.producer)
    if isinstance(producer, nn.Linear):  # its output rows (and bias) feed the consumers' input channels
        producer.weight.div_(s.to(producer.weight.dtype)[:, None])
        if producer.bias is not None:
            producer.bias.div_(s.to(producer.bias.dtype))
    else:  # an RMSNorm / LayerNorm with an elementwise weight (and bias)
        producer.weight.div_(s.to(producer.weight.dtype))
        if getattr(producer, "bias", None) is not None:
            producer.bias.div_(s.to(producer.bias.dtype))
    for name in group.consumers:
        w = block.get_submodule(name).weight
        w.mul_(s.to(w.dtype)[None, :])


@torch.no_grad()
def _quantized_loss(
    block: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    kwargs: dict[str, Any],
    schemes: dict[str, QuantScheme],
    act: ActScheme,
    batch_size: int,
) -> float:
    """Block-output MSE with the scheme's linears rounded to nearest and their inputs quantized."""
    trial = copy.deepcopy(block)
    for name, scheme in schemes.items():
        layer = trial.get_submodule(name)
        layer.weight.copy_(TunableWeight.from_linear(layer, scheme, learn=False).fake_quant_weight(layer.weight.dtype))
    names = list(schemes)
    scales = (
        static_scales(input_absmax(trial, inputs, kwargs, names, batch_size), act)
        if act.granularity == "channel"
        else None
    )
    with quantized_inputs(trial, names, act, scales):
        return block_mse(trial, inputs, targets, kwargs, batch_size)


@torch.no_grad()
def smooth_block(
    block: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    kwargs: dict[str, Any],
    schemes: dict[str, QuantScheme],
    act: ActScheme,
    batch_size: int,
    alphas: tuple[float, ...] = ALPHAS,
) -> dict[str, float | None]:
    """Search and apply smoothing for every group of ``block`` in place, in order; returns the chosen alpha
    per producer (None: not smoothed). Groups whose consumers are not all quantized are left alone."""
    chosen: dict[str, float | None] = {}
    for group in smooth_groups(block):
        if not all(c in schemes for c in group.consumers):
            chosen[group.producer] = None
            continue
        x_absmax = input_absmax(block, inputs, kwargs, [group.consumers[0]], batch_size)[group.consumers[0]]
        weights = [block.get_submodule(c).weight for c in group.consumers]
        best = (_quantized_loss(block, inputs, targets, kwargs, schemes, act, batch_size), None)
        for alpha in alphas:
            trial = copy.deepcopy(block)
            apply_smoothing(trial, group, smoothing_scales(x_absmax, weights, alpha))
            loss = _quantized_loss(trial, inputs, targets, kwargs, schemes, act, batch_size)
            if loss < best[0]:
                best = (loss, alpha)
        if best[1] is not None:
            apply_smoothing(block, group, smoothing_scales(x_absmax, weights, best[1]))
        chosen[group.producer] = best[1]
    return chosen
