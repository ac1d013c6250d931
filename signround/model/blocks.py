"""Find a model's decoder blocks and decide each linear layer's scheme.

Blocks are found structurally, not from a per-architecture table: the decoder is the largest
``nn.ModuleList`` whose children are all of one class and contain linear layers (LLaMA's
``model.layers``, OPT's ``model.decoder.layers``, GPT-NeoX's ``gpt_neox.layers``, ...).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch
from torch import nn

from signround.config import LayerRule, QuantScheme
from signround.errors import SignRoundError


class Planned(NamedTuple):
    """A linear layer that is (or will be) quantized: what an exporter must be able to store.

    ``name`` is the full module name (``model.layers.0.self_attn.q_proj``); the weight is
    ``[out_features, in_features]``."""

    name: str
    scheme: QuantScheme
    in_features: int
    out_features: int


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(qualified name, ModuleList)`` of the repeated decoder blocks.

    Raises:
        SignRoundError: no list of repeated blocks with linear layers exists (unsupported architecture).
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise SignRoundError(
            f"unsupported architecture {type(model).__name__}: no repeated decoder blocks with nn.Linear layers found"
        )
    return best[1], best[2]


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers inside one block, by name relative to the block, in module order."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def resolve_schemes(
    prefix: str, block: nn.Module, base: QuantScheme, rules: tuple[LayerRule, ...] = ()
) -> dict[str, QuantScheme]:
    """Scheme of each linear in ``block`` (relative name -> scheme); layers kept in float are absent.

    Rules are matched (``re.search``) against the full name ``prefix.name``; the last matching rule
    wins, so general rules go first and specific ones after.
    """
    schemes: dict[str, QuantScheme] = {}
    for name, layer in block_linears(block).items():
        full = f"{prefix}.{name}"
        scheme: QuantScheme | None = base
        for rule in rules:
            if re.search(rule.pattern, full):
                scheme = rule.scheme
        if scheme is None:
            continue
        check_layer_scheme(full, layer, scheme)
        schemes[name] = scheme
    return schemes


def check_layer_scheme(full_name: str, layer: nn.Linear, scheme: QuantScheme) -> None:
    """Refuse group sizes larger than the layer's input width (a padded group would be mostly zeros)."""
    if scheme.group_size > layer.in_features:
        raise SignRoundError(
            f"group size {scheme.group_size} exceeds in_features {layer.in_features} of {full_name}; "
            f"use --group-size {layer.in_features} or smaller, or -1 (per channel)"
        )


_FINITE_CHUNK = 1 << 20


def check_finite(model: nn.Module, prefix: str = "") -> None:
    """Refuse a model (or one block of it) with NaN or Inf in any floating-point parameter; parameters on
    the meta device are skipped. ``prefix`` is put before each parameter's name in the message.

    The check runs on slices of about :data:`_FINITE_CHUNK` elements: ``torch.isfinite(p).all()`` on a
    whole parameter allocates temporaries larger than p (an ``abs`` copy in p's dtype and bool tensors),
    which on a large vocabulary's embedding more than doubled the peak memory of loading. The slices are
    also faster (they stay in cache).

    Raises:
        SignRoundError: a parameter holds NaN or Inf.
    """
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.device.type != "meta" and not _all_finite(p.detach()):
            raise SignRoundError(f"weight {prefix}{name} contains NaN or Inf; the model file is corrupt")


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite, checked on slices of whole rows along the first dimension
    (about :data:`_FINITE_CHUNK` elements, at least one row; non-contiguous views are fine)."""
    if t.dim() == 0:
        return bool(torch.isfinite(t))
    if t.numel() == 0:
        return True
    rows = max(1, _FINITE_CHUNK // max(1, t[0].numel()))
    return all(bool(torch.isfinite(t[i : i + rows]).all()) for i in range(0, t.shape[0], rows))


# safetensors dtype names -> torch dtypes (the names the format's header uses)
