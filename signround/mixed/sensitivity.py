"""How much each layer group suffers at each bit width: measured, and a cheap Fisher proxy.

* ``block`` (measured, default): for every decoder block, on float inputs, quantize one group of linears
  to one option by round-to-nearest, keep everything else float, and weigh the error of the block's
  output by the squared gradient of the model's language-model loss with respect to that output
  (``0.5 * sum G * (y_q - y)^2``, the output-side Fisher of BRECQ): an estimate of the increase in the
  final loss, so errors in blocks whose output the rest of the model amplifies or ignores count as
  such. Costs one forward and backward per calibration sequence plus one block forward per
  (group, option).
* ``block-mse``: the same without the weight, the plain mean squared error of the block output. Its
  scale follows the residual stream's, which grows with depth, so it over-protects late blocks.
* ``fisher`` (proxy): ``0.5 * sum F * (W_q - W)^2`` with ``F`` the diagonal empirical Fisher of the
  model's language-model loss (mean of per-sequence squared gradients), a second-order estimate of the
  increase in the final loss. Costs one forward and backward per calibration sequence.

Groups are the linears that read the same input tensor (q/k/v, gate/up): serving engines fuse them
into one matmul, so they share one choice. Results are ``[groups, options]`` float64 arrays.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from signround.calib.capture import block_output, capture_block_inputs, capture_block_kwargs
from signround.config import QuantScheme
from signround.tune.wrapper import TunableWeight


def fused_groups(block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any], names: list[str]) -> list[list[str]]:
    """Partition ``names`` (linears of ``block``, relative names) into groups that read the same input.

    Runs ``block`` once on ``x`` (one sample is enough) with hooks that keep each linear's input
    tensor alive, so identity comparison is exact. Groups come in module order.
    """
    seen: dict[str, torch.Tensor] = {}
    modules = dict(block.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda _m, args, n=n: seen.setdefault(n, args[0])) for n in names]
    try:
        with torch.no_grad():
            block(x, **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    for n in names:
        for group in groups:
            if n in seen and group[0] in seen and seen[n] is seen[group[0]]:
                group.append(n)
                break
        else:
            groups.append([n])
    return groups


@torch.no_grad()
def rtn_weight(layer: nn.Linear, scheme: QuantScheme) -> torch.Tensor:
    """Round-to-nearest quantized-dequantized weight ``[out, in]`` in the layer's dtype."""
    return TunableWeight.from_linear(layer, scheme, learn=False).fake_quant_weight(layer.weight.dtype)


@torch.no_grad()
def _forward(block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any], batch: int) -> torch.Tensor:
    return torch.cat([block_output(block(x[i : i + batch], **kwargs)) for i in range(0, x.shape[0], batch)])


@torch.no_grad()
def block_sensitivity(
    block: nn.Module,
    x: torch.Tensor,
    kwargs: dict[str, Any],
    groups: list[list[str]],
    options: list[dict[str, QuantScheme]],
    batch: int = 8,
    weight: torch.Tensor | None = None,
) -> tuple[np.ndarray, torch.Tensor]:
    """Output error of ``block`` with one group quantized at a time.

    Args:
        x: ``[n, seqlen, hidden]`` float inputs of the block.
        groups: lists of relative linear names.
        options: per option, the scheme of every grouped linear (name -> scheme).
        weight: ``[n, seqlen, hidden]`` per-element weights of the squared error (see
            :func:`output_fisher`); the cost is then ``0.5 * sum(weight * err^2) / n``. Without it the
            cost is the mean squared error.

    Returns:
        ``(cost [groups, options], float outputs [n, seqlen, hidden])``.
    """
    modules = dict(block.named_modules())
    target = _forward(block, x, kwargs, batch).float()
    cost = np.zeros((len(groups), len(options)))
    for g, names in enumerate(groups):
        originals = {n: modules[n].weight.data for n in names}
        for o, schemes in enumerate(options):
            for n in names:
                modules[n].weight.data = rtn_weight(modules[n], schemes[n])
            out = _forward(block, x, kwargs, batch).float()
            err = (out - target) ** 2
            cost[g, o] = err.mean().item() if weight is None else 0.5 * float((weight * err).sum()) / x.shape[0]
            for n in names:
                modules[n].weight.data = originals[n]
    return cost, target.to(x.dtype)


def measure_blocks(
    model: nn.Module,
    blocks: nn.ModuleList,
    tokens: torch.Tensor,
    groups: list[list[list[str]]],
    options: list[list[dict[str, QuantScheme]]],
    progress: bool = True,
    weighted: bool = True,
) -> list[np.ndarray]:
    """:func:`block_sensitivity` of every block on float inputs propagated through the float model.
    ``groups[i]`` / ``options[i]`` belong to block ``i``; returns one cost array per block. ``weighted``
    weighs each block's output error by :func:`output_fisher`."""
    weights = output_fisher(model, blocks, tokens) if weighted else None
    x, _ = capture_block_inputs(model, blocks[0], tokens)
    kwargs = capture_block_kwargs(model, blocks, tokens[0])  # per block: a sliding-window layer has its own mask
    costs = []
    for i, block in enumerate(tqdm(blocks, desc="sensitivity", unit="block", disable=not progress, file=sys.stderr)):
        w = None if weights is None else weights[i].float()
        cost, x = block_sensitivity(block, x, kwargs[i], groups[i], options[i], weight=w)
        costs.append(cost)
    return costs


def output_fisher(model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Squared gradient of the LM loss w.r.t. every block's output, one sequence at a time.

    ``tokens [n, seqlen]``; returns per block ``[n, seqlen, hidden]`` bfloat16 (on CPU; bfloat16 keeps
    float32's range, and these only weigh a sum). No parameter gradient is computed: the first
    block's input is made a leaf that requires grad, and the model's ``requires_grad`` flags are
    restored afterwards. Memory: ``2 * blocks * n * seqlen * hidden`` bytes.
    """
    grads: list[list[torch.Tensor]] = [[] for _ in blocks]

    def leaf_input(_module, args, kwargs):
        if args:
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        kwargs["hidden_states"] = kwargs["hidden_states"].detach().requires_grad_(True)
        return args, kwargs

    def keep(i):
        def hook(_module, _args, output):
            out = block_output(output)
            out.register_hook(lambda g: grads[i].append((g.float() ** 2).to(torch.bfloat16).cpu()))

        return hook

    handles = [blocks[0].register_forward_pre_hook(leaf_input, with_kwargs=True)]
    handles += [b.register_forward_hook(keep(i)) for i, b in enumerate(blocks)]
    device = next(model.parameters()).device
    try:
        with _grad_only(model, []), torch.enable_grad():
            for row in tokens:
                ids = row.unsqueeze(0).to(device)
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(g) for g in grads]


@contextmanager
def _grad_only(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Within the block only ``params`` require grad; the model's ``requires_grad`` flags are restored after."""
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def fisher_diagonal(model: nn.Module, tokens: torch.Tensor, layers: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """Mean over sequences of the squared gradient of the LM loss w.r.t. each named linear's weight.

    ``tokens [n, seqlen]``; returns name -> ``[out, in]`` float32. Only those weights require grad
    during the passes; the model's ``requires_grad`` flags are restored afterwards.
    """
    fisher = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in layers.items()}
    device = next(model.parameters()).device
    with _grad_only(model, [m.weight for m in layers.values()]):
        for row in tokens:
            ids = row.unsqueeze(0).to(device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            for n, m in layers.items():
                fisher[n] += m.weight.grad.float() ** 2
                m.weight.grad = None
    return {n: f / len(tokens) for n, f in fisher.items()}


@torch.no_grad()
def fisher_cost(
    layers: dict[str, nn.Linear],
    fisher: dict[str, torch.Tensor],
    groups: list[list[str]],
    options: list[dict[str, QuantScheme]],
) -> np.ndarray:
    """``[groups, options]`` of ``0.5 * sum F * (W_q - W)^2`` over each group's layers (full names)."""
    cost = np.zeros((len(groups), len(options)))
    for g, names in enumerate(groups):
        for o, schemes in enumerate(options):
            total = 0.0
            for n in names:
                delta = rtn_weight(layers[n], schemes[n]).float() - layers[n].weight.float()
                total += 0.5 * float((fisher[n] * delta**2).sum())
            cost[g, o] = total
    return cost
