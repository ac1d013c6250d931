"""Automatic mixed precision: per-layer bit widths for an exact storage budget (AdaQuant-style)."""

from signround.mixed.allocate import solve_greedy, solve_ilp
from signround.mixed.budget import budget_bits, layer_bits, parse_size
from signround.mixed.plan import Allocation, MixedSpec, allocate_bits
from signround.mixed.units import ExpertUnits

__all__ = [
    "Allocation",
    "ExpertUnits",
    "MixedSpec",
    "allocate_bits",
    "budget_bits",
    "layer_bits",
    "parse_size",
    "solve_greedy",
    "solve_ilp",
]
