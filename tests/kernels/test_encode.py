"""The GPU encoder against the reference codec. Kernels run on kernel_cases.DEVICE: the CPU
under Triton's interpreter, or compiled on a GPU (``PACKKV_TEST_DEVICE=cuda``)."""

import pytest
import torch
from kernel_cases import DEVICE

from packkv import PackKVConfig, compress_kv
from packkv.codec.bitpack import bit_length, pack_planes
from packkv.kernels.encode import encode_kv, encode_kv_fused, pack_planes_triton


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
    big = torch.randn(2, 3, 140, 128, generator=g).half().to(DEVICE)
    k, v = big[:, :2], big[:, 1:]  # views with a head stride of the parent
    config = PackKVConfig(repack="median")
    ref = compress_kv(k.cpu(), v.cpu(), config)
    fast, _ = encode_kv_fused(k, v, config)
    assert_identical(fast, ref)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("where, value, message", [
    ((0, 1, 37, 9), float("nan"), r"v has a non-finite value \(nan\) at batch 0, head 1, token 37, channel 9"),
    ((0, 0, 70, 3), 70000.0, r"v has a value beyond the fp16 range \(70000.0\) at batch 0, head 0, token 70, channel 3"),
])
def test_fused_encoder_rejects_what_the_codec_rejects(where, value, message):
    # The kernel checks the blocks' values (token 37), the tail (token 70) is checked apart;
    # either way the error is check_kv's. fp32 input: 70000 is beyond fp16 before rounding.
    g = torch.Generator().manual_seed(13)
    k, v = torch.randn(2, 1, 2, 72, 64, generator=g)
    v[where] = value
    with pytest.raises(ValueError, match=message):
        encode_kv_fused(k.to(DEVICE), v.to(DEVICE), PackKVConfig(repack="median"))
