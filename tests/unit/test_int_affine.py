import pytest
import torch

from signround.formats import int_affine as F
from signround.primitives import from_groups, round_ste, to_groups


def _grouped(out=16, inp=200, g=64, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(out, inp)
    return w, to_groups(w, g)


def test_round_ste_rounds_and_passes_gradient():
    x = torch.tensor([0.4, 0.5, 1.5, -2.6], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 0.0, 2.0, -3.0]  # half to even
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_groups_pad_and_round_trip():
    w = torch.randn(3, 200)
    wg = to_groups(w, 64)
    assert wg.shape == (3, 4, 64)
    assert torch.all(wg[:, -1, 8:] == 0)  # 200 = 3*64 + 8: last group zero-padded
    assert torch.equal(from_groups(wg, 200), w)
    assert to_groups(w, -1).shape == (3, 1, 200)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_codes_in_range_and_dequant_round_trip(bits, sym):
    _, wg = _grouped()
    wmin, wmax = F.group_minmax(wg)
    scale, zero = F.compute_qparams(wmin, wmax, bits, sym)
    codes = F.quantize_codes(wg, scale, zero, bits)
    assert codes.dtype == torch.uint8
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2**bits - 1
    deq = F.dequantize_codes(codes, scale, zero)
    # fake_quant is exactly dequantize(quantize(.))
    assert torch.equal(deq, F.fake_quant(wg, scale, zero, bits))
    # re-quantizing the dequantized grid points gives the same codes (idempotent)
    assert torch.equal(F.quantize_codes(deq, scale, zero, bits), codes)
    # every weight is within one step of its grid point (clamping at one end costs at most one step)
    assert torch.all((deq - wg).abs() <= scale.abs().unsqueeze(-1) * 1.0001)
    # scales are float16 values
    assert torch.equal(scale, scale.half().float())


@pytest.mark.parametrize("bits", [2, 4])
def test_sym_full_range_maps_larger_extreme_to_most_negative(bits):
    half = 2 ** (bits - 1)
    wg = torch.tensor([[[-1.0, 0.2, 0.5, 0.1], [0.3, 2.0, -0.5, 0.0]]])
    wmin, wmax = F.group_minmax(wg)
    scale, zero = F.compute_qparams(wmin, wmax, bits, sym=True)
    codes = F.quantize_codes(wg, scale, zero, bits)
    assert torch.all(zero == half)
    assert int(codes[0, 0, 0]) == 0  # -1.0 is the larger magnitude of group 0 -> signed -2^(b-1)
    assert int(codes[0, 1, 1]) == 0  # +2.0 is the larger magnitude of group 1 -> signed -2^(b-1) (negative scale)
    assert float(scale[0, 1]) < 0 < float(scale[0, 0])
    assert torch.allclose(F.dequantize_codes(codes, scale, zero)[0, :, :2].diagonal(), torch.tensor([-1.0, 2.0]))


def test_asym_grid_spans_min_to_max():
    wg = torch.tensor([[[-0.3, 0.0, 0.9, 0.45]]])
    wmin, wmax = F.group_minmax(wg)
    scale, zero = F.compute_qparams(wmin, wmax, 4, sym=False)
    assert float(scale) == pytest.approx(1.2 / 15, rel=1e-3)
    codes = F.quantize_codes(wg, scale, zero, 4)
    assert int(codes.min()) == 0 and int(codes.max()) == 15


def _sqnr_db(w, deq):
    return float(10 * torch.log10(w.pow(2).sum() / (w - deq).pow(2).sum()))


@pytest.mark.parametrize("bits,floor", [(2, 4.0), (3, 11.0), (4, 17.0), (6, 29.0), (8, 41.0)])
def test_sqnr_on_gaussian_weights(bits, floor):
    w, wg = _grouped(64, 512, 128)
    wmin, wmax = F.group_minmax(wg)
    for sym in (False, True):
        scale, zero = F.compute_qparams(wmin, wmax, bits, sym)
        deq = from_groups(F.fake_quant(wg, scale, zero, bits), 512)
        assert _sqnr_db(w, deq) > floor


def test_ste_gradients_reach_offsets_and_clip_factors():
    _, wg = _grouped(4, 64, 32)
    wmin, wmax = F.group_minmax(wg)
    v = torch.zeros_like(wg, requires_grad=True)
    a = torch.ones(wmin.shape, requires_grad=True)
    b = torch.ones(wmin.shape, requires_grad=True)
    scale, zero = F.compute_qparams(wmin, wmax, 4, False, b, a)
    deq = F.fake_quant(wg, scale, zero, 4, v)
    deq.sum().backward()
    # d deq / d v = scale where the code is not clamped, 0 where it is
    code = torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
    inside = (code >= 0) & (code <= 15)
    expected = torch.where(inside, scale.unsqueeze(-1).expand_as(wg), torch.zeros_like(wg))
    assert torch.allclose(v.grad, expected)
    assert a.grad is not None and b.grad is not None
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_clip_factors_are_clamped_to_unit_interval():
    wmin, wmax = torch.tensor([[-1.0]]), torch.tensor([[1.0]])
    s1, _ = F.compute_qparams(wmin, wmax, 4, False, torch.tensor([[2.0]]), torch.tensor([[2.0]]))
    s2, _ = F.compute_qparams(wmin, wmax, 4, False, torch.tensor([[1.0]]), torch.tensor([[1.0]]))
    assert torch.equal(s1, s2)


def test_all_zero_group_stays_finite():
    wg = torch.zeros(2, 1, 8)
    wmin, wmax = F.group_minmax(wg)
    for sym in (False, True):
        scale, zero = F.compute_qparams(wmin, wmax, 4, sym)
        deq = F.fake_quant(wg, scale, zero, 4)
        assert torch.isfinite(scale).all() and torch.equal(deq, wg)


def _composed_fake_quant(wg, scale, zero, bits, v):
    """fake_quant as composed autograd ops (the reference FakeQuantSTE must match)."""
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    code = (round_ste(wg / s + v) + z).clamp(0, 2**bits - 1)
    return (code - z) * s


@pytest.mark.parametrize("bits,sym", [(2, False), (3, True), (4, False), (4, True), (8, False)])
def test_fake_quant_function_matches_composed_ops(bits, sym):
    """Same values bit for bit and the same straight-through gradients as composing round_ste and clamp:
    the offsets' gradient bit for bit (its sign is the update), the clipping factors' and the weight's up to
    float rounding (summation order; ``(g * s) / s``)."""
    _, wg = _grouped(out=32, inp=256, g=32, seed=bits)
    wg.requires_grad_(True)
    wmin, wmax = F.group_minmax(wg.detach())
    torch.manual_seed(1)
    a, b = (torch.rand(32, 8).mul(0.5).add(0.5).requires_grad_(True) for _ in range(2))
    v = (torch.rand_like(wg) - 0.5).requires_grad_(True)
    grad_out = torch.randn_like(wg)
    results = []
    for fq in (_composed_fake_quant, F.fake_quant):
        for t in (wg, a, b, v):
            t.grad = None
        scale, zero = F.compute_qparams(wmin, wmax, bits, sym, a, b)
        y = fq(wg, scale, zero, bits, v)
        (y * grad_out).sum().backward()
        results.append((y.detach(), v.grad.clone(), wg.grad.clone(), a.grad.clone(), b.grad.clone()))
    (y0, v0, w0, a0, b0), (y1, v1, w1, a1, b1) = results
    assert torch.equal(y0, y1) and torch.equal(v0, v1)
    assert torch.allclose(w0, w1, rtol=1e-6, atol=1e-6)  # composed: (g * s) / s; here g
    for g0, g1 in ((a0, a1), (b0, b1)):
        assert torch.allclose(g0, g1, rtol=1e-4, atol=1e-4 * float(g0.abs().max()))
    assert v0.abs().sum() > 0 and (a0.abs().sum() > 0 or b0.abs().sum() > 0)


def test_fake_quant_saves_no_weight_sized_intermediates():
    """Between forward and backward autograd holds only the inputs (the backward recomputes the rounding):
    under 1 byte per weight beyond them, where composed ops keep 8 (two float32 tensors)."""
    _, wg = _grouped(out=64, inp=512, g=128)
    wmin, wmax = F.group_minmax(wg)
    a, b = (torch.ones(64, 4, requires_grad=True) for _ in range(2))
    v = torch.zeros_like(wg, requires_grad=True)
    inputs = {t.untyped_storage().data_ptr() for t in (wg, v)}

    def saved_bytes(fq) -> float:
        seen: dict[int, int] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in inputs:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            scale, zero = F.compute_qparams(wmin, wmax, 2, False, a, b)
            fq(wg, scale, zero, 2, v)
        return sum(seen.values()) / wg.numel()

    assert saved_bytes(F.fake_quant) < 1.0
    assert saved_bytes(_composed_fake_quant) >= 8.0


@pytest.mark.parametrize("bits,sym", [(2, False), (3, True)])
def test_compiled_fake_quant_matches_eager(bits, sym):
    """``compiled_fake_quant(True)`` (torch.compile'd forward and backward): the same values bit for bit, the
    offsets' gradient bit for bit, the clipping factors' up to float rounding (inductor's summation order)."""
    _, wg = _grouped(out=32, inp=256, g=32, seed=bits)
    wmin, wmax = F.group_minmax(wg)
    torch.manual_seed(1)
    a, b = (torch.rand(32, 8).mul(0.5).add(0.5).requires_grad_(True) for _ in range(2))
    v = (torch.rand_like(wg) - 0.5).requires_grad_(True)
    grad_out = torch.randn_like(wg)
    results = []
    for compiled in (False, True):
        for t in (a, b, v):
            t.grad = None
        with F.compiled_fake_quant(compiled):
            scale, zero = F.compute_qparams(wmin, wmax, bits, sym, a, b)
            y = F.fake_quant(wg, scale, zero, bits, v)
            (y * grad_out).sum().backward()
        results.append((y.detach(), v.grad.clone(), a.grad.clone(), b.grad.clone()))
    (y0, v0, a0, b0), (y1, v1, a1, b1) = results
    assert torch.equal(y0, y1) and torch.equal(v0, v1)
    for g0, g1 in ((a0, a1), (b0, b1)):
        assert torch.allclose(g0, g1, rtol=1e-4, atol=1e-4 * float(g0.abs().max()))
    assert not F._COMPILED["on"]  # the context restores the eager path
