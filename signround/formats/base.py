"""What every number format is: the :class:`WeightFormat` interface, and the registry keyed by :class:`DType`.

A format is a class that states its facts as class attributes (its data type, its width, its block size,
its symmetry, the type of its quantization parameters) and registers one instance of itself with
:func:`register_format` when it is defined; :func:`get_format` looks it up. Shapes, throughout: grouped
weights and codes are ``[out, groups, g]`` (see :func:`signround.primitives.to_groups`), per-group tensors
``[out, groups]``.

Quantization parameters are a pair, a ``NamedTuple`` per family that names its two halves (so it unpacks
as ``scale, zero = ...`` and passes on positionally as ``fmt.fake_quant(wg, *params, bits)``):

* ``int``, ``q6_k``, ``q3_k``: :class:`~signround.formats.int_affine.AffineParams` ``(scale, zero_point)``;
* the floating-point grids: :class:`~signround.formats.fp.FloatParams` ``(scale, tensor_scale)``;
* ``q4_k``, ``q2_k``: :class:`~signround.formats.kquant.KQuantParams` ``(scale, minimum)``;
* ``bitmod``: :class:`~signround.formats.bitmod.BitMoDParams` ``(scale, type_zero)``.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import ClassVar, Protocol, TypeVar

import torch

from signround.formats.dtype import DType

# {buffer name: (shape, dtype)} of the tensors a ``QuantLinear`` stores besides its packed codes
Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]
QParams = tuple[torch.Tensor, torch.Tensor]


class Scheme(Protocol):
    """What a format reads of a :class:`signround.config.QuantScheme` (the config sits above the formats,
    so they name its fields, not its class)."""

    @property
    def bits(self) -> int: ...

    @property
    def group_size(self) -> int: ...

    @property
    def sym(self) -> bool: ...

    @property
    def dtype(self) -> DType: ...


class WeightFormat(abc.ABC):
    """One number format (a data type and how its parameters are stored); stateless.

    Class attributes (the facts :class:`signround.config.QuantScheme` validates against):
        dtype: the registry key.
        implied_bits: bits per weight the format fixes; None where the width is free (``int``: 2..8).
        fixed_group_size: weights per block the format fixes; None where the scheme chooses.
        fixed_sym: the value ``QuantScheme.sym`` must take for a format that fixes its own grid (True for
            all of them, whatever the grid's shape); None where the scheme chooses (``int``).
        params_type: the ``NamedTuple`` of two tensors that :meth:`choose_qparams` returns.

    The methods; ``bits`` is the scheme's width, which only ``int`` reads (the others fix theirs):

    * :meth:`group_minmax` ``(wg) -> stats``: fixed per-group statistics the parameters derive from;
    * :meth:`choose_qparams` ``(stats, scheme, min_factor, max_factor) -> params``: float32, differentiable
      in SignRound's clipping factors;
    * ``fake_quant(wg, scale, zero, bits, v)``: quantize-dequantize with rounding offsets ``v`` (same shape
      as ``wg``, or None), straight-through;
    * ``quantize_codes(wg, scale, zero, bits, v)``: uint8 codes ``[out, groups, g]`` in ``[0, 2^bits)``;
    * ``dequantize_codes(codes, scale, zero)``: float32 weights, equal to ``fake_quant``'s bit for bit;
    * ``stored_layout(scheme, out_features, groups) -> Layout``: the tensors a ``QuantLinear`` stores
      besides its packed codes (``scales`` always; e.g. ``qzeros``, ``tensor_scale``);
    * ``to_stored(scale, zero, scheme) -> {name: tensor}`` and ``from_stored(stored, scheme) -> params``:
      exact conversions between those tensors and the parameters;
    * ``group_bits(scheme) -> int``: storage bits per group besides the codes (scale, zero point, type id),
      for size budgets and bits-per-weight reports.
    """

    dtype: ClassVar[DType]
    implied_bits: ClassVar[int | None]
    fixed_group_size: ClassVar[int | None] = None
    fixed_sym: ClassVar[bool | None]
    params_type: ClassVar[type[tuple]]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    @abc.abstractmethod
    def group_minmax(self, wg: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-group statistics of ``wg [out, groups, g]`` float32, each ``[out, groups]``."""

    @abc.abstractmethod
    def choose_qparams(
        self,
        stats: Sequence[torch.Tensor],
        scheme: Scheme,
        min_factor: torch.Tensor | None = None,
        max_factor: torch.Tensor | None = None,
    ) -> QParams:
        """The parameters (a :attr:`params_type`) from :meth:`group_minmax`'s ``stats`` and the clipping
        factors ``[out, groups]`` (clamped to [0, 1]; None means 1)."""

    @abc.abstractmethod
    def fake_quant(
        self,
        wg: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bits: int | None = None,
        v: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Quantize-dequantize ``wg [out, groups, g]``: float32, same shape, straight-through."""

    @abc.abstractmethod
    def quantize_codes(
        self,
        wg: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bits: int | None = None,
        v: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """uint8 codes ``[out, groups, g]`` for the rounding of :meth:`fake_quant`."""

    @abc.abstractmethod
    def dequantize_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """float32 weights ``[out, groups, g]`` of grouped ``codes``; equal to :meth:`fake_quant`'s."""

    @abc.abstractmethod
    def stored_layout(self, scheme: Scheme, out_features: int, groups: int) -> Layout:
        """The buffers a ``QuantLinear`` holds besides ``qweight``."""

    @abc.abstractmethod
    def to_stored(self, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme) -> dict[str, torch.Tensor]:
        """The parameters -> the buffers of :meth:`stored_layout` (exact)."""

    @abc.abstractmethod
    def from_stored(self, stored: dict[str, torch.Tensor], scheme: Scheme) -> QParams:
        """Inverse of :meth:`to_stored`."""

    @abc.abstractmethod
    def group_bits(self, scheme: Scheme) -> int:
        """Storage bits per group besides the codes."""


_REGISTRY: dict[DType, WeightFormat] = {}

F = TypeVar("F", bound=type[WeightFormat])


def register_format(cls: F) -> F:
    """Class decorator: registers one instance of ``cls`` under ``cls.dtype``.

    Raises:
        ValueError: a format is already registered for that data type.
    """
    dtype = DType(cls.dtype)
    if dtype in _REGISTRY:
        raise ValueError(f"format {dtype.value!r} is already registered")
    _REGISTRY[dtype] = cls()
    return cls


def get_format(dtype: DType | str) -> WeightFormat:
    """The registered format of ``dtype`` (a :class:`DType` or its value).

    Raises:
        ValueError: no format is registered for it.
    """
    try:
        return _REGISTRY[DType(dtype)]
    except (KeyError, ValueError):
        raise ValueError(f"no format registered for {dtype!r}") from None


def registered() -> dict[DType, WeightFormat]:
    """A copy of the registry, in registration order."""
    return dict(_REGISTRY)
