"""Signed gradient descent with a linearly decaying step size (SignRound's optimizer)."""

from __future__ import annotations

import torch


def linear_decay(lr: float, step: int, total: int) -> float:
    """Step size at ``step`` (0-based) of ``total``: ``lr * (1 - step/total)``, reaching 0 after the last step."""
    return lr * max(0.0, 1.0 - step / max(total, 1))


@torch.no_grad()
def sign_step(params: list[torch.Tensor], lr: float) -> None:
    """``p -= lr * sign(p.grad)`` for each parameter with a gradient, then clear the gradient."""
    for p in params:
        if p.grad is not None:
            p.sub_(torch.sign(p.grad), alpha=lr)
            p.grad = None
