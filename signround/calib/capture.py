"""Capture what the first decoder block receives: hidden states plus the keyword arguments
(attention mask, position ids, rotary embeddings, ...) the model passes to every block."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from signround.errors import SignRoundError


class _Stop(Exception):
    """Raised by the hook once block 0's inputs are recorded; nothing after it needs to run."""


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, block: nn.Module, tokens: torch.Tensor
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run the model on each sample up to ``block`` and record its inputs.

    Args:
        model: the causal LM.
        block: its first decoder block.
        tokens: ``[n, seqlen]`` int64.

    Returns:
        ``(hidden [n, seqlen, hidden] in the model's dtype, kwargs)``. The keyword arguments are those of the first
        sample (batch dimension 1); with equal-length unpadded samples they are the same for all samples
        and broadcast over any batch size.
    """
    hidden: list[torch.Tensor] = []
    captured: dict[str, Any] = {}

    def hook(_module, args, kwargs):
        x = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(x.detach().cpu())
        if not captured:
            captured.update({k: _detach(v) for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")})
            extra = args[1:]
            if extra:
                raise SignRoundError(
                    f"unsupported architecture: {type(block).__name__} takes {len(extra)} extra positional "
                    "arguments; only blocks called as block(hidden_states, **kwargs) are supported"
                )
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for row in tokens:
            try:
                model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(hidden), captured


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    return value


def block_output(output: Any) -> torch.Tensor:
    """Hidden states out of a block's return value (a tensor, or a tuple whose first item is one)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def to_device(value: Any, device: torch.device) -> Any:
    """Move tensors (also inside tuples) of captured kwargs to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value
