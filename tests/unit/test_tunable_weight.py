"""TunableWeight keeps the layer's own weight (no float32 copy) and snapshots codes, not offsets."""

import pytest
import torch
from torch import nn

from signround.config import DType, QuantScheme
from signround.tune.wrapper import TunableWeight

SCHEMES = [QuantScheme(dtype=d.value) for d in DType if d is not DType.INT] + [
    QuantScheme(bits=3, group_size=64, sym=False),
    QuantScheme(bits=2, group_size=64, sym=True),
]


def _linears(dtype: torch.dtype, in_features: int = 256) -> tuple[nn.Linear, nn.Linear]:
    """The same weights twice: in ``dtype`` and widened to float32."""
    torch.manual_seed(0)
    low = nn.Linear(in_features, 48, bias=False).to(dtype)
    wide = nn.Linear(in_features, 48, bias=False)
    with torch.no_grad():
        wide.weight.copy_(low.weight.float())
    return low, wide


def _set_params(t: TunableWeight, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        t.v.copy_(torch.rand(t.v.shape, generator=gen) - 0.5)
        t.min_factor.copy_(0.6 + 0.4 * torch.rand(t.min_factor.shape, generator=gen))
        t.max_factor.copy_(0.6 + 0.4 * torch.rand(t.max_factor.shape, generator=gen))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.dtype.value}-{s.bits}-{s.sym}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_weight_is_used_as_it_is_with_float32_numbers(scheme, dtype):
    low, wide = _linears(dtype)
    a = TunableWeight.from_linear(low, scheme, learn=True)
    b = TunableWeight.from_linear(wide, scheme, learn=True)
    assert a.wg.dtype == dtype and a.wg.data_ptr() == low.weight.data_ptr()  # a view, no copy
    assert a.v.dtype == a.min_factor.dtype == torch.float32
    assert all(torch.equal(x, y) for x, y in zip(a.stats, b.stats, strict=True))
    _set_params(a, 1)
    _set_params(b, 1)
    qa, qb = a.fake_quant_weight(torch.float32), b.fake_quant_weight(torch.float32)
    assert qa.dtype == torch.float32 and torch.equal(qa, qb)
    grad = torch.randn(qa.shape, generator=torch.Generator().manual_seed(2))
    qa.backward(grad)
    qb.backward(grad)
    assert a.v.grad is not None
    for pa, pb in zip(a.params(), b.params(), strict=True):
        # a symmetric grid leaves one clipping factor without a gradient
        assert (pa.grad is None and pb.grad is None) or (
            pa.grad.dtype == torch.float32 and torch.equal(pa.grad, pb.grad)
        )
    assert all(torch.equal(x, y) for x, y in zip(a.finalize(), b.finalize(), strict=True))


def test_padded_groups_of_a_bfloat16_weight_match_float32():
    low, wide = _linears(torch.bfloat16, in_features=200)  # 200 = 3 groups of 64, the last one padded
    scheme = QuantScheme(bits=4, group_size=64)
    a, b = (TunableWeight.from_linear(x, scheme, learn=True) for x in (low, wide))
    _set_params(a, 3)
    _set_params(b, 3)
    assert a.wg.dtype == torch.bfloat16 and a.wg.shape == (48, 4, 64)  # a zero-padded copy, still bfloat16
    assert torch.equal(a.fake_quant_weight(torch.float32), b.fake_quant_weight(torch.float32))
    assert all(torch.equal(x, y) for x, y in zip(a.finalize(), b.finalize(), strict=True))


@pytest.mark.parametrize("scheme", [QuantScheme(bits=2, group_size=64), QuantScheme(dtype="q4_k")])
def test_restore_finalizes_the_snapshot_step(scheme):
    low, _ = _linears(torch.float32)
    t = TunableWeight.from_linear(low, scheme, learn=True)
    _set_params(t, 4)
    expected = t.finalize()
    state = t.snapshot()
    assert state[0].dtype == torch.uint8 and state[0].shape == t.wg.shape  # 1 byte per weight, not 4
    _set_params(t, 5)  # the tuning goes on past the kept step
    assert not torch.equal(t.finalize()[0], expected[0])
    t.restore(state)
    assert all(torch.equal(x, y) for x, y in zip(t.finalize(), expected, strict=True))
