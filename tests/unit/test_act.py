"""Activation quantizers and the bit-plane integer product (issue 10's first pieces)."""

from __future__ import annotations

import pytest
import torch

from signround.act.bitplane import bitplane_matmul, bitplanes, integer_linear
from signround.act.quant import channel_scales, fake_quant_channel, fake_quant_token
from signround.formats.fp import E2M1, E4M3, magnitudes


@pytest.mark.parametrize("a_bits", range(1, 9))
@pytest.mark.parametrize("w_bits", range(1, 9))
def test_bitplane_product_is_exact_for_every_pair_of_widths(a_bits, w_bits):
    g = torch.Generator().manual_seed(a_bits * 10 + w_bits)
    a = torch.randint(0, 2**a_bits, (5, 67), generator=g)
    w = torch.randint(0, 2**w_bits, (7, 67), generator=g)
    a[0], w[0] = 2**a_bits - 1, 2**w_bits - 1  # the extremes
    assert torch.equal(bitplane_matmul(a, w, a_bits, w_bits), a @ w.T)


def test_planes_recompose_the_codes_and_reject_out_of_range():
    codes = torch.arange(16).reshape(4, 4)
    planes = bitplanes(codes, 4)
    assert planes.shape == (4, 4, 4) and set(planes.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(sum(2**j * planes[j] for j in range(4)).long(), codes)
    with pytest.raises(ValueError):
        bitplanes(codes, 3)


def test_integer_linear_equals_the_dequantized_product():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 16, (3, 40), generator=g)
    w = torch.randint(0, 4, (6, 40), generator=g)
    sa, za = torch.rand(3, generator=g), torch.randint(0, 16, (3,), generator=g)
    sw, zw = torch.rand(6, generator=g), torch.randint(0, 4, (6,), generator=g)
    want = (sa[:, None].double() * (a - za[:, None]).double()) @ (sw[:, None].double() * (w - zw[:, None]).double()).T
    got = integer_linear(a, sa, za, 4, w, sw, zw, 2)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_int_token_quantizer_rounds_each_row_on_its_own_scale():
    x = torch.tensor([[0.5, -1.0, 0.26], [100.0, 3.0, -50.0]])
    q = fake_quant_token(x, bits=8)
    s = x.abs().amax(-1, keepdim=True) / 127
    assert torch.equal(q, torch.round(x / s).clamp(-127, 127) * s)
    assert torch.equal(q[:, :2].abs().amax(-1), x[:, :2].abs().amax(-1))  # the absmax is exact
    assert (q - x).abs().le(s / 2 + 1e-6).all()


def test_token_clip_saturates_the_largest_values_and_lowers_int4_error_on_gaussian_rows():
    x = torch.tensor([[1.0, -0.5, 0.2, 0.95]])
    q = fake_quant_token(x, bits=4, clip=0.9)
    s = 0.9 * 1.0 / 7
    assert torch.allclose(q, torch.round(x / s).clamp(-7, 7) * s)
    assert q.abs().amax() < 0.9 + 1e-6  # 1.0 saturates at the clipped top
    g = torch.randn(256, 1536, generator=torch.Generator().manual_seed(0))  # a rotated activation: near Gaussian
    err = {c: (fake_quant_token(g, 4, clip=c) - g).pow(2).mean().item() for c in (1.0, 0.9)}
    assert err[0.9] < 0.9 * err[1.0]  # QuaRot's point: the absmax of a Gaussian row wastes most of the grid


@pytest.mark.parametrize(("dtype", "element"), [("fp8_e4m3", E4M3), ("fp4_e2m1", E2M1)])
def test_float_token_quantizer_lands_on_the_grid(dtype, element):
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    q = fake_quant_token(x, dtype=dtype)
    s = x.abs().amax(-1, keepdim=True) / element.max_value
    grid = magnitudes(element)[: element.max_code + 1]
    assert torch.isin((q / s).abs().round(decimals=4), grid.round(decimals=4)).all()
    if dtype == "fp8_e4m3":  # the same as torch's own float8 cast
        assert torch.allclose(q, (x / s).to(torch.float8_e4m3fn).float() * s)


def test_static_channel_quantizer_saturates_outside_its_calibrated_range_with_straight_through_gradient():
    absmax = torch.tensor([1.0, 10.0])
    s = channel_scales(absmax, bits=4)
    assert torch.allclose(s, absmax / 7)
    x = torch.tensor([[2.0, 5.0]], requires_grad=True)
    q = fake_quant_channel(x, s, bits=4)
    assert torch.allclose(q, torch.tensor([[1.0, 10 / 7 * 4]]))  # channel 0 saturates at its absmax
    q.sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0]]
