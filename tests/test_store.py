import math

import pytest
import torch

from packkv import PackKVConfig, compress_kv
from packkv.codec import decode_tensor, unpack_ints
from packkv.store import PackedStore


def random_kv(shape, seed=0, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(*shape, generator=g) * torch.linspace(0.1, 4, shape[-1])
    v = torch.randn(*shape, generator=g)
    return k.to(dtype), v.to(dtype)


CONFIGS = [
    PackKVConfig(block_size=32, pack_size=32, repack="median"),
    PackKVConfig(block_size=64, pack_size=32, repack="greedy", k_grouping="token", min_bits=8),
    PackKVConfig(block_size=64, pack_size=64, repack="none", v_grouping="channel", min_bits=0),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["median", "greedy-token", "none-channel"])
def test_appending_blocks_one_by_one_equals_compressing_at_once(config):
    s = config.block_size
    k, v = random_kv((2, 3, 7 * s, 32), seed=s)
    store = PackedStore(config, initial_blocks=1)
    perms = []
    # Uneven appends: 1, 2, 1, 3 blocks.
    start = 0
    for n in (1, 2, 1, 3):
        perms.append(store.append(k[:, :, start : start + n * s], v[:, :, start : start + n * s]) + start)
        start += n * s
    whole, perm = compress_kv(k, v, config, return_permutation=True)
    assert torch.equal(torch.cat(perms, dim=2), perm)
    assert store.n_tokens == 7 * s and store.n_blocks == 7
    for got, ref in ((store.k, whole.k), (store.v, whole.v)):
        assert (got.batch, got.heads, got.n_packs, got.head_dim) == (ref.batch, ref.heads, ref.n_packs, ref.head_dim)
        assert torch.equal(unpack_ints(got), unpack_ints(ref))
        assert torch.equal(decode_tensor(got), decode_tensor(ref))
        for name in ("widths", "mins", "scale", "zero"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), name
        # Same words, only placed differently: the used part of the pool is as large.
        assert got.words.numel() == ref.words.numel()
    assert store.nbytes == whole.k.nbytes + whole.v.nbytes
    assert store.allocated_nbytes >= store.nbytes


def test_views_share_storage_with_the_store():
    config = PackKVConfig(block_size=32, pack_size=32, repack="none")
    store = PackedStore(config, initial_blocks=8)
    k, v = random_kv((1, 2, 64, 16))
    store.append(k, v)
    view = store.k
    assert view.words.data_ptr() == store._k.words.data_ptr()
    assert view.offsets.data_ptr() == store._k.meta["offsets"].data_ptr()
    assert view.offsets.shape == (1, 2, 2)


def test_growth_is_geometric():
    config = PackKVConfig(block_size=32, pack_size=32, repack="none")
    store = PackedStore(config, initial_blocks=1)
    k, v = random_kv((1, 2, 32, 16))
    n = 200
    for i in range(n):
        store.append(k, v)
    # Metadata and word pools double: about log2(n) reallocations each, for K and V.
    assert store.reallocations <= 2 * 2 * (math.ceil(math.log2(n)) + 1)
    assert store.allocated_nbytes <= 2 * store.nbytes + 4096
    assert torch.equal(decode_tensor(store.k)[:, :, -32:], decode_tensor(store.k)[:, :, :32])


def test_select_batch_and_truncate():
    config = PackKVConfig(block_size=32, pack_size=32, repack="median")
    k, v = random_kv((3, 2, 96, 16), seed=3)
    store = PackedStore(config)
    store.append(k[:, :, :64], v[:, :, :64])
    words_after_two = store._k.n_words
    store.append(k[:, :, 64:], v[:, :, 64:])
    ref = decode_tensor(store.v)
    idx = torch.tensor([2, 0, 0])
    store.select_batch(idx)
    assert torch.equal(decode_tensor(store.v), ref[idx])
    store.truncate(2)
    assert store.n_tokens == 64 and store._k.n_words == words_after_two
    assert torch.equal(decode_tensor(store.v), ref[idx][:, :, :64])
    # Appending after a truncation reuses the pool and decodes right.
    perm = store.append(k[idx][:, :, 64:], v[idx][:, :, 64:])
    assert torch.equal(decode_tensor(store.v), ref[idx])
    assert perm.shape == (3, 2, 32)


def test_to_moves_in_place():
    store = PackedStore(PackKVConfig(block_size=32, pack_size=32, repack="none"))
    k, v = random_kv((1, 1, 32, 16))
    store.append(k, v)
    assert store.to("cpu") is store and store.device == torch.device("cpu")


def test_bad_appends_raise_clear_errors():
    config = PackKVConfig(block_size=32, pack_size=32, repack="none")
    store = PackedStore(config)
    with pytest.raises(RuntimeError, match="empty"):
        store.k
    k, v = random_kv((1, 2, 40, 16))
    with pytest.raises(ValueError, match="whole blocks of 32"):
        store.append(k, v)
    store.append(k[:, :, :32], v[:, :, :32])
    k2, v2 = random_kv((1, 3, 32, 16))
    with pytest.raises(ValueError, match=r"\(1, 3, 16\)"):
        store.append(k2, v2)
    with pytest.raises(ValueError, match="initial_blocks"):
        PackedStore(config, initial_blocks=0)
    with pytest.raises(ValueError, match="n_blocks"):
        store.truncate(5)
