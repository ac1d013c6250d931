"""Choosing one option per layer group under a storage budget (pure functions on arrays).

Inputs shared by both solvers: ``cost [groups, options]`` (sensitivity: the loss increase when the
group alone takes that option; ``inf`` forbids it) and ``size [groups, options]`` (storage bits, exact
integers). Both return ``choice [groups]``, an option index per group, whose total size never exceeds
``budget``.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from signround.errors import SignRoundError


def _check(cost: np.ndarray, size: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    cost, size = np.asarray(cost, dtype=np.float64), np.asarray(size, dtype=np.int64)
    if cost.shape != size.shape or cost.ndim != 2 or cost.size == 0:
        raise ValueError(f"cost {cost.shape} and size {size.shape} must be equal non-empty [groups, options]")
    if np.isnan(cost).any():
        raise SignRoundError("a sensitivity is NaN; the model or its calibration data produce non-finite outputs")
    allowed = np.isfinite(cost)
    if not allowed.any(axis=1).all():
        raise ValueError("every group needs at least one allowed option")
    floor = int(np.where(allowed, size, np.iinfo(np.int64).max).min(axis=1).sum())
    if floor > budget:
        raise SignRoundError(
            f"the budget is below the smallest possible size ({floor} > {budget} bits); "
            "raise --avg-bits/--target-size or add a lower --bit-options value"
        )
    return cost, size


def total_size(size: np.ndarray, choice: np.ndarray) -> int:
    """Exact total bits of ``choice`` (integer arithmetic)."""
    return int(np.asarray(size, dtype=np.int64)[np.arange(len(choice)), choice].sum())


def solve_ilp(cost: np.ndarray, size: np.ndarray, budget: int, time_limit: float = 60.0) -> np.ndarray:
    """Minimize ``sum cost[g, choice[g]]`` subject to ``sum size[g, choice[g]] <= budget`` exactly.

    A 0/1 integer program (one binary per group and option, one option per group) solved by HiGHS
    through ``scipy.optimize.milp``. The solver's feasibility tolerance (about 1e-6 of the largest
    group's size) could let an answer overshoot by a few bits, so the size is re-checked in integers
    and, on overshoot, the program is re-solved with the budget tightened by a growing margin: the
    answer never exceeds the budget, and it is optimal up to that margin.
    """
    cost, size = _check(cost, size, budget)
    n_groups, n_opts = cost.shape
    allowed = np.isfinite(cost).ravel()
    c = np.where(allowed, cost.ravel(), 0.0)
    scale = float(np.abs(c).max()) or 1.0
    one_each = LinearConstraint(np.kron(np.eye(n_groups), np.ones((1, n_opts))), 1, 1)
    unit = float(size.max())  # keep the size row near 1 for the solver; exactness is re-checked below
    limit, margin = budget, max(1, int(np.ceil(unit * 1e-6)))
    for _ in range(8):
        fits = LinearConstraint(size.reshape(1, -1) / unit, -np.inf, limit / unit)
        res = milp(
            c / scale,
            constraints=[one_each, fits],
            integrality=np.ones(c.size),
            bounds=Bounds(0, allowed.astype(float)),
            options={"time_limit": time_limit, "mip_rel_gap": 1e-6},
        )
        if res.x is None:
            raise SignRoundError(f"the bit-allocation program found no solution ({res.message})")
        choice = np.round(res.x).reshape(n_groups, n_opts).argmax(axis=1)
        over = total_size(size, choice) - budget
        if over <= 0:
            return choice
        limit -= max(over, margin)
        margin *= 4
    raise SignRoundError("the bit-allocation program kept exceeding the budget; report this with the command")


def solve_greedy(cost: np.ndarray, size: np.ndarray, budget: int) -> np.ndarray:
    """Greedy baseline: start every group at its smallest option, then repeatedly take the upgrade with
    the largest cost decrease per extra bit that still fits, until none does (auto-round's AutoScheme
    and HAWQ-style allocators work this way)."""
    cost, size = _check(cost, size, budget)
    allowed = np.isfinite(cost)
    choice = np.where(allowed, size, np.iinfo(np.int64).max).argmin(axis=1)
    used = total_size(size, choice)
    rows = np.arange(len(choice))
    while True:
        gain = cost[rows, choice][:, None] - cost
        extra = size - size[rows, choice][:, None]
        ok = allowed & (extra > 0) & (gain > 0) & (used + extra <= budget)
        if not ok.any():
            return choice
        ratio = np.where(ok, gain / np.maximum(extra, 1), -np.inf)
        g, o = np.unravel_index(np.argmax(ratio), ratio.shape)
        used += int(extra[g, o])
        choice[g] = o
