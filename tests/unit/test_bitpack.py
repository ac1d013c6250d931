import pytest
import torch

from signround.pack.bitpack import pack_bitstream, pack_int32, unpack_bitstream, unpack_int32, values_per_word


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


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 31, 32, 100, 576])
def test_bitstream_round_trip_is_exact(bits, n):
    g = torch.Generator().manual_seed(bits * 7 + n)
    codes = torch.randint(0, 2**bits, (3, n), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_bitstream(codes, bits)
    assert packed.shape == (3, -(-n * bits // 32))
    assert torch.equal(unpack_bitstream(packed, bits, n), codes)
    if 32 % bits == 0:  # dense and per-word packing agree when codes never straddle words
        assert torch.equal(packed, pack_int32(codes, bits))


def test_bitstream_3bit_straddles_words_like_gptq():
    # element 10 of a 3-bit stream occupies bits 30, 31 of word 0 and bit 0 of word 1
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 10] = 0b101
    packed = pack_bitstream(codes, 3)
    assert packed.shape == (1, 3)
    assert packed[0, 0].item() == 2**30  # value bit 0 -> word bit 30, value bit 1 (0) -> word bit 31
    assert packed[0, 1].item() == 1 and packed[0, 2].item() == 0


def test_bitstream_matches_compressed_tensors():
    from compressed_tensors.compressors.pack_quantized import helpers as ct

    g = torch.Generator().manual_seed(0)
    for bits in (3, 4, 6, 8):
        codes = torch.randint(0, 2**bits, (4, 96), generator=g).to(torch.uint8)
        signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
        assert torch.equal(pack_bitstream(codes, bits), ct.pack_to_int32(signed, bits))
