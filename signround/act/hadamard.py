"""Hadamard transforms of activations at run time (an *online* rotation, QuaRot's term).

A linear whose weight absorbed an orthogonal ``Q`` on its input side (``W <- W Q``) computes the same output
when its input is rotated the same way (``x <- x Q``): :class:`OnlineHadamard` is that input rotation, a forward
pre-hook registered first on the layer (:func:`attach`), so the activation quantizer and any calibration
recorder registered after it see ``x Q``. ``Q = diag(s) (R_m kron H_b) / sqrt(b)``: ``b`` the largest power of two
dividing the width, ``H_b`` Sylvester's Hadamard matrix, ``R_m`` a seeded random orthogonal matrix of the odd
factor ``m``, ``s`` seeded random signs (:mod:`signround.model.rotate` folds the same construction into weights).
"""

from __future__ import annotations

import torch
from torch import nn


def sylvester(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix ``[n, n]`` (entries +-1) for ``n`` a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_factors(width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(s [width], R_m [m, m], b)`` float64 of ``Q`` (module docstring), the same for the same ``(width, seed)``."""
    b = width & -width  # the largest power of two dividing width
    m = width // b
    gen = torch.Generator().manual_seed(seed)
    r = torch.ones(1, 1, dtype=torch.float64)
    if m > 1:
        r, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    signs = torch.randint(0, 2, (width,), generator=gen).to(torch.float64) * 2 - 1
    return signs, r.contiguous(), b


class OnlineHadamard:
    """``x [..., width] -> x Q`` with ``Q = random_hadamard(width, seed)``, computed without forming ``Q``:
    ``x`` times the signs, viewed ``[..., m, b]``, is multiplied by ``H_b / sqrt(b)`` on the right and by
    ``R_m^T`` on the left (``(x Q)[k, l] = (R^T (x s) H)[k, l]``), in float32, and returned in ``x``'s dtype.
    Used as a forward pre-hook of the linear whose weight absorbed ``Q`` (:func:`attach`)."""

    def __init__(self, width: int, seed: int):
        self.width, self.seed = width, seed
        signs, r, b = hadamard_factors(width, seed)
        self.m, self.b = width // b, b
        self._factors = (signs.float(), r.T.float().contiguous(), (sylvester(b) / b**0.5).float())
        self._on: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def record(self, module: str) -> dict:
        return {"module": module, "kind": "randomized-hadamard", "width": self.width, "seed": self.seed}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.device not in self._on:
            self._on[x.device] = tuple(t.to(x.device) for t in self._factors)
        signs, r_t, hb = self._on[x.device]
        y = (x.float() * signs).reshape(*x.shape[:-1], self.m, self.b) @ hb
        if self.m > 1:
            y = r_t @ y
        return y.reshape(x.shape).to(x.dtype)

    def __call__(self, _module: nn.Module, args: tuple) -> tuple:
        return (self.apply(args[0]), *args[1:])


def online_of(module: nn.Module) -> OnlineHadamard | None:
    """The :class:`OnlineHadamard` pre-hook of ``module``, or None."""
    return next((h for h in module._forward_pre_hooks.values() if isinstance(h, OnlineHadamard)), None)


def attach(module: nn.Module, op: OnlineHadamard | None) -> None:
    """Make ``op`` ``module``'s only :class:`OnlineHadamard` pre-hook (None: remove it). Registered first, it
    runs before hooks added later (an activation quantizer, a calibration recorder), which see ``x Q``."""
    hooks = module._forward_pre_hooks
    for key in [k for k, h in hooks.items() if isinstance(h, OnlineHadamard)]:
        del hooks[key]
    if op is not None:
        module.register_forward_pre_hook(op, prepend=True)


def carry_online(old: nn.Module, new: nn.Module) -> None:
    """``new`` replaces ``old`` in the model (a quantized layer for the float one): it keeps ``old``'s
    online rotation."""
    op = online_of(old)
    if op is not None:
        attach(new, op)


def online_layers(model: nn.Module) -> list[str]:
    """Names of ``model``'s modules that rotate their input online."""
    return [name for name, m in model.named_modules() if online_of(m) is not None]
