"""Capture what the decoder blocks receive: the first block's hidden states, and each block's keyword
arguments (attention mask, position ids, rotary embeddings, ...). Models with several attention types
(sliding-window and full layers: Gemma-3, gpt-oss, Qwen2/Qwen3 with ``use_sliding_window``) pass each
block the mask, and Gemma-3 the rotary embeddings, of its own type."""

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
            captured.update(_call_kwargs(kwargs))
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


@torch.no_grad()
def capture_block_kwargs(model: nn.Module, blocks: nn.ModuleList, sample: torch.Tensor) -> list[dict[str, Any]]:
    """The keyword arguments the model passes to each of ``blocks`` for one ``sample`` ``[seqlen]`` int64
    (broadcastable over any batch of equal-length unpadded samples, as :func:`capture_block_inputs`' are).

    Each block's forward is swapped for a pass-through for the duration (hidden states unchanged, the
    block's attributes such as its attention type still read by the model's loop), so only the embedding
    and the mask and rotary computations run; the model stops at the last block. Works on a skeleton
    whose blocks are on the meta device."""
    captured: list[dict[str, Any]] = []
    last = len(blocks) - 1

    def passthrough(i: int):
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            x = args[0] if args else kwargs.pop("hidden_states")
            captured.append(_call_kwargs(kwargs))
            if i == last:
                raise _Stop
            return x

        return forward

    for i, block in enumerate(blocks):
        block.forward = passthrough(i)  # an instance attribute: nn.Module.__call__ calls it instead
    device = next(model.parameters()).device
    try:
        model(input_ids=sample.unsqueeze(0).to(device), use_cache=False)
    except _Stop:
        pass
    finally:
        for block in blocks:
            del block.forward
    if len(captured) != len(blocks):
        raise SignRoundError(f"the model called {len(captured)} of its {len(blocks)} decoder blocks; unsupported")
    return captured


def _call_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A block call's keyword arguments to keep (detached), without the generation cache ones."""
    return {k: _detach(v) for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}


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
