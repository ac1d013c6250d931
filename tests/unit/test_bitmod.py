"""BitMoD mixture of datatypes: the value tables, exact round trips, the per-group type choice, SignRound on
the mixed grid, and checkpoint round trips."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import signround
from signround.config import QuantScheme
from signround.formats import get_format
from signround.formats.bitmod import AFFINE, TYPE_NAMES, choose_types, table_round, tables
from signround.mixed.budget import layer_bits
from tests.conftest import quantize_tiny

FMT = get_format("bitmod")
SCHEME = QuantScheme(dtype="bitmod")
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # the OCP FP4 magnitudes, written out


def test_tables_are_int4_and_fp4_with_one_special_value():
    t = tables()
    assert t.shape == (len(TYPE_NAMES), 16)
    assert t[AFFINE].tolist() == list(range(16))
    fp4 = sorted({s * m for m in E2M1 for s in (1, -1)})
    for row, special in zip(t[1:], (5.0, -5.0, 8.0, -8.0), strict=True):
        assert row.tolist() == sorted(fp4 + [special])
        assert bool((row[1:] > row[:-1]).all())


def _qparams(types: torch.Tensor, wg: torch.Tensor):
    wmin, wmax, _ = FMT.group_minmax(wg)
    return FMT.choose_qparams((wmin, wmax, types), SCHEME)


@pytest.mark.parametrize("type_id", range(len(TYPE_NAMES)))
def test_every_table_value_round_trips_exactly(type_id):
    t = tables()[type_id]
    scale = 0.0625
    # one group holding every value of the table (minus a zero point for int4): quantization is lossless
    zp = 3 if type_id == AFFINE else 0
    wg = ((t - zp) * scale).reshape(1, 1, 16)
    types = torch.full((1, 1), type_id, dtype=torch.uint8)
    s, z = _qparams(types, wg)
    codes = FMT.quantize_codes(wg, s, z)
    assert codes.flatten().tolist() == list(range(16))
    assert torch.equal(FMT.dequantize_codes(codes, s, z), wg)
    assert torch.equal(FMT.fake_quant(wg, s, z), wg)


def test_rounding_goes_to_the_nearer_neighbour_and_ties_to_the_even_index():
    table = tables()[1].reshape(1, 1, 16)  # ... 3, 4, 5, 6
    x = torch.tensor([4.4, 4.6, 4.5, 5.5, 7.0, -9.0]).reshape(1, 1, 6)
    index, value, step = table_round(x, table)
    # 4.5 and 5.5 are ties: 4 (index 13) / 5 (14) / 6 (15), so both go to 5, the even index
    assert value.flatten().tolist() == [4.0, 5.0, 5.0, 5.0, 6.0, -6.0]
    assert index.flatten().tolist() == [13, 14, 14, 14, 15, 0]
    assert step.flatten()[:2].tolist() == [1.0, 1.0]
    # an offset of half a step moves to the upper / lower neighbour
    up, _, _ = table_round(x[..., :1], table, torch.full((1, 1, 1), 0.5))
    down, _, _ = table_round(torch.full((1, 1, 1), 4.6), table, torch.full((1, 1, 1), -0.5))
    assert tables()[1][up.item()] == 5.0 and tables()[1][down.item()] == 4.0


def test_type_choice_has_the_least_error_of_every_type():
    torch.manual_seed(0)
    wg = torch.randn(32, 6, 128) * torch.rand(32, 6, 1)
    wg[:4] = wg[:4].abs()  # skewed groups favour the asymmetric types
    wmin, wmax, chosen = FMT.group_minmax(wg)
    assert torch.equal(chosen, choose_types(wg, wmin, wmax))
    errors = []
    for type_id in range(len(TYPE_NAMES)):
        types = torch.full(wmin.shape, type_id, dtype=torch.uint8)
        s, z = FMT.choose_qparams((wmin, wmax, types), SCHEME)
        errors.append((FMT.fake_quant(wg, s, z) - wg).pow(2).sum(-1))
    errors = torch.stack(errors)
    s, z = FMT.choose_qparams((wmin, wmax, chosen), SCHEME)
    mixed = (FMT.fake_quant(wg, s, z) - wg).pow(2).sum(-1)
    assert torch.allclose(mixed, errors.min(0).values)
    assert len(torch.unique(chosen)) >= 3  # a real mixture on these weights


def test_sqnr_beats_int4_and_fp4_alone_on_gaussian_weights():
    torch.manual_seed(1)
    w = torch.randn(256, 4, 128)

    def sqnr(dtype: str) -> float:
        fmt = get_format(dtype)
        scheme = QuantScheme(dtype=dtype)
        s, z = fmt.choose_qparams(fmt.group_minmax(w), scheme)
        err = fmt.fake_quant(w, s, z, scheme.bits) - w
        return float(10 * torch.log10(w.pow(2).sum() / err.pow(2).sum()))

    bitmod, int4, fp4 = sqnr("bitmod"), sqnr("int"), sqnr("fp4_e2m1")
    assert 19.0 < int4 < bitmod and fp4 < bitmod
    assert bitmod - max(int4, fp4) > 0.3


def test_gradients_reach_offsets_and_both_clipping_factors():
    torch.manual_seed(2)
    wg = torch.randn(8, 2, 32)
    wmin, wmax, types = FMT.group_minmax(wg)
    types = torch.tensor([[AFFINE, 1]] * 4 + [[3, 4]] * 4, dtype=torch.uint8)
    a = torch.ones(8, 2, requires_grad=True)
    b = torch.ones(8, 2, requires_grad=True)
    v = torch.zeros_like(wg, requires_grad=True)
    s, z = FMT.choose_qparams((wmin, wmax, types), SCHEME, a, b)
    FMT.fake_quant(wg, s, z, 4, v).pow(2).sum().backward()
    assert v.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    assert a.grad[:4, 0].abs().sum() > 0  # int4_asym groups learn the lower clip too


def test_bits_per_weight_count_scale_zero_and_type_id():
    scheme = QuantScheme(dtype="bitmod")
    assert layer_bits(scheme, 4, 256) == 4 * 4 * 256 + 4 * 2 * (16 + 4 + 3)
    assert layer_bits(QuantScheme(), 4, 256) == 4 * 4 * 256 + 4 * 2 * 20


def test_signround_tunes_and_the_checkpoint_reloads(tmp_path, tokenizer):
    scheme = QuantScheme(dtype="bitmod", group_size=32)
    q = quantize_tiny(tokenizer, scheme=scheme)
    ids = torch.tensor([[5, 17, 33, 90, 200, 7, 9, 11, 64, 3]])
    with torch.no_grad():
        ref = q(ids).logits
    signround.save(q, tokenizer, tmp_path / "native")
    loaded, _ = signround.load_model(str(tmp_path / "native"))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    qc = json.loads((tmp_path / "native/config.json").read_text())["quantization_config"]
    assert qc["dtype"] == "bitmod"
    with safe_open(str(tmp_path / "native/model.safetensors"), framework="pt") as f:
        types = f.get_tensor("model.layers.0.mlp.down_proj.types")
        assert types.dtype == torch.uint8 and int(types.max()) < len(TYPE_NAMES)
