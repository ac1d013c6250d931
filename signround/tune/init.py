"""Where SignRound starts: clipping factors chosen by a grid search weighted by input activation power.

SignRound starts every group unclipped (factors 1) and moves its clipping factors by at most the sum of its
decaying step sizes (half of ``minmax_lr * iters``: 0.5 at the default step size). At 2 and 3 bits the best
clipping of many groups lies further away than that. llama.cpp's imatrix quantization picks each group's
scale by minimizing the weight error weighted by the mean square of the inputs each weight multiplies
(the diagonal of the layer's Hessian); :func:`search_clipping` does the same over a shared shrink ratio of
the group's extremes, and tuning starts from the result.

Shapes: grouped weights ``[out, groups, g]`` (:func:`signround.primitives.to_groups`), per-group tensors
``[out, groups]``, per-input-channel tensors ``[in]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from signround.primitives import to_groups
from signround.tune.wrapper import TunableWeight

# Shrink ratios of the group extremes tried by the search: 1.0 (no clipping) down to 0.5.
RATIOS = tuple(1.0 - 0.05 * k for k in range(11))


class InputPower:
    """Mean square of each input channel of some linears, accumulated over forward calls.

    ``with power.recording(modules): ...`` registers forward pre-hooks for the duration; ``power[name]``
    is then ``[in]`` float32: the mean over all tokens seen of ``x[..., j] ** 2``.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    @contextlib.contextmanager
    def recording(self, modules: dict[str, nn.Module]) -> Iterator[InputPower]:
        handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            flat = x.reshape(-1, x.shape[-1])
            sq = torch.linalg.vector_norm(flat, dim=0, dtype=torch.float32).square()
            self._sums[name] = self._sums[name] + sq if name in self._sums else sq
            self._counts[name] = self._counts.get(name, 0) + flat.shape[0]

        return hook

    def __contains__(self, name: str) -> bool:
        return name in self._sums

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._sums[name] / max(self._counts[name], 1)


def weighted_group_error(wg: torch.Tensor, wq: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum_j weight_j * (wq - wg)_j^2`` per group: ``[out, groups]`` from ``wg``, ``wq`` ``[out, groups, g]``
    and ``weight`` ``[groups, g]`` (an input channel's importance, shared by all output rows)."""
    return ((wq - wg).square() * weight).sum(-1)


@torch.no_grad()
def search_clipping(t: TunableWeight, power: torch.Tensor | None, ratios: Sequence[float] = RATIOS) -> torch.Tensor:
    """The shrink ratio per group ``[out, groups]`` (one of ``ratios``) whose quantize-dequantize of ``t.wg``
    has the least error weighted by ``power`` (``[in]``, the inputs' mean square; None: unweighted), with
    both clipping factors set to that ratio and no rounding offset. Ties keep the earlier ratio (1.0 first)."""
    if power is None:
        weight = torch.ones(t.wg.shape[1:], device=t.wg.device)
    else:
        weight = to_groups(power.reshape(1, -1).float(), t.scheme.group_size)[0]
    shape = t.stats[0].shape
    errors = []
    for r in ratios:
        factor = torch.full(shape, float(r), device=t.wg.device)
        errors.append(weighted_group_error(t.wg, t.grouped_fake_quant(factor, factor), weight))
    best = torch.stack(errors).argmin(0)  # the first minimum on ties
    return torch.tensor(ratios, dtype=torch.float32, device=t.wg.device)[best]


@torch.no_grad()
def init_clipping(tunables: dict[str, TunableWeight], power: InputPower) -> None:
    """Set every tunable's clipping factors to :func:`search_clipping`'s ratios (weighted by ``power``
    where it recorded the layer)."""
    for name, t in tunables.items():
        ratio = search_clipping(t, power[name] if name in power else None)
        t.min_factor.copy_(ratio)
        t.max_factor.copy_(ratio)
