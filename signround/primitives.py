"""Small pure tensor helpers shared by every format; nothing here knows about models."""

from __future__ import annotations

import math

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even) with a straight-through gradient: d round(x)/dx := 1."""
    return x + (torch.round(x) - x).detach()


def num_groups(in_features: int, group_size: int) -> int:
    """Groups per row; the last one is partial (zero-padded) when ``group_size`` does not divide."""
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def effective_group_size(in_features: int, group_size: int) -> int:
    """The group length actually used: the whole row for ``group_size == -1``."""
    return in_features if group_size == -1 else group_size


def to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Reshape a weight ``[out, in]`` to ``[out, groups, g]``, zero-padding the input dimension.

    Group ``k`` holds input columns ``k*g .. k*g+g-1``. Padding zeros never change a group's
    min/max because both are widened to include 0 anyway.
    """
    out_features, in_features = w.shape
    g = effective_group_size(in_features, group_size)
    pad = num_groups(in_features, group_size) * g - in_features
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(out_features, -1, g)


def from_groups(wg: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`to_groups`: ``[out, groups, g]`` -> ``[out, in]`` (padding dropped)."""
    return wg.reshape(wg.shape[0], -1)[:, :in_features]
