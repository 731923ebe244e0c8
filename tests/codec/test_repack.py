import pytest
import torch

from packkv import PackKVConfig, compress_kv, decompress_kv
from packkv.codec.repack import repack_permutation


def kv(shape, seed):
    g = torch.Generator().manual_seed(seed)
    # Tokens of a few kinds, so that ordering matters for the pack widths.
    kind = torch.randint(0, 4, shape[:3], generator=g).unsqueeze(-1).float()
    k = torch.randn(*shape, generator=g) * 0.3 + kind * torch.randn(shape[-1], generator=g)
    v = torch.randn(*shape, generator=g) * 0.3 + kind
    return k.half(), v.half()


@pytest.mark.parametrize("method", ["greedy", "median", "none"])
def test_is_a_permutation_of_each_block(method):
    g = torch.Generator().manual_seed(0)
    q_k = torch.randint(0, 12, (2, 3, 4, 64, 16), generator=g, dtype=torch.int32)
    q_v = torch.randint(0, 6, (2, 3, 4, 64, 16), generator=g, dtype=torch.int32)
    perm = repack_permutation(q_k, q_v, 32, method, 4)
    assert perm.shape == (2, 3, 4, 64)
    assert torch.equal(perm.sort(-1).values, torch.arange(64).expand_as(perm))


@pytest.mark.parametrize("method", ["greedy", "median"])
@pytest.mark.parametrize("block_size, pack_size", [(64, 32), (128, 32), (128, 64)])
@pytest.mark.parametrize("min_bits", [0, 4, 8])
def test_repacking_never_larger_than_none(method, block_size, pack_size, min_bits):
    k, v = kv((1, 2, 3 * block_size, 64), seed=block_size + min_bits)
    base = dict(block_size=block_size, pack_size=pack_size, min_bits=min_bits)
    none = compress_kv(k, v, PackKVConfig(repack="none", **base))
    packed = compress_kv(k, v, PackKVConfig(repack=method, **base))
    assert packed.k.words.numel() + packed.v.words.numel() <= none.k.words.numel() + none.v.words.numel()
    assert packed.nbytes <= none.nbytes


def test_greedy_helps_on_clustered_tokens():
    k, v = kv((1, 2, 256, 64), seed=3)
    config = dict(block_size=128, pack_size=32)
    none = compress_kv(k, v, PackKVConfig(repack="none", **config))
    greedy = compress_kv(k, v, PackKVConfig(repack="greedy", **config))
    assert greedy.nbytes < none.nbytes


@pytest.mark.parametrize("method", ["greedy", "median"])
def test_one_permutation_moves_k_and_v_alike(method):
    k, v = kv((2, 2, 128, 32), seed=5)
    # V carries a label of each token: after decompression each V row still names the
    # token whose K row sits beside it.
    labels = torch.randperm(128, generator=torch.Generator().manual_seed(9))
    v = labels.view(1, 1, 128, 1).expand(2, 2, 128, 32).half()
    config = PackKVConfig(block_size=64, repack=method, k_rel=1e-4, v_rel=1e-4, v_grouping="channel")
    packed, perm = compress_kv(k, v, config, return_permutation=True)
    k_out, v_out = decompress_kv(packed)
    token = torch.argsort(labels)[v_out[..., 0].round().long()]
    assert torch.equal(token, perm)
    expected_k = torch.gather(k, 2, token.unsqueeze(-1).expand_as(k))
    assert (k_out.float() - expected_k.float()).abs().max() < 0.01
    assert not torch.equal(perm, torch.arange(128).expand_as(perm))
