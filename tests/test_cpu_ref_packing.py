"""cpu_ref.packing: the i2 and tq1 packings are lossless, validated, and laid out as documented."""

import pytest
import torch

from cpu_ref import PackingError
from cpu_ref.packing import pack_i2, pack_tq1, packed_shape, unpack_i2, unpack_tq1
from cpu_ref_helpers import K_SIZES, random_codes


# ---------------------------------------------------------------- packing

@pytest.mark.parametrize("k", K_SIZES)
@pytest.mark.parametrize("n", [1, 3, 8])
def test_i2_round_trip(n, k):
    codes = random_codes(n, k, seed=n * 1000 + k)
    packed = pack_i2(codes)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == packed_shape("i2", n, k)
    assert torch.equal(unpack_i2(packed, k), codes)


@pytest.mark.parametrize("k", K_SIZES)
@pytest.mark.parametrize("n", [1, 3, 8])
def test_tq1_round_trip(n, k):
    codes = random_codes(n, k, seed=n * 1000 + k + 7)
    packed = pack_tq1(codes)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (n, -(-k // 5))
    assert int(packed.max()) <= 242
    assert torch.equal(unpack_tq1(packed, k), codes)


def test_packing_layouts_are_the_documented_ones():
    # i2: byte j of a 256-block holds weights j, j+64, j+128, j+192 in bits 0-1, 2-3, 4-5, 6-7 as code + 1.
    codes = torch.zeros(1, 256, dtype=torch.int8)
    codes[0, 5], codes[0, 5 + 64], codes[0, 5 + 128], codes[0, 5 + 192] = 1, -1, 0, 1
    assert pack_i2(codes)[0, 5].item() == 2 | (0 << 2) | (1 << 4) | (2 << 6)
    assert pack_i2(codes)[0, 6].item() == 0b01010101  # all zeros -> q = 1 everywhere
    # tq1: byte i = sum_j (code_{5i+j} + 1) 3^j; padding is code 0.
    assert pack_tq1(torch.tensor([[1, -1, 0, 1, -1, 1]], dtype=torch.int8)).tolist() == [[2 + 0 + 9 + 54 + 0, 2 + 3 + 9 + 27 + 81]]


def test_all_ternary_patterns_round_trip():
    # Every one of the 3^5 = 243 five-trit patterns, in both packings.
    v = torch.arange(243)
    codes = torch.stack([(v // 3 ** j) % 3 - 1 for j in range(5)], dim=1).reshape(1, -1).to(torch.int8)
    assert torch.equal(unpack_tq1(pack_tq1(codes), codes.shape[1]), codes)
    assert torch.equal(unpack_i2(pack_i2(codes), codes.shape[1]), codes)


def test_pack_rejects_bad_codes():
    with pytest.raises(TypeError, match="int8"):
        pack_i2(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="ternary"):
        pack_i2(torch.tensor([[0, 2]], dtype=torch.int8))
    with pytest.raises(ValueError, match="2-D"):
        pack_tq1(torch.zeros(4, dtype=torch.int8))


def test_unpack_rejects_corrupt_data():
    packed = pack_i2(random_codes(2, 300))
    bad = packed.clone()
    bad[1, 3] |= 0b11000000  # the 2-bit value 3 is no code
    with pytest.raises(PackingError, match="value 3"):
        unpack_i2(bad, 300)
    with pytest.raises(PackingError, match="shape"):
        unpack_i2(packed[:, :-1], 300)
    bad = packed.clone()
    bad[0, -1] = 0  # padding past K=300 must be code 0 (q = 1)
    with pytest.raises(PackingError, match="padding"):
        unpack_i2(bad, 300)
    t = pack_tq1(random_codes(2, 12))
    t[0, 0] = 250
    with pytest.raises(PackingError, match="> 242"):
        unpack_tq1(t, 12)
    with pytest.raises(PackingError, match="shape"):
        unpack_tq1(pack_tq1(random_codes(2, 12)), 16)
