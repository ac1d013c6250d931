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


class SignStepInBackward:
    """Apply :func:`sign_step` to each parameter the moment backward has accumulated its gradient, and free
    that gradient, so no two of them are held at once (a float32 tensor per weight less at the peak of the
    backward, when every offset's gradient would otherwise coexist). Set :attr:`lr` before each backward;
    the result equals calling :func:`sign_step` after it. Use as a context manager (removes the hooks)."""

    def __init__(self, params: list[torch.Tensor]):
        self.lr = 0.0
        self._params = params
        self._handles: list = []

    def _step(self, p: torch.Tensor) -> None:
        sign_step([p], self.lr)

    def __enter__(self) -> SignStepInBackward:
        self._handles = [p.register_post_accumulate_grad_hook(self._step) for p in self._params]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
