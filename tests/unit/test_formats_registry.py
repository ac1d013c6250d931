"""The format registry: one registered WeightFormat per DType, its facts, its parameter type, the guard
against registering a data type twice."""

from __future__ import annotations

import pytest
import torch

from signround.config import DType, QuantScheme
from signround.formats import (
    AffineParams,
    BitMoDParams,
    FloatParams,
    IntAffineFormat,
    KQuantParams,
    WeightFormat,
    get_format,
    register_format,
    registered,
)
from signround.formats import dtype as dtype_module
from signround.primitives import to_groups

# The facts as config.py tabulated them before they moved into the formats (implied bits, fixed group).
BITS = {"fp4_e2m1": 4, "fp4_e1m2": 4, "fp4_e3m0": 4, "fp6_e2m3": 6, "fp6_e3m2": 6, "fp8_e4m3": 8, "fp8_e5m2": 8,
        "mxfp4": 4, "nvfp4": 4, "bitmod": 4, "q4_k": 4, "q2_k": 2, "q6_k": 6, "q3_k": 3}  # fmt: skip
GROUP = {"mxfp4": 32, "nvfp4": 16, "q4_k": 32, "q2_k": 16, "q6_k": 16, "q3_k": 16}
PARAMS = {"int": AffineParams, "q6_k": AffineParams, "q3_k": AffineParams, "q4_k": KQuantParams,
          "q2_k": KQuantParams, "bitmod": BitMoDParams}  # fmt: skip


def test_every_dtype_has_one_registered_format():
    reg = registered()
    assert set(reg) == set(DType)
    for dtype, fmt in reg.items():
        assert isinstance(fmt, WeightFormat) and fmt.dtype is dtype
        assert get_format(dtype) is fmt and get_format(dtype.value) is fmt
    assert len({type(f) for f in reg.values()}) == len(reg)  # one class per data type


@pytest.mark.parametrize("dtype", list(DType))
def test_facts_are_the_formats(dtype):
    fmt = get_format(dtype)
    assert fmt.implied_bits == BITS.get(dtype.value) == dtype.implied_bits
    assert fmt.fixed_group_size == GROUP.get(dtype.value) == dtype.fixed_group_size
    assert fmt.fixed_sym == (None if dtype is DType.INT else True)
    assert dtype.is_float == (dtype is not DType.INT)
    assert fmt.params_type is PARAMS.get(dtype.value, FloatParams)


def test_dtype_module_is_a_leaf():
    """formats/dtype.py imports nothing from signround when it loads (the registry is imported lazily)."""
    source = open(dtype_module.__file__).read()
    top_level = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert all("signround" not in line for line in top_level), top_level


def test_registering_a_dtype_twice_is_refused():
    before = registered()
    with pytest.raises(ValueError, match="format 'int' is already registered"):

        @register_format
        class Again(IntAffineFormat):
            dtype = DType.INT

    assert registered() == before and type(get_format(DType.INT)) is IntAffineFormat


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="no format registered for 'fp16'"):
        get_format("fp16")


def _scheme(dtype: DType) -> QuantScheme:
    return QuantScheme(dtype=dtype, group_size=None if dtype.fixed_group_size else 32)


@pytest.mark.parametrize("dtype", list(DType))
def test_parameters_are_the_formats_named_pair(dtype):
    """choose_qparams gives parameters of the format's type; from_stored decodes to that type; the pair
    unpacks and passes on positionally."""
    torch.manual_seed(0)
    scheme, fmt = _scheme(dtype), get_format(dtype)
    wg = to_groups(torch.randn(4, 512) * 0.02, scheme.group_size)
    stats = fmt.group_minmax(wg)
    a = torch.full_like(stats[0], 0.9)
    params = fmt.choose_qparams(stats, scheme, a, a)
    assert type(params) is fmt.params_type and len(params) == 2
    scale, zero = fmt.from_stored(fmt.to_stored(*params, scheme), scheme)
    assert type(fmt.from_stored(fmt.to_stored(*params, scheme), scheme)) is fmt.params_type
    codes = fmt.quantize_codes(wg, *params, scheme.bits)
    decoded = fmt.dequantize_codes(codes, scale.float(), zero.float())
    assert torch.equal(decoded, fmt.fake_quant(wg, *params, scheme.bits))


def test_parameter_fields_name_what_the_second_one_is():
    assert AffineParams._fields == ("scale", "zero_point")
    assert FloatParams._fields == ("scale", "tensor_scale")
    assert KQuantParams._fields == ("scale", "minimum")
    assert BitMoDParams._fields == ("scale", "type_zero")
    wg = to_groups(torch.randn(2, 64), 32)
    fmt = get_format(DType.BITMOD)
    params = fmt.choose_qparams(fmt.group_minmax(wg), _scheme(DType.BITMOD))
    assert torch.equal(params.type_ids, params.type_zero[..., 0]) and params.type_ids.shape == (2, 2)
    assert torch.equal(params.zero_point, params.type_zero[..., 1])
