"""The GPU encoder against the reference codec. Kernels run on kernel_cases.DEVICE: the CPU
under Triton's interpreter, or compiled on a GPU (``PACKKV_TEST_DEVICE=cuda``)."""

import pytest
import torch
import triton
import triton.language as tl
from kernel_cases import DEVICE

from packkv import PackKVConfig, compress_kv
from packkv.codec.bitpack import bit_length, pack_planes
from packkv.kernels.encode import (
    AGGREGATE, INCLUSIVE, _exclusive_prefix, encode_kv, encode_kv_fused, pack_planes_triton,
)


@pytest.mark.parametrize("pack_size", [32, 64])
@pytest.mark.parametrize("head_dim", [16, 64, 80, 128])
def test_pack_planes_kernel_matches_reference(pack_size, head_dim):
    g = torch.Generator().manual_seed(head_dim * pack_size)
    widths = torch.randint(0, 16, (3, head_dim), generator=g)
    u = (torch.rand(3, pack_size, head_dim, generator=g) * (2.0 ** widths.unsqueeze(1))).long().int()
    widths = bit_length(u.amax(1))
    words, offsets = pack_planes_triton(u.to(DEVICE), widths.to(DEVICE))
    ref_words, ref_offsets = pack_planes(u, widths)
    assert torch.equal(offsets.cpu(), ref_offsets)
    assert torch.equal(words.cpu(), ref_words)


@pytest.mark.parametrize("config", [
    PackKVConfig(repack="median"),
    PackKVConfig(repack="none", pack_size=64, block_size=128, min_bits=8, k_grouping="token"),
])
def test_encode_kv_kernel_path_matches_codec(config, monkeypatch):
    g = torch.Generator().manual_seed(3)
    k = torch.randn(1, 2, 200, 64, generator=g).half()
    v = torch.randn(1, 2, 200, 64, generator=g).half()
    ref = compress_kv(k, v, config)
    fast = compress_kv(k.to(DEVICE), v.to(DEVICE), config, packer=pack_planes_triton).to("cpu")
    for side in ("k", "v"):
        for name, tensor in getattr(ref, side).tensors().items():
            assert torch.equal(getattr(getattr(fast, side), name), tensor), (side, name)
    # On CPU encode_kv is the reference codec itself; on CUDA the fused kernels.
    assert torch.equal(encode_kv(k.to(DEVICE), v.to(DEVICE), config).k.words.cpu(), ref.k.words)


def assert_identical(fast, ref):
    fast = fast.to("cpu")
    for side in ("k", "v"):
        for name, tensor in getattr(ref, side).tensors().items():
            got = getattr(getattr(fast, side), name)
            assert got.shape == tensor.shape and torch.equal(got, tensor), (side, name)
        assert getattr(fast, side).width_bound == getattr(ref, side).width_bound
    assert torch.equal(fast.k_tail, ref.k_tail) and torch.equal(fast.v_tail, ref.v_tail)


@pytest.mark.parametrize("config", [
    PackKVConfig(repack="median"),
    PackKVConfig(repack="median", k_grouping="token", v_grouping="channel", min_bits=8, k_rel=0.02, v_rel=0.5),
    PackKVConfig(repack="none", pack_size=64, block_size=128, min_bits=0),
    PackKVConfig(repack="median", pack_size=32, block_size=128, min_bits=4, k_rel=1e-3),
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_encoder_is_bit_identical(config, dtype):
    g = torch.Generator().manual_seed(11)
    # Clustered tokens and an outlier channel, so that median repacking moves tokens.
    kind = torch.randint(0, 3, (1, 2, 300, 1), generator=g).float()
    k = (torch.randn(1, 2, 300, 64, generator=g) + kind) * torch.linspace(0.2, 3, 64)
    v = (torch.randn(1, 2, 300, 64, generator=g) * 0.5 + kind).to(dtype)
    v[0, 0, :64, 0] = 9000.0  # an outlier: wide integers for the median search
    k = k.to(dtype)
    ref, ref_perm = compress_kv(k, v, config, return_permutation=True)
    fast, perm = encode_kv_fused(k.to(DEVICE), v.to(DEVICE), config)
    assert_identical(fast, ref)
    assert torch.equal(perm.cpu(), ref_perm)


def test_fused_encoder_strided_input_and_head_dim_128():
    g = torch.Generator().manual_seed(12)
    big = torch.randn(2, 3, 140, 136, generator=g).half().to(DEVICE)
    # Views with a head stride of the parent; v's token stride (136) is no multiple of 16,
    # which the kernel's vector loads need: the wrapper copies it.
    k, v = big[:, :2, :, :128].contiguous(), big[:, 1:, :, 8:]
    config = PackKVConfig(repack="median")
    ref = compress_kv(k.cpu(), v.cpu(), config)
    fast, _ = encode_kv_fused(k[:, :, :], v, config)
    assert_identical(fast, ref)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("side, where, value, message, config", [
    ("v", (0, 1, 37, 9), float("nan"), r"v has a non-finite value \(nan\) at batch 0, head 1, token 37, channel 9",
     PackKVConfig(repack="median")),
    ("v", (0, 0, 70, 3), 70000.0, r"v has a value beyond the fp16 range \(70000.0\) at batch 0, head 0, token 70",
     PackKVConfig(repack="median")),
    ("k", (0, 0, 5, 63), 65510.0, r"k has a value beyond the fp16 range \(65510.0\) at batch 0, head 0, token 5",
     PackKVConfig(repack="median")),
    ("k", (0, 1, 40, 0), -float("inf"), r"k has a non-finite value \(-inf\) at batch 0, head 1, token 40, channel 0",
     PackKVConfig(repack="none", k_grouping="channel")),
])
def test_fused_encoder_rejects_what_the_codec_rejects(side, where, value, message, config):
    # The kernel checks the blocks' values (tokens < 64), the tail (token 70) is checked
    # apart; either way the error is check_kv's. fp32 input: 70000 and 65510 are beyond
    # fp16's 65504 before rounding (65510 rounds to it).
    g = torch.Generator().manual_seed(13)
    kv = dict(zip("kv", torch.randn(2, 1, 2, 72, 64, generator=g)))
    kv[side][where] = value
    with pytest.raises(ValueError, match=message):
        encode_kv_fused(kv["k"].to(DEVICE), kv["v"].to(DEVICE), config)


@triton.jit(do_not_specialize=["ticket", "total"])
def _look_back_kernel(states_ptr, count_ptr, out_ptr, ticket, total):
    prefix = _exclusive_prefix(states_ptr, count_ptr, ticket.to(tl.int64), False, total.to(tl.int64))
    tl.store(out_ptr, prefix)


@pytest.mark.parametrize("ticket", [1, 15, 16, 40])
def test_look_back_sums_posts_back_to_the_nearest_inclusive_prefix(ticket):
    # Under the interpreter programs run one after another, so a program finds its
    # predecessor's inclusive prefix at once; here the posts are set by hand: aggregates
    # back to ticket 3's inclusive prefix, across windows of the look-back.
    values = torch.arange(1, 65, dtype=torch.int64) * 10
    states = torch.zeros(2 * 64, dtype=torch.int64)
    states[0 : 2 * ticket : 2] = values[:ticket] | AGGREGATE
    first = min(3, ticket - 1)
    states[2 * first] = 1000 | INCLUSIVE
    states, out = states.to(DEVICE), torch.zeros(1, dtype=torch.int64, device=DEVICE)
    _look_back_kernel[(1,)](states, torch.zeros(1, dtype=torch.int64, device=DEVICE), out, ticket, 7)
    assert out.item() == 1000 + values[first + 1 : ticket].sum().item()
    assert states[2 * ticket].item() == (out.item() + 7) | INCLUSIVE  # its own inclusive prefix
