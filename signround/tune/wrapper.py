"""The tunable state of one linear layer: its grouped weight, rounding offsets and clipping factors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from signround.config import QuantScheme
from signround.formats import get_format
from signround.primitives import from_groups, to_groups
from signround.tune.nested import nested_codes, nested_zero


@dataclass
class TunableWeight:
    """SignRound's parameters for one ``nn.Linear``.

    Attributes:
        scheme: target grid.
        in_features: input width (the grouped tensors are zero-padded past it).
        wg: ``[out, groups, g]`` weight, fixed, in the layer's dtype: a view of the layer's weight when no
            padding is needed (no copy; a bfloat16 model's weight is not widened to float32). The formats'
            arithmetic promotes it to float32 (exactly), so the numbers are those of a float32 copy.
        stats: the format's fixed per-group statistics, ``[out, groups]`` each (``group_minmax`` of the
            float32 weight: the extremes widened to 0, and for ``bitmod`` the chosen type ids).
        v: ``[out, groups, g]`` float32 rounding offsets, init 0, learned.
        min_factor, max_factor: ``[out, groups]`` float32 clipping factors, init 1, learned, used clamped to
            [0, 1].
        kept_codes: grouped codes ``[out, groups, g]`` uint8 set by :meth:`restore`; :meth:`finalize`
            returns them instead of rounding with ``v``.
        nested: ``{width: offsets [out, groups, g]}`` of the lower widths tuned with this one (nested
            precision, :mod:`signround.tune.nested`; integer grids): the codes are then nested codes, whose
            Double Rounding at each width gives that width's tuned codes. Empty: the scheme's width alone.
        keep_range: the nested widths derive by the range-keeping ratio (``Derivation.RANGE``), not by shifts.
    """

    scheme: QuantScheme
    in_features: int
    wg: torch.Tensor
    stats: tuple[torch.Tensor, ...]
    v: torch.Tensor
    min_factor: torch.Tensor
    max_factor: torch.Tensor
    kept_codes: torch.Tensor | None = None
    nested: dict[int, torch.Tensor] = field(default_factory=dict)
    keep_range: bool = False

    @classmethod
    def from_linear(
        cls,
        layer: nn.Linear,
        scheme: QuantScheme,
        learn: bool,
        nested: tuple[int, ...] = (),
        keep_range: bool = False,
    ) -> TunableWeight:
        fmt = get_format(scheme.dtype)
        wg = to_groups(layer.weight.detach(), scheme.group_size)
        stats = tuple(fmt.group_minmax(wg.float()))
        shape = stats[0].shape
        return cls(
            scheme=scheme,
            in_features=layer.in_features,
            wg=wg,
            stats=stats,
            v=torch.zeros(wg.shape, device=wg.device, requires_grad=learn),
            min_factor=torch.ones(shape, device=wg.device, requires_grad=learn),
            max_factor=torch.ones(shape, device=wg.device, requires_grad=learn),
            nested={b: torch.zeros(wg.shape, device=wg.device, requires_grad=learn) for b in nested},
            keep_range=keep_range,
        )

    def params(self) -> list[torch.Tensor]:
        """Every learned tensor: the rounding offsets (:attr:`offsets`), then the clipping factors."""
        return [*self.offsets, self.min_factor, self.max_factor]

    @property
    def offsets(self) -> list[torch.Tensor]:
        """Every rounding offset tensor stepped on: ``v``, then the nested widths' (widest first)."""
        return [self.v] + [self.nested[b] for b in sorted(self.nested, reverse=True)]

    def _nested(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        scale, zero = self.qparams()
        offsets = {self.scheme.bits: self.v, **self.nested}
        return nested_codes(self.wg, scale, zero, self.scheme.bits, offsets, self.scheme.sym, self.keep_range)

    def qparams(
        self, min_factor: torch.Tensor | None = None, max_factor: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero)`` per group for the given clipping factors ``[out, groups]`` (None: the learned ones).
        With nested widths the zero point is a multiple of the lowest width's ratio (:func:`nested_zero`)."""
        fmt = get_format(self.scheme.dtype)
        a = self.min_factor if min_factor is None else min_factor
        b = self.max_factor if max_factor is None else max_factor
        scale, zero = fmt.choose_qparams(self.stats, self.scheme, a, b)
        if self.nested:
            zero = nested_zero(zero, self.scheme.bits, min(self.nested), self.scheme.sym, self.keep_range)
        return scale, zero

    def grouped_fake_quant(
        self,
        min_factor: torch.Tensor | None = None,
        max_factor: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Quantize-dequantize of ``wg`` ``[out, groups, g]`` with the given clipping factors (None: the
        learned ones) and rounding offsets ``v`` (None: plain rounding)."""
        scale, zero = self.qparams(min_factor, max_factor)
        return get_format(self.scheme.dtype).fake_quant(self.wg, scale, zero, self.scheme.bits, v)

    def fake_quant_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The quantized-dequantized weight ``[out, in]``, differentiable in ``v`` and the factors."""
        if self.nested:
            return from_groups(self._nested()[self.scheme.bits][1], self.in_features).to(dtype)
        return from_groups(self.grouped_fake_quant(v=self.v), self.in_features).to(dtype)

    def nested_fake_quant_weights(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """The weights ``[out, in]`` of the stored width, then of each nested width (widest first), from the
        nested codes, differentiable in every offset and the factors."""
        levels = self._nested()
        order = [self.scheme.bits] + sorted(self.nested, reverse=True)
        return [from_groups(levels[b][1], self.in_features).to(dtype) for b in order]

    @torch.no_grad()
    def grouped_codes(self) -> torch.Tensor:
        """Codes ``[out, groups, g]`` uint8 of the current offsets and clipping factors."""
        if self.nested:
            return self._nested()[self.scheme.bits][0].to(torch.uint8)
        scale, zero = self.qparams()
        return get_format(self.scheme.dtype).quantize_codes(self.wg, scale, zero, self.scheme.bits, self.v)

    @torch.no_grad()
    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What :meth:`finalize` needs to reproduce the current step: ``(codes [out, groups, g] uint8,
        min_factor, max_factor)``, copies. The codes stand for the offsets ``v``: 1 byte per weight, not 4."""
        return self.grouped_codes(), self.min_factor.detach().clone(), self.max_factor.detach().clone()

    @torch.no_grad()
    def restore(self, state: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Go back to a :meth:`snapshot` for :meth:`finalize` (the factors are set back, the codes kept);
        the offsets ``v`` stay as they are, so only :meth:`finalize` is meaningful afterwards."""
        codes, min_factor, max_factor = state
        self.min_factor.copy_(min_factor)
        self.max_factor.copy_(max_factor)
        self.kept_codes = codes

    def _final_codes(self) -> torch.Tensor:
        """Grouped codes :meth:`finalize` returns: the kept ones after :meth:`restore`, else the current rounding."""
        return self.grouped_codes() if self.kept_codes is None else self.kept_codes

    @torch.no_grad()
    def current_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight ``[out, in]`` :meth:`finalize` stands for now (after :meth:`restore`: the kept codes),
        dequantized, without gradients."""
        codes = self._final_codes()
        scale, zero = self.qparams()
        grouped = get_format(self.scheme.dtype).dequantize_codes(codes, scale, zero)
        return from_groups(grouped, self.in_features).to(dtype)

    @torch.no_grad()
    def finalize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(codes [out, in] uint8, scale [out, groups], zero [out, groups])``.

        ``scale`` and ``zero`` are what the checkpoint stores, decoded (passed through the format's
        ``to_stored`` / ``from_stored``): float16 / uint8 for ``int``, float32 for the floating-point grids.
        After :meth:`restore` the codes are the snapshot's (the same the restored offsets would give).
        """
        fmt = get_format(self.scheme.dtype)
        scale, zero = self.qparams()
        codes = self._final_codes()
        scale, zero = fmt.from_stored(fmt.to_stored(scale, zero, self.scheme), self.scheme)
        return from_groups(codes, self.in_features), scale, zero
