"""Per-layer choice of the number format (LLM-FP4's format search): each quantized linear gets the grid,
among a few of the same width, whose round-to-nearest error on the calibration activations is least.

LLM-FP4 searches, per layer, the floating-point format's exponent/mantissa split (e2m1, e1m2, e3m0 at 4
bits), its exponent bias and its clipping range. Here the bias is absorbed by the per-group scale (a
power-of-two factor of it) and the clipping range is what SignRound learns afterwards; what is searched is
the grid, from any candidates of one width (e.g. ``fp4_e2m1,fp4_e1m2,fp4_e3m0`` or ``int,fp4_e2m1``).

The error of a layer ``W [out, in]`` quantized to ``Q`` is the expected output error on its calibration
inputs ``x``, with the inputs' channel correlations dropped (the diagonal of ``E[x x^T]``, llama.cpp's
importance matrix): ``sum_ij E[x_j^2] (W_ij - Q_ij)^2``. Inputs are collected from one forward pass of the
float model over the calibration tokens.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from signround.config import LayerRule, QuantScheme
from signround.formats import get_format
from signround.model.blocks import find_blocks
from signround.primitives import from_groups, to_groups


@torch.no_grad()
def rtn_error(weight: torch.Tensor, x2: torch.Tensor, scheme: QuantScheme) -> float:
    """``sum_ij x2_j (W_ij - Q_ij)^2`` for ``weight [out, in]``, round-to-nearest onto ``scheme``, and the
    inputs' per-channel mean squares ``x2 [in]``."""
    fmt = get_format(scheme.dtype)
    wg = to_groups(weight.float(), scheme.group_size)
    scale, zero = fmt.choose_qparams(fmt.group_minmax(wg), scheme)
    q = from_groups(fmt.fake_quant(wg, scale, zero, scheme.bits), weight.shape[1])
    return float(((q - weight.float()).pow(2) * x2.float()).sum())


@torch.no_grad()
def input_second_moments(model: nn.Module, tokens: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """``{name: E[x^2] [in]}``: each listed linear's mean squared input per channel over ``tokens [n, seq]``
    (one float forward pass, one sequence at a time)."""
    sums: dict[str, torch.Tensor] = {}
    counts: Counter = Counter()

    def hook(module: nn.Module, args: tuple, name: str) -> None:
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
        counts[name] += x.shape[0]

    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n in names]
    try:
        for row in tokens:
            model(row.unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in names if n in sums}


@dataclass
class FormatChoice:
    """The chosen scheme per layer and every candidate's error (``errors[name][dtype]``)."""

    choice: dict[str, QuantScheme]
    errors: dict[str, dict[str, float]] = field(default_factory=dict)

    def rules(self) -> tuple[LayerRule, ...]:
        """One exact-name layer rule per layer (appended after the user's rules, so they win last)."""
        import re

        return tuple(LayerRule(f"^{re.escape(n)}$", s) for n, s in self.choice.items())

    def counts(self) -> dict[str, int]:
        return dict(Counter(s.dtype.value for s in self.choice.values()))

    def to_config(self) -> dict:
        """What goes into ``quantization_config["format_search"]``."""
        return {"candidates": sorted({k for e in self.errors.values() for k in e}), "counts": self.counts()}


def choose_formats(
    model: nn.Module, tokens: torch.Tensor, candidates: tuple[QuantScheme, ...], names: list[str] | None = None
) -> FormatChoice:
    """For every linear of the decoder blocks (or ``names``), the candidate with the least :func:`rtn_error`
    on the inputs the float model gives it on ``tokens``; ties go to the earlier candidate."""
    if names is None:
        prefix, blocks = find_blocks(model)
        names = [
            f"{prefix}.{i}.{n}" for i, b in enumerate(blocks) for n, m in b.named_modules() if isinstance(m, nn.Linear)
        ]
    x2 = input_second_moments(model, tokens, names)
    choice, errors = {}, {}
    for name in names:
        weight = model.get_submodule(name).weight
        errs = {s.dtype.value: rtn_error(weight, x2[name], s) for s in candidates}
        errors[name] = errs
        best = min(range(len(candidates)), key=lambda k: errs[candidates[k].dtype.value])
        choice[name] = candidates[best]
    return FormatChoice(choice, errors)
