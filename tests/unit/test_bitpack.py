import pytest
import torch

from signround.pack.bitpack import pack_int32, unpack_int32, values_per_word


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 7, 32, 100, 576])
def test_round_trip_is_exact(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (5, n), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_int32(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (5, -(-n // values_per_word(bits)))
    assert torch.equal(unpack_int32(packed, bits, n), codes)


def test_layout_lsb_first():
    codes = torch.tensor([[1, 2, 3]], dtype=torch.uint8)
    assert pack_int32(codes, 4).item() == 1 | (2 << 4) | (3 << 8)
    # 3-bit: ten values per word, top two bits unused
    assert values_per_word(3) == 10
    all7 = torch.full((1, 10), 7, dtype=torch.uint8)
    assert pack_int32(all7, 3).item() == 2**30 - 1


def test_high_bit_set_becomes_negative_int32():
    codes = torch.full((1, 8), 15, dtype=torch.uint8)
    assert pack_int32(codes, 4).item() == -1
    assert torch.equal(unpack_int32(pack_int32(codes, 4), 4, 8), codes)


def test_out_of_range_codes_are_refused():
    with pytest.raises(ValueError):
        pack_int32(torch.tensor([[16]]), 4)
