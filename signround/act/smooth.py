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
quantized, and the one with the least block-output MSE against the float block wins. The activation maxima
come from all calibration samples, the scores from the first ``SEARCH_SAMPLES`` (for time: every
candidate runs the block).

o_proj is smoothed against v_proj's rows: attention mixes tokens but not channels, so scaling v's output
channel scales o_proj's matching input. With grouped-query attention each v channel ``(kv, d)`` feeds the
o_proj inputs ``(h, d)`` of the ``n_rep`` query heads ``h = kv * n_rep + j`` of its group, so the scales are
tied across those heads: statistics are reduced by max over the group before the formula, and the tied
scale is repeated over the group's o_proj columns.

Supported blocks: LLaMA-style (``self_attn.{q,k,v}_proj``, ``mlp.{gate,up,down}_proj``,
``input_layernorm``, ``post_attention_layernorm``), which covers LLaMA, Mistral, Qwen2 and SmolLM.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from signround.act.calibrate import calibrate_static, input_absmax
from signround.act.hadamard import online_of
from signround.act.quant import quantized_inputs
from signround.config import ActScheme, QuantScheme
from signround.errors import SignRoundError
from signround.tune.signround import block_mse
from signround.tune.wrapper import TunableWeight

ALPHAS = (0.25, 0.4, 0.5, 0.6, 0.75)
SEARCH_SAMPLES = 4  # calibration samples the alpha search scores candidates on (all samples give the maxima)


@dataclass(frozen=True)
class SmoothGroup:
    """A producer (a norm, or a linear whose output rows are scaled) and the linears reading its output."""

    producer: str
    consumers: tuple[str, ...]
    head_dim: int = 0  # > 0: the producer is v_proj, whose channels are repeated over query heads (GQA)


def tie(v: torch.Tensor, width: int, head_dim: int) -> torch.Tensor:
    """``v [c]`` over the consumers' inputs reduced (max) to the producer's ``width`` channels: with
    ``c = width * n_rep`` the layout is ``[kv, n_rep, head_dim]`` (query head ``kv * n_rep + j`` reads kv
    head ``kv``); identity when ``c == width``."""
    if v.numel() == width:
        return v
    n_rep = v.numel() // width
    return v.reshape(width // head_dim, n_rep, head_dim).amax(1).reshape(width)


def untie(s: torch.Tensor, width: int, head_dim: int) -> torch.Tensor:
    """Producer scales ``s [p]`` repeated over the consumers' ``width`` inputs (the inverse layout of :func:`tie`)."""
    if s.numel() == width:
        return s
    n_rep = width // s.numel()
    kv = s.numel() // head_dim
    return s.reshape(kv, 1, head_dim).expand(kv, n_rep, head_dim).reshape(width)


def smooth_groups(block: nn.Module) -> list[SmoothGroup]:
    """The smoothable groups of a LLaMA-style block (raises for other layouts); up_proj -> down_proj is left out
    when down_proj rotates its input online (:mod:`signround.act.hadamard`)."""
    groups = [
        SmoothGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        SmoothGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        SmoothGroup("mlp.up_proj", ("mlp.down_proj",)),
    ]
    names = dict(block.named_modules())
    if isinstance(names.get("mlp.down_proj"), nn.Module) and online_of(names["mlp.down_proj"]) is not None:
        groups.pop()  # down_proj's input is rotated online: scales folded before the rotation do not cancel
    for g in groups:
        if g.producer not in names or any(c not in names for c in g.consumers):
            raise SignRoundError(
                f"--smooth supports LLaMA-style blocks (q/k/v, gate/up/down, input_layernorm); this block has no "
                f"{g.producer} or {', '.join(g.consumers)}"
            )
    attn = names.get("self_attn")
    head_dim = getattr(attn, "head_dim", 0)
    v, o = names.get("self_attn.v_proj"), names.get("self_attn.o_proj")
    if head_dim and isinstance(v, nn.Linear) and isinstance(o, nn.Linear):
        if v.out_features % head_dim == 0 and o.in_features % v.out_features == 0:
            groups.append(SmoothGroup("self_attn.v_proj", ("self_attn.o_proj",), int(head_dim)))
    return groups


def smoothing_scales(
    x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float, width: int | None = None, head_dim: int = 0
) -> torch.Tensor:
    """``s = max|x|^alpha / max|W|^(1-alpha)`` (weight max per input column over ``weights``), ``[in]``, or
    ``[width]`` tied per producer channel (see :func:`tie`) when the producer is narrower than ``in``."""
    w_max = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)
    x_max = x_absmax.float()
    if width is not None:
        w_max, x_max = tie(w_max, width, head_dim), tie(x_max, width, head_dim)
    s = x_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(1e-5, 1e5)


def _producer_width(block: nn.Module, group: SmoothGroup) -> int | None:
    producer = block.get_submodule(group.producer)
    return producer.out_features if isinstance(producer, nn.Linear) else None


@torch.no_grad()
def apply_smoothing(block: nn.Module, group: SmoothGroup, s: torch.Tensor) -> None:
    """Fold ``1 / s`` into the producer and ``s`` (repeated over query heads for v -> o) into the consumers'
    input columns, in place."""
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
        w.mul_(untie(s, w.shape[1], group.head_dim).to(w.dtype)[None, :])


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
    scales = calibrate_static(trial, inputs, kwargs, names, act, batch_size)[0] if act.granularity.is_static else None
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
    x_search, y_search = inputs[:SEARCH_SAMPLES], targets[:SEARCH_SAMPLES]
    groups = [g for g in smooth_groups(block) if all(c in schemes for c in g.consumers)]
    chosen: dict[str, float | None] = {g.producer: None for g in smooth_groups(block)}
    # One pass for every group: smoothing a group changes only its own consumers' inputs (the float function
    # is kept), and every consumer belongs to one group, so the maxima measured before any smoothing hold.
    maxima = input_absmax(block, inputs, kwargs, [g.consumers[0] for g in groups], batch_size)
    current = _quantized_loss(block, x_search, y_search, kwargs, schemes, act, batch_size) if groups else 0.0
    for group in groups:
        x_absmax = maxima[group.consumers[0]]
        weights = [block.get_submodule(c).weight for c in group.consumers]
        width = _producer_width(block, group)

        best: tuple[float, float | None] = (current, None)
        for alpha in alphas:
            trial = copy.deepcopy(block)
            apply_smoothing(trial, group, smoothing_scales(x_absmax, weights, alpha, width, group.head_dim))
            loss = _quantized_loss(trial, x_search, y_search, kwargs, schemes, act, batch_size)
            if loss < best[0]:
                best = (loss, alpha)
        if best[1] is not None:
            apply_smoothing(block, group, smoothing_scales(x_absmax, weights, best[1], width, group.head_dim))
        chosen[group.producer] = best[1]
        current = best[0]
    return chosen
