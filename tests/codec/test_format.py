"""PackedKV across devices, and no shared mutable buffers between caches."""

import pytest
import torch

from packkv import PackKVConfig, compress_kv, decompress_kv
from packkv.codec.validate import validate_packed

CONFIG = PackKVConfig(block_size=32, pack_size=32)


def random_kv(shape, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype), torch.randn(*shape, generator=g).to(dtype)


def storages(kv) -> list[int]:
    tensors = [*kv.k.tensors().values(), *kv.v.tensors().values(), kv.k_tail, kv.v_tail]
    return [t.untyped_storage().data_ptr() for t in tensors if t.numel()]


@pytest.mark.parametrize("shape", [(1, 1, 70, 16), (2, 3, 40, 32), (1, 1, 10, 16)])
def test_to_cpu_keeps_it_valid(shape):
    kv = compress_kv(*random_kv(shape), CONFIG)
    moved = kv.to(torch.device("cpu"))
    validate_packed(moved)
    for a, b in zip(decompress_kv(moved), decompress_kv(kv)):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_cuda_round_trip():
    kv = compress_kv(*random_kv((2, 2, 100, 32)), CONFIG)
    gpu = kv.to("cuda")
    validate_packed(gpu)
    assert all(t.is_cuda for t in (*gpu.k.tensors().values(), *gpu.v.tensors().values(), gpu.k_tail, gpu.v_tail))
    for a, b in zip(decompress_kv(gpu), decompress_kv(kv)):
        assert torch.equal(a.cpu(), b)
    back = gpu.to("cpu")
    validate_packed(back)
    assert not set(storages(back)) & set(storages(kv))
    for a, b in zip(decompress_kv(back), decompress_kv(kv)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(1, 1, 70, 16), (1, 1, 10, 16), (2, 3, 40, 32)])
def test_compress_results_share_no_memory(shape):
    # One batch row and head: the tail is a contiguous slice of the input, which the
    # codec must copy rather than keep.
    k, v = random_kv(shape)
    a, b = compress_kv(k, v, CONFIG), compress_kv(k, v, CONFIG)
    inputs = {k.untyped_storage().data_ptr(), v.untyped_storage().data_ptr()}
    ptrs = storages(a) + storages(b)
    assert len(set(ptrs)) == len(ptrs) and not set(ptrs) & inputs
    expected = decompress_kv(b)
    k.zero_()
    v.fill_(7)
    a.k.words.add_(1)
    a.v_tail.zero_()
    for x, y in zip(decompress_kv(b), expected):
        assert torch.equal(x, y)
