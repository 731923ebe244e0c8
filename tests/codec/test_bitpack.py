import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from packkv.codec.bitpack import (
    PACK_ALIGN_WORDS,
    bit_length,
    pack_mins,
    pack_mins_widths,
    pack_nibbles,
    pack_planes,
    unpack_mins,
    unpack_nibbles,
    unpack_planes,
)


def random_packs(n, pack_size, head_dim, seed):
    g = torch.Generator().manual_seed(seed)
    widths = torch.randint(0, 16, (n, head_dim), generator=g)
    u = (torch.rand(n, pack_size, head_dim, generator=g) * (2.0 ** widths.unsqueeze(1))).long().int()
    return u


@pytest.mark.parametrize("pack_size", [32, 64])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_planes_round_trip_exact(pack_size, head_dim):
    u = random_packs(5, pack_size, head_dim, seed=head_dim + pack_size)
    widths = bit_length(u.amax(1))
    words, offsets = pack_planes(u, widths)
    assert words.dtype == torch.int32
    assert (offsets % PACK_ALIGN_WORDS == 0).all()
    # Exactly the planes plus alignment padding are stored.
    used = widths.long().sum(1) * (pack_size // 32)
    assert words.numel() == int((-(-used // PACK_ALIGN_WORDS) * PACK_ALIGN_WORDS).sum())
    assert torch.equal(unpack_planes(words, offsets, widths, pack_size), u)


def test_plane_bit_layout():
    # One pack, one 1-bit channel: the word is the tokens' bits, token j at bit j.
    u = torch.zeros(1, 32, 16, dtype=torch.int32)
    u[0, [0, 3, 31], 2] = 1
    words, _ = pack_planes(u, bit_length(u.amax(1)))
    assert words[0].item() == (1 | 8 | (1 << 31)) - (1 << 32)


def test_zero_packs_and_zero_widths():
    u = torch.zeros(0, 32, 16, dtype=torch.int32)
    words, offsets = pack_planes(u, torch.zeros(0, 16, dtype=torch.uint8))
    assert words.numel() == 0 and offsets.numel() == 0
    u = torch.zeros(2, 32, 16, dtype=torch.int32)
    words, offsets = pack_planes(u, bit_length(u.amax(1)))
    assert words.numel() == 0
    assert torch.equal(unpack_planes(words, offsets, torch.zeros(2, 16, dtype=torch.uint8), 32), u)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), pack_size=st.sampled_from([32, 64]),
       head_dim=st.sampled_from([16, 32, 64]), min_bits=st.sampled_from([0, 4, 8]))
def test_mins_widths_round_trip_property(seed, n, pack_size, head_dim, min_bits):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 10001, (n, 1, head_dim), generator=g) + torch.randint(0, 300, (n, pack_size, head_dim), generator=g)
    q = q.int().clamp(max=32767)
    mins, widths = pack_mins_widths(q, min_bits)
    assert widths.max() <= 15
    assert (mins.int() < (1 << min_bits) if min_bits else mins == 0).all()
    words, offsets = pack_planes(q - mins.unsqueeze(1).int(), widths)
    stored = pack_mins(mins, min_bits)
    assert stored.shape[-1] == head_dim * min_bits // 8
    back = unpack_planes(words, offsets, unpack_nibbles(pack_nibbles(widths)), pack_size)
    assert torch.equal(back + unpack_mins(stored, min_bits, head_dim).unsqueeze(1).int(), q)


def test_bit_length():
    u = torch.tensor([0, 1, 2, 3, 4, 7, 8, 255, 256, 32767])
    assert bit_length(u).tolist() == [0, 1, 2, 2, 3, 3, 4, 8, 9, 15]
