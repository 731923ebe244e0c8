"""Long run: one token at a time into a growing PackedStore, as a cache appends."""

import math

import torch

from packkv import PackKVConfig, compress_kv
from packkv.codec import decode_tensor
from packkv.codec.validate import validate_packed
from packkv.store import PackedStore

STEPS = 20_000 + 17  # tokens; the last 17 stay in the fp16 buffer
# K per channel, the setting this bound was written for; with per-token K the store's
# allocation can exceed twice the used bytes (noted as an open problem in docs/benchmarks.md).
CONFIG = PackKVConfig(block_size=32, pack_size=32, repack="median", k_grouping="channel", k_rel=0.1, v_rel=0.2)


def test_one_token_appends_for_20k_steps():
    g = torch.Generator().manual_seed(0)
    d = 16
    k = (torch.randn(1, 1, STEPS, d, generator=g) * torch.linspace(0.1, 4, d)).half()
    v = torch.randn(1, 1, STEPS, d, generator=g).half()
    s = CONFIG.block_size
    store = PackedStore(CONFIG, initial_blocks=4)
    buf_k = torch.empty(1, 1, s, d, dtype=torch.float16)
    buf_v = torch.empty_like(buf_k)
    fill = 0
    perms = []
    copied = 0  # bytes copied by reallocations, at most the allocation each one replaces
    first_allocation = None
    for t in range(STEPS):
        buf_k[:, :, fill] = k[:, :, t]
        buf_v[:, :, fill] = v[:, :, t]
        fill += 1
        if fill < s:
            continue
        before_nbytes, before_alloc, before_reallocs = store.nbytes, store.allocated_nbytes, store.reallocations
        perms.append(store.append(buf_k, buf_v) + (t + 1 - s))
        fill = 0
        first_allocation = first_allocation or store.allocated_nbytes
        if store.reallocations > before_reallocs:
            copied += before_alloc
        # Memory tracks the packed bytes: grows with them, at most twice them plus the start.
        assert store.nbytes > before_nbytes
        assert store.allocated_nbytes <= 2 * store.nbytes + first_allocation

    n_blocks = STEPS // s
    full = n_blocks * s
    assert store.n_blocks == n_blocks and fill == STEPS - full
    # Geometric growth: O(log n) reallocations, and all copying adds up to O(final size).
    assert store.reallocations <= 2 * 2 * (math.ceil(math.log2(n_blocks / 4)) + 1)
    assert copied <= 2 * store.allocated_nbytes

    whole, perm = compress_kv(k, v, CONFIG, return_permutation=True)
    assert torch.equal(torch.cat(perms, dim=2), perm)
    assert store.nbytes == whole.k.nbytes + whole.v.nbytes
    for got, ref in ((store.k, whole.k), (store.v, whole.v)):
        validate_packed(got)
        for name, t in ref.tensors().items():
            assert torch.equal(getattr(got, name), t), name
        assert torch.equal(decode_tensor(got), decode_tensor(ref))
    assert torch.equal(buf_k[:, :, :fill], whole.k_tail) and torch.equal(buf_v[:, :, :fill], whole.v_tail)
