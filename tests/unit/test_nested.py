"""Nested precision (``--nested``): the stored nested codes derive every tuned width's codes exactly by
Double Rounding, tuning the served widths lowers their error on a tiny model, and what cannot go
together is refused in one line."""

from __future__ import annotations

import pytest
import torch

from signround.config import Derivation, QuantConfig, QuantScheme, TuneConfig
from signround.errors import SignRoundError
from signround.pack.derive import derive_codes
from signround.tune.nested import nested_codes
from signround.tune.wrapper import TunableWeight
from tests.conftest import corpus, make_model


@pytest.mark.parametrize("keep_range", [False, True])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("widths", [(4,), (6, 4, 3), (4, 2)])
def test_nested_codes_derive_every_tuned_width_exactly(sym, widths, keep_range):
    """Shift and range derivations alike, the range one with integer (8/4/2) and non-integer (8/6/4/3) ratios."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 8, bias=False)
    scheme = QuantScheme(bits=8, group_size=32, sym=sym)
    t = TunableWeight.from_linear(layer, scheme, learn=True, nested=widths, keep_range=keep_range)
    with torch.no_grad():  # offsets far from zero, so the lower widths' roundings differ from the nearest
        for v in t.offsets:
            v.uniform_(-0.5, 0.5)
    scale, zero = t.qparams()
    levels = nested_codes(t.wg, scale, zero, 8, {8: t.v, **t.nested}, sym, keep_range)
    stored = t.grouped_codes()
    assert torch.equal(stored.float(), levels[8][0])
    derivation = Derivation.RANGE if keep_range else Derivation.SHIFT
    for b in widths:
        derived, _ = derive_codes(stored, zero.round().to(torch.uint8), 8, b, sym, derivation)
        assert torch.equal(derived.float(), levels[b][0]), b
        ratio = 255 / (2**b - 1) if keep_range and not sym else 2 ** (8 - b)
        own = torch.round(t.wg / (scale[..., None] * ratio) + t.nested[b]) + torch.round(zero / ratio)[..., None]
        if b == min(widths):  # the lowest width is its own SignRound rounding (clamped to the grid)
            assert torch.equal(levels[b][0], own.clamp(0, 2**b - 1).detach())
    weights = t.nested_fake_quant_weights(torch.float32)
    sum(w.sum() for w in weights[1:]).backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in t.nested.values())


def test_code_interval_is_the_preimage_of_the_derivation():
    """Every stored code ``x`` lies in the interval of its derived code and of no other (both ratio kinds)."""
    from signround.tune.nested import code_interval

    x = torch.arange(256, dtype=torch.float32)
    kinds = [(bits, ratio) for bits in (6, 4, 3, 2) for ratio in (2.0 ** (8 - bits), 255 / (2**bits - 1))]
    for bits, ratio in kinds:  # shift, range
        derived = torch.round(x / ratio).clamp(0, 2**bits - 1)
        codes = torch.unique(derived)
        assert codes.numel() == 2**bits
        lo, hi = code_interval(codes, ratio, 255)
        for c, a, b in zip(codes.tolist(), lo.tolist(), hi.tolist(), strict=True):
            members = x[derived == c]
            assert (a, b) == (members.min().item(), members.max().item()), (ratio, c)


def _errors(tokenizer, nested: bool) -> tuple[float, float]:
    """Mean squared logit error against the float model at the stored 8 bits and served at 2."""
    from signround.pack.derive import serve_at_bits
    from tests.conftest import quantize_tiny

    model = make_model("llama")
    ids = torch.tensor([tokenizer(t)["input_ids"][:32] for t in corpus(4, seed=9)])
    with torch.no_grad():
        ref = model(ids).logits
    q = quantize_tiny(tokenizer, model=model, scheme=QuantScheme(bits=8, group_size=32, sym=False), iters=30,
                      nsamples=8, serve_bits="2", nested="2" if nested else ())  # fmt: skip
    assert q.config.quantization_config.get("serve_bits") == [2]
    with torch.no_grad():
        stored = float((q(ids).logits - ref).pow(2).mean())
        served = serve_at_bits(q, 2)
        return stored, float((served(ids).logits - ref).pow(2).mean())


def test_nested_tuning_lowers_the_served_widths_error(tokenizer):
    (_, plain), (stored_nested, nested) = _errors(tokenizer, False), _errors(tokenizer, True)
    assert nested < 0.5 * plain, (nested, plain)  # 0.23x when written
    # the stored width pays for the lower widths' choices (its codes stay in their bins: 1.0e-6 -> 1.6e-4 when
    # written) but stays far better than the served width
    assert stored_nested < 0.25 * nested, (stored_nested, nested)


def test_nested_is_validated():
    assert TuneConfig(nested="2,4,4").nested == (4, 2)
    with pytest.raises(SignRoundError, match="add 3 to --serve-bits"):
        QuantConfig(scheme=QuantScheme(bits=8), serve_bits="4", tune=TuneConfig(nested=(4, 3)))
    with pytest.raises(SignRoundError, match="--holdout judges the stored width alone"):
        QuantConfig(scheme=QuantScheme(bits=8), serve_bits="4", tune=TuneConfig(nested=(4,), holdout=2),
                    calib=signround_calib())  # fmt: skip
    with pytest.raises(SignRoundError, match="must be integers"):
        TuneConfig(nested="4,x")


def signround_calib():
    from signround.config import CalibConfig

    return CalibConfig(nsamples=8)


def test_the_nested_start_is_nearest_rounding_at_the_stored_width():
    """With every offset 0 the stored codes are the stored width's nearest rounding, but for ties at the lower
    widths' bin edges (one code away): the zero point is on the lowest width's grid, so the grids nest."""
    from signround.formats import get_format

    torch.manual_seed(0)
    layer = torch.nn.Linear(576, 64, bias=False)
    t = TunableWeight.from_linear(layer, QuantScheme(bits=8, group_size=128, sym=False), learn=False, nested=(4, 2))
    scale, zero = t.qparams()
    assert torch.equal(torch.remainder(zero, 64), torch.zeros_like(zero))
    nearest = get_format("int").quantize_codes(t.wg, scale, zero, 8, None).float()
    diff = (t.grouped_codes().float() - nearest).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.05
