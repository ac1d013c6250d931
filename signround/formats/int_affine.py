"""Integer affine grid: ``w ~= (code - zero) * scale`` with ``code`` in ``[0, 2^bits - 1]``.

One formula serves both flavours:

* asymmetric: ``scale = (max*a - min*b) / (2^bits - 1)``, ``zero = round(-min*b / scale)``;
* symmetric "full range" (llama.cpp's trick, auto-round's default): ``zero = 2^(bits-1)`` and
  ``scale = m / -2^(bits-1)`` where ``m`` is the larger-magnitude extreme *with its sign*, so that
  extreme lands exactly on code 0 (signed value ``-2^(bits-1)``) and the scale may be negative.

``min``/``max`` are the group's extremes widened to include 0; ``a``/``b`` are SignRound's learned
clipping factors in [0, 1]. Scales are rounded through float16 (what the checkpoint stores), so the
tuned model and the saved one compute the same numbers. All tensors are grouped ``[out, groups, g]``
(see :func:`signround.primitives.to_groups`); per-group tensors are ``[out, groups]``.

The parameters are :class:`AffineParams` ``(scale, zero_point)``; :class:`IntAffineFormat` is this module's
registered format (its methods are the functions below).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch

from signround.formats.base import Layout, Scheme, WeightFormat, register_format
from signround.formats.dtype import DType
from signround.primitives import round_ste

SCALE_DTYPE = torch.float16
# Smallest |scale|: keeps all-zero groups finite (their codes are then all ``zero``).
MIN_SCALE = 1e-5


class AffineParams(NamedTuple):
    """Per-group parameters of an affine grid ``w ~= (code - zero_point) * scale``, both ``[out, groups]``
    (float32 while tuning; float16 / uint8 as :func:`from_stored` decodes them).

    Attributes:
        scale: the step (negative allowed on the symmetric grid: see the module docstring).
        zero_point: the code of 0 (integers in ``[0, 2^bits - 1]``; ``2^(bits-1)`` when symmetric).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor


def group_minmax(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(min, max)`` of ``wg [out, groups, g]``, widened to include 0; shapes ``[out, groups]``."""
    return wg.amin(dim=-1).clamp(max=0), wg.amax(dim=-1).clamp(min=0)


def clip_extremes(
    wmin: torch.Tensor, wmax: torch.Tensor, min_factor: torch.Tensor | None, max_factor: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SignRound's clipping: the group extremes ``[out, groups]`` times their factors clamped to [0, 1]
    (None: unclipped)."""
    if min_factor is not None:
        wmin = wmin * min_factor.clamp(0, 1)
    if max_factor is not None:
        wmax = wmax * max_factor.clamp(0, 1)
    return wmin, wmax


def compute_qparams(
    wmin: torch.Tensor,
    wmax: torch.Tensor,
    bits: int,
    sym: bool,
    min_factor: torch.Tensor | None = None,
    max_factor: torch.Tensor | None = None,
) -> AffineParams:
    """Scale and zero point per group, differentiable in the clipping factors.

    Args:
        wmin, wmax: ``[out, groups]`` group extremes (``wmin <= 0 <= wmax``).
        bits: grid width.
        sym: symmetric full-range grid when True.
        min_factor, max_factor: ``[out, groups]`` clipping factors, clamped to [0, 1]; None means 1.

    Returns:
        :class:`AffineParams` ``(scale, zero)``, both ``[out, groups]`` float32; ``scale`` holds
        float16-representable values, ``zero`` holds integers in ``[0, 2^bits-1]`` (rounded with a
        straight-through gradient).
    """
    wmin, wmax = clip_extremes(wmin, wmax, min_factor, max_factor)
    maxq = 2**bits - 1
    if sym:
        half = 2 ** (bits - 1)
        extreme = torch.where(-wmin > wmax, wmin, wmax)
        scale = fp16_round(extreme / -half)
        scale = torch.where(scale < 0, scale.clamp(max=-MIN_SCALE), scale.clamp(min=MIN_SCALE))
        zero = torch.full_like(scale, float(half))
        return AffineParams(scale, zero)
    scale = fp16_round((wmax - wmin) / maxq).clamp(min=MIN_SCALE)
    zero = round_ste(-wmin / scale).clamp(0, maxq)
    return AffineParams(scale, zero)


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    """Round to float16 values, kept in ``x``'s dtype; the gradient passes through unchanged."""
    return x.to(SCALE_DTYPE).to(x.dtype)


def fake_quant(
    wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, v: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize-dequantize ``wg [out, groups, g]`` with the rounding offset ``v`` (same shape, or None).

    ``code = clamp(round(w / scale + v) + zero, 0, 2^bits - 1)``; returns ``(code - zero) * scale``.
    Gradients reach ``v``, ``scale`` and ``zero`` (and ``wg``) through the straight-through rounding
    (``d round(x) / dx := 1``) and the clamp (zero outside ``[0, 2^bits - 1]``); see :class:`FakeQuantSTE`.
    """
    return FakeQuantSTE.apply(wg, scale, zero, v, 2**bits - 1)


def _rounded(wg, s, z, v):
    """``(w / s, round(w / s + v) + z)`` (the rounding before the clamp) for grouped ``wg`` and unsqueezed
    ``s``, ``z``; the second is a fresh tensor the caller may change in place."""
    t = wg / s
    p = t + v if v is not None else t.clone()
    return t, p.round_().add_(z)


def _forward_values(wg, s, z, v, maxq: int):
    """:class:`FakeQuantSTE`'s forward for unsqueezed ``s``, ``z``: ``(clamp(round(w/s + v) + z) - z) * s``,
    in place on one temporary."""
    _, p = _rounded(wg, s, z, v)
    return p.clamp_(0, maxq).sub_(z).mul_(s)


def _backward_grads(grad, wg, s, z, v, maxq: int, need_s: bool, need_z: bool, need_v: bool):
    """:class:`FakeQuantSTE`'s backward: ``(g_w, g_s, g_z, g_v)`` (the last three None where not needed),
    recomputing the rounding."""
    t, p = _rounded(wg, s, z, v)
    g_in = grad * ((p >= 0) & (p <= maxq))  # the gradient that passes the clamp
    g_v = g_in * s if need_v else None
    g_z = (g_in - grad).mul_(s).sum(-1) if need_z else None
    g_s = p.clamp_(0, maxq).sub_(z).mul_(grad).sub_(t.mul_(g_in)).sum(-1) if need_s else None
    return g_in, g_s, g_z, g_v


# ``compiled_fake_quant(True)`` switches both passes to ``torch.compile`` of the same functions
_COMPILED = {"on": False}
_COMPILED_FNS: dict[str, Any] = {}


def _pass(fn):
    """``fn`` (:func:`_forward_values` or :func:`_backward_grads`), or its compiled version inside
    :func:`compiled_fake_quant` (compiled on first use, once per process; a new weight shape recompiles once,
    then shapes are dynamic)."""
    if not _COMPILED["on"]:
        return fn
    if fn.__name__ not in _COMPILED_FNS:
        _COMPILED_FNS[fn.__name__] = torch.compile(fn, fullgraph=True)
    return _COMPILED_FNS[fn.__name__]


@contextlib.contextmanager
def compiled_fake_quant(enabled: bool) -> Iterator[None]:
    """``with compiled_fake_quant(True): ...`` runs :func:`fake_quant`'s forward and backward through
    ``torch.compile`` (one fused loop each instead of about 5 and 15 passes over each weight). The forward's
    values equal the eager ones bit for bit; the per-group gradient sums may differ in the last bits
    (inductor's reduction order). ``False`` leaves the eager path on."""
    before = _COMPILED["on"]
    _COMPILED["on"] = enabled or before
    try:
        yield
    finally:
        _COMPILED["on"] = before


class FakeQuantSTE(torch.autograd.Function):
    """:func:`fake_quant` with the straight-through gradients of composing ``round_ste``, ``clamp`` and the
    affine maps, but saving only its inputs: the backward recomputes the rounding, so no weight-sized
    intermediate lives from the forward to the backward (composed ops keep two float32 tensors per weight,
    the clamp's input and ``code - zero``), and both passes work in place on one or two temporaries.
    With ``y = (clamp(p) - z) * s``, ``p = round(w/s + v) + z`` and ``m`` the mask ``0 <= p <= maxq``:
    ``dy/dv = m s``, ``dy/dw = m``, ``dy/dz = (m - 1) s`` and ``dy/ds = clamp(p) - z - m w / s``;
    per-group gradients are summed over the group. Values equal the composed ops' bit for bit."""

    @staticmethod
    def forward(ctx, wg, scale, zero, v, maxq):
        ctx.save_for_backward(wg, scale, zero, v)
        ctx.maxq = maxq
        return _pass(_forward_values)(wg, scale.unsqueeze(-1), zero.unsqueeze(-1), v, maxq)

    @staticmethod
    def backward(ctx, grad):
        wg, scale, zero, v = ctx.saved_tensors
        need_w, need_s, need_z, need_v = ctx.needs_input_grad[:4]
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        g_in, g_s, g_z, g_v = _pass(_backward_grads)(grad, wg, s, z, v, ctx.maxq, need_s, need_z, need_v)
        return (g_in if need_w else None), g_s, g_z, g_v, None


@torch.no_grad()
def quantize_codes(
    wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, v: torch.Tensor | None = None
) -> torch.Tensor:
    """Integer codes ``[out, groups, g]`` (uint8, values in ``[0, 2^bits - 1]``) for the same rounding
    as :func:`fake_quant`."""
    _, code = _rounded(wg, scale.unsqueeze(-1), zero.unsqueeze(-1), v)
    return code.clamp_(0, 2**bits - 1).to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(codes - zero) * scale`` for grouped ``codes [out, groups, g]`` and ``[out, groups]`` params."""
    return (codes.to(scale.dtype) - zero.unsqueeze(-1).to(scale.dtype)) * scale.unsqueeze(-1)


# ---------------------------------------------------------------- storage (QuantLinear buffers)


def stored_layout(scheme: Scheme, out_features: int, groups: int) -> Layout:
    """Buffers a ``QuantLinear`` holds besides ``qweight``: ``scales`` float16 ``[out, groups]``, and
    ``qzeros`` uint8 ``[out, groups]`` for asymmetric schemes (symmetric ones use the constant 2^(bits-1))."""
    layout = {"scales": ((out_features, groups), SCALE_DTYPE)}
    if not scheme.sym:
        layout["qzeros"] = ((out_features, groups), torch.uint8)
    return layout


def to_stored(scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme) -> dict[str, torch.Tensor]:
    """``(scale, zero)`` from :func:`compute_qparams` -> the buffers of :func:`stored_layout` (exact)."""
    stored = {"scales": scale.detach().to(SCALE_DTYPE)}
    if not scheme.sym:
        stored["qzeros"] = zero.detach().to(torch.uint8)
    return stored


def from_stored(stored: dict[str, torch.Tensor], scheme: Scheme) -> AffineParams:
    """Inverse of :func:`to_stored`: ``(scale float16, zero uint8)``, both ``[out, groups]``."""
    scale = stored["scales"]
    if scheme.sym:
        return AffineParams(scale, torch.full_like(scale, 2 ** (scheme.bits - 1), dtype=torch.uint8))
    return AffineParams(scale, stored["qzeros"])


def group_bits(scheme: Scheme) -> int:
    """Storage bits per group besides the codes: a float16 scale and, when asymmetric, a ``bits``-wide zero
    point (how auto_round / GPTQ checkpoints pack zeros)."""
    return 16 + (0 if scheme.sym else scheme.bits)


# ---------------------------------------------------------------- the registered format


@register_format
class IntAffineFormat(WeightFormat):
    """The integer affine grid: this module's functions as a :class:`~signround.formats.base.WeightFormat`
    (the width and the symmetry are the scheme's)."""

    dtype = DType.INT
    implied_bits = None
    fixed_group_size = None
    fixed_sym = None
    params_type = AffineParams

    def choose_qparams(
        self,
        stats: Sequence[torch.Tensor],
        scheme: Scheme,
        min_factor: torch.Tensor | None = None,
        max_factor: torch.Tensor | None = None,
    ) -> AffineParams:
        """:func:`compute_qparams` of ``stats = (wmin, wmax)`` at the scheme's width and symmetry."""
        wmin, wmax = stats
        return compute_qparams(wmin, wmax, scheme.bits, scheme.sym, min_factor, max_factor)

    # The module's functions, unchanged (the class-body names on the right are the module's).
    group_minmax = staticmethod(group_minmax)
    compute_qparams = staticmethod(compute_qparams)
    fake_quant = staticmethod(fake_quant)
    quantize_codes = staticmethod(quantize_codes)
    dequantize_codes = staticmethod(dequantize_codes)
    stored_layout = staticmethod(stored_layout)
    to_stored = staticmethod(to_stored)
    from_stored = staticmethod(from_stored)
    group_bits = staticmethod(group_bits)
