import pytest
import torch

from signround.config import QuantScheme, TuneConfig
from signround.errors import SignRoundError
from signround.tune.init import RATIOS, InputPower, init_clipping, search_clipping, weighted_group_error
from signround.tune.wrapper import TunableWeight


def _tunable(bits, sym=False, dtype="int", out=16, inp=96, group=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(inp, out, bias=False)
    with torch.no_grad():
        # heavy-tailed rows, so that clipping pays at low bits
        layer.weight.copy_(torch.randn(out, inp, generator=g) ** 3)
    return TunableWeight.from_linear(layer, QuantScheme(bits=bits, group_size=group, sym=sym, dtype=dtype), learn=True)


def _error(t, ratio, power):
    from signround.primitives import to_groups

    return weighted_group_error(
        t.wg, t.grouped_fake_quant(ratio, ratio), to_groups(power.reshape(1, -1), t.scheme.group_size)[0]
    )


@pytest.mark.parametrize(("bits", "sym", "dtype"), [(2, False, "int"), (3, True, "int"), (4, True, "fp4_e2m1")])
def test_search_never_worse_than_unclipped_and_better_at_low_bits(bits, sym, dtype):
    t = _tunable(bits, sym, dtype)
    power = torch.rand(96, generator=torch.Generator().manual_seed(1)) * 4
    ratio = search_clipping(t, power)
    assert ratio.shape == t.stats[0].shape
    assert all(any(abs(x - r) < 1e-6 for r in RATIOS) for x in ratio.unique().tolist())
    searched = _error(t, ratio, power)
    unclipped = _error(t, torch.ones_like(ratio), power)
    assert (searched <= unclipped + 1e-6).all()
    assert searched.sum() < 0.95 * unclipped.sum()


def test_search_follows_the_input_power():
    """A channel with all the power decides its group's clipping: zero power elsewhere changes the choice."""
    t = _tunable(2)
    flat = torch.ones(96)
    spiky = torch.full((96,), 1e-6)
    spiky[::32] = 1.0  # one channel per group carries the power
    a, b = search_clipping(t, flat), search_clipping(t, spiky)
    assert not torch.equal(a, b)
    assert (_error(t, b, spiky) <= _error(t, a, spiky) + 1e-9).all()


def test_input_power_is_the_mean_square_per_channel():
    lin = torch.nn.Linear(8, 4)
    power = InputPower()
    xs = [torch.randn(2, 5, 8), torch.randn(3, 5, 8)]
    with power.recording({"lin": lin}):
        for x in xs:
            lin(x)
    lin(torch.randn(1, 5, 8) * 100)  # after the context: not recorded
    expected = torch.cat([x.reshape(-1, 8) for x in xs]).pow(2).mean(0)
    assert "lin" in power
    torch.testing.assert_close(power["lin"], expected)


def test_init_clipping_sets_both_factors():
    t = _tunable(2)
    power = InputPower()
    init_clipping({"w": t}, power)  # nothing recorded: unweighted search
    torch.testing.assert_close(t.min_factor, t.max_factor)
    assert (t.min_factor < 1).any()


def test_unknown_init_is_refused():
    with pytest.raises(SignRoundError, match="init must be one of"):
        TuneConfig(init="grid")
