"""PackedStore on the CPU (the reference codec) and on the fused GPU path, which runs on
DEVICE: the CPU under Triton's interpreter, or compiled on a GPU (``PACKKV_TEST_DEVICE=cuda``)."""

import math
import os
import warnings
from collections import Counter
from contextlib import contextmanager

import pytest
import torch
import triton.runtime.interpreter as interpreter
from torch.utils._python_dispatch import TorchDispatchMode

import packkv.store
from packkv import PackKVConfig, compress_kv
from packkv.codec import decode_tensor, unpack_ints
from packkv.kernels.encode import pack_word_bound
from packkv.store import GROWTH, MIN_GROWTH_BLOCKS, PackedStore


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
DEVICE = torch.device(os.environ.get("PACKKV_TEST_DEVICE", "cpu"))
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
kernels = pytest.mark.skipif(DEVICE.type == "cpu" and not INTERPRETER, reason="needs a GPU or Triton's interpreter")
interpreted = pytest.mark.skipif(DEVICE.type != "cpu" or not INTERPRETER, reason="counts the interpreter's launches")
# The fused path serves head_dim 64 and 128, median or no repacking.
FUSED_CONFIGS = [
    PackKVConfig(block_size=32, pack_size=32, repack="median"),
    PackKVConfig(block_size=64, pack_size=64, repack="none", k_grouping="channel", min_bits=8),
    PackKVConfig(block_size=64, pack_size=32, repack="median", v_grouping="channel", min_bits=0),
]


@pytest.fixture
def fused(monkeypatch):
    """Stores of DEVICE tensors take the fused path (on the CPU, run by the interpreter)."""
    if DEVICE.type == "cpu":
        monkeypatch.setattr(packkv.store, "fused_serves", lambda k, config: True)


def assert_store_equals_compressed(store, k, v, config, perms):
    """The store holds what compress_kv makes of the CPU tensors k, v (perms: token numbering)."""
    whole, perm = compress_kv(k, v, config, return_permutation=True)
    assert torch.equal(torch.cat(perms, dim=2).cpu(), perm)
    assert store.n_tokens == k.shape[2]
    for got, ref in ((store.k.to("cpu"), whole.k), (store.v.to("cpu"), whole.v)):
        assert (got.batch, got.heads, got.n_packs, got.head_dim) == (ref.batch, ref.heads, ref.n_packs, ref.head_dim)
        assert got.width_bound == ref.width_bound
        assert torch.equal(unpack_ints(got), unpack_ints(ref))
        assert torch.equal(decode_tensor(got), decode_tensor(ref))
        for name in ("widths", "mins", "scale", "zero"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), name
        # Same words, only placed differently: the used part of the pool is as large.
        assert got.words.numel() == ref.words.numel()
    assert store.nbytes == whole.k.nbytes + whole.v.nbytes
    assert store.allocated_nbytes >= store.nbytes


def append_unevenly(store, k, v, s, device="cpu"):
    """Appends of 1, 2, 1, 3 blocks on ``device``; returns the permutations in token numbering."""
    k, v = k.to(device), v.to(device)
    perms, start = [], 0
    for n in (1, 2, 1, 3):
        perms.append(store.append(k[:, :, start : start + n * s], v[:, :, start : start + n * s]) + start)
        start += n * s
    return perms


@pytest.mark.parametrize("config", CONFIGS, ids=["median", "greedy-token", "none-channel"])
def test_appending_blocks_one_by_one_equals_compressing_at_once(config):
    s = config.block_size
    k, v = random_kv((2, 3, 7 * s, 32), seed=s)
    store = PackedStore(config, initial_blocks=1)
    perms = append_unevenly(store, k, v, s)
    assert_store_equals_compressed(store, k, v, config, perms)


@kernels
@pytest.mark.parametrize("config", FUSED_CONFIGS, ids=["median", "none-channel-k", "median-channel-v"])
def test_fused_appends_equal_compressing_at_once(config, fused):
    s = config.block_size
    k, v = random_kv((1, 2, 7 * s, 64), seed=s)
    store = PackedStore(config, initial_blocks=1)
    perms = append_unevenly(store, k, v, s, DEVICE)
    assert_store_equals_compressed(store, k, v, config, perms)


class DeviceWork(TorchDispatchMode):
    """What a call would launch and sync on a GPU, counted on the CPU: Triton launches (run
    by the interpreter, whose own tensor copies are not counted), tensor ops that launch a
    kernel, and reads of tensor values by the host (each a device sync on CUDA)."""

    NO_KERNEL = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.view.default", "aten.slice.Tensor",
                 "aten.select.int", "aten.detach.default", "aten.alias.default", "aten.as_strided.default",
                 "aten.unsqueeze.default", "aten.expand.default", "aten._unsafe_view.default", "aten.unbind.int"}
    SYNCS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.item.default"}

    def __init__(self):
        super().__init__()
        self.triton, self.kernels, self.syncs = Counter(), Counter(), Counter()
        self.inside_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside_triton:
            name = str(func)
            if name in self.SYNCS:
                self.syncs[name] += 1
            elif name not in self.NO_KERNEL:
                self.kernels[name] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def count_device_work():
    work = DeviceWork()
    run = interpreter.InterpretedFunction.run

    def counted_run(fn, *args, **kwargs):
        work.triton[fn.__name__] += 1
        work.inside_triton += 1
        try:
            return run(fn, *args, **kwargs)
        finally:
            work.inside_triton -= 1

    def tolist(t):  # no dispatch on the CPU; a device-to-host copy on CUDA
        if not work.inside_triton:
            work.syncs["tolist"] += 1
        return torch._C.TensorBase.tolist(t)

    with pytest.MonkeyPatch.context() as patch, work:
        patch.setattr(interpreter.InterpretedFunction, "run", counted_run)
        patch.setattr(torch.Tensor, "tolist", tolist)
        yield work


class FakeEvent:
    """Stands for the store's CUDA event on the CPU and counts the waits for it. A recorded
    event has not landed until the test says the device caught up, or the host waits."""

    def __init__(self):
        self.done, self.waits = True, 0

    def record(self):
        self.done = False

    def query(self):
        return self.done

    def synchronize(self):
        self.waits += 1
        self.done = True


@interpreted
@pytest.mark.parametrize("landed", [True, False], ids=["read-back-landed", "host-ahead"])
def test_steady_state_append_is_one_launch_and_no_sync(landed, fused):
    config = PackKVConfig(repack="median")
    s, n = config.block_size, 10
    k, v = random_kv((1, 2, n * s, 128), seed=5)
    store = PackedStore(config)
    perms = []

    def append(i):
        perms.append(store.append(k[:, :, i * s : (i + 1) * s], v[:, :, i * s : (i + 1) * s]))

    append(0)  # allocates, and waits once for the exact word counts to size the pools
    store._event = event = FakeEvent()
    waits = []
    for i in range(1, n):
        reallocations, before = store.reallocations, event.waits
        event.done |= landed  # the device caught up between appends (generate syncs every step)
        with count_device_work() as work:
            append(i)
        grew = store.reallocations != reallocations
        waits.append(event.waits - before)
        assert dict(work.triton) == {"_encode_kernel": 1}
        assert not work.syncs  # no tensor value is read by the host
        if not grew and waits[-1] == 0:
            assert dict(work.kernels) == {"aten.copy_.default": 1}  # the counts' read-back
    # Only an append whose worst case does not fit the pool waits (once); with the
    # read-backs landing in time, that is only when the pool grows.
    assert set(waits) <= {0, 1} and waits[0] == 0 and sum(waits) <= (n - 1) // 2
    assert store.reallocations > 2
    # The views need the exact counts: they wait for the last read-back if it has not landed.
    event.done |= landed
    with count_device_work() as work:
        before = event.waits
        store.k, store.v
        store.k
    assert not work.syncs and not work.kernels and event.waits - before <= (0 if landed else 1)
    assert_store_equals_compressed(store, k, v, config, [p + i * s for i, p in enumerate(perms)])


@kernels
@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_fused_append_reports_bad_values_at_the_next_call(fused):
    config = PackKVConfig(block_size=32, pack_size=32, repack="median")
    k, v = random_kv((1, 2, 128, 64), seed=7)
    k, v = k.to(DEVICE), v.to(DEVICE)
    store = PackedStore(config)
    store.append(k[:, :, :64], v[:, :, :64])
    before = store.nbytes
    bad = v[:, :, 64:96].clone()
    bad[0, 1, 5, 9] = float("nan")
    store.append(k[:, :, 64:96], bad)  # no sync: nothing known yet
    with pytest.raises(ValueError, match=r"v has a non-finite value .* batch 0, head 1, token 69 of the store, channel 9"):
        store.k
    # The bad block is dropped, the store is whole and takes appends again.
    assert store.n_tokens == 64 and store.nbytes == before
    store.append(k[:, :, 64:], v[:, :, 64:])
    assert torch.equal(decode_tensor(store.v).cpu(), decode_tensor(compress_kv(k.cpu(), v.cpu(), config).v))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs PACKKV_TEST_DEVICE=cuda")
def test_cuda_appends_read_no_tensor_value():
    # torch's sync debug mode warns at every operation that makes the host wait for the GPU.
    config = PackKVConfig(repack="median")
    s, n = config.block_size, 24
    k, v = random_kv((1, 8, n * s, 128), seed=6)
    kd, vd = k.to(DEVICE), v.to(DEVICE)
    store = PackedStore(config)
    perms = [store.append(kd[:, :, :s], vd[:, :, :s])]
    quiet = 0
    for i in range(1, n):
        torch.cuda.synchronize()  # the last read-back has landed, as generate's per-step sync makes it
        reallocations = store.reallocations
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                perms.append(store.append(kd[:, :, i * s : (i + 1) * s], vd[:, :, i * s : (i + 1) * s]))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # torch also warns, once per switch, that the debug mode itself is a prototype.
        syncs = [str(w.message) for w in caught if "debug mode is a prototype" not in str(w.message)]
        if store.reallocations == reallocations:
            assert not syncs, syncs
            quiet += 1
    assert quiet >= n // 2
    assert_store_equals_compressed(store, k, v, config, [p + i * s for i, p in enumerate(perms)])


def test_views_share_storage_with_the_store():
    config = PackKVConfig(block_size=32, pack_size=32, repack="none")
    store = PackedStore(config, initial_blocks=8)
    k, v = random_kv((1, 2, 64, 16))
    store.append(k, v)
    view = store.k
    assert view.words.data_ptr() == store._bufs[0].words.data_ptr()
    assert view.offsets.data_ptr() == store._bufs[0].offsets.data_ptr()
    assert view.offsets.shape == (1, 2, 2)


def test_growth_is_geometric_and_allocation_tracks_use():
    config = PackKVConfig(block_size=32, pack_size=32, repack="none")
    store = PackedStore(config, initial_blocks=1)
    k, v = random_kv((1, 2, 32, 16))
    n = 200
    for i in range(n):
        store.append(k, v)
    # Metadata (K and V: 2 each) and each pool grow by GROWTH: O(log n) reallocations.
    assert store.reallocations <= 4 * (math.ceil(math.log(n) / math.log(GROWTH)) + 1)
    # Two blocks at their largest (the side's width_bound), per pool, and one word.
    room = 4 * sum(2 * store._block_word_bound(side) + 1 for side in (0, 1))
    assert store.allocated_nbytes <= GROWTH * store.nbytes + room + MIN_GROWTH_BLOCKS * (store.nbytes // n)
    assert torch.equal(decode_tensor(store.k)[:, :, -32:], decode_tensor(store.k)[:, :, :32])


def test_a_large_append_is_fitted_with_room_not_growth():
    # A prefill: its words and metadata are allocated as they come, plus room for the next
    # blocks; only later small appends grow the buffers geometrically.
    config = PackKVConfig(block_size=32, pack_size=32, repack="none")
    store = PackedStore(config, initial_blocks=1)
    k, v = random_kv((2, 2, 32 * 64, 16), seed=5)
    store.append(k, v)
    for side, view in enumerate((store.k, store.v)):
        capacity = store._bufs[side].words.numel()
        assert view.words.numel() < capacity <= view.words.numel() + 2 * store._block_word_bound(side)
    assert store._bufs[0].scale.shape[2] == 64 + 2
    before = store.allocated_nbytes
    store.append(k[:, :, :32], v[:, :, :32])  # within the room: nothing reallocated
    assert store.allocated_nbytes == before


def test_select_batch_and_truncate():
    config = PackKVConfig(block_size=32, pack_size=32, repack="median")
    k, v = random_kv((3, 2, 96, 16), seed=3)
    store = PackedStore(config)
    store.append(k[:, :, :64], v[:, :, :64])
    words_after_two = store.k.words.numel()
    store.append(k[:, :, 64:], v[:, :, 64:])
    ref = decode_tensor(store.v)
    idx = torch.tensor([2, 0, 0])
    store.select_batch(idx)
    assert torch.equal(decode_tensor(store.v), ref[idx])
    store.truncate(2)
    assert store.n_tokens == 64 and store.k.words.numel() <= words_after_two
    assert torch.equal(decode_tensor(store.v), ref[idx][:, :, :64])
    # Appending after a truncation reuses the pool and decodes right.
    perm = store.append(k[idx][:, :, 64:], v[idx][:, :, 64:])
    assert torch.equal(decode_tensor(store.v), ref[idx])
    assert perm.shape == (3, 2, 32)


@pytest.mark.parametrize("path", ["reference", pytest.param("fused", marks=kernels)])
def test_truncating_inside_an_append_keeps_the_other_heads_words(path, request):
    # One append of 3 blocks puts head 0's packs before head 1's in the pool: dropping the
    # last block must not hand head 1's kept words back to the pool.
    device = "cpu"
    if path == "fused":
        request.getfixturevalue("fused")
        device = DEVICE
    config = PackKVConfig(block_size=32, pack_size=32, repack="median")
    k, v = random_kv((1, 2, 128, 64), seed=4)
    store = PackedStore(config)
    store.append(k[:, :, :96].to(device), v[:, :, :96].to(device))
    store.truncate(2)
    perm = store.append(k[:, :, 64:].to(device), v[:, :, 64:].to(device))
    first = compress_kv(k[:, :, :64], v[:, :, :64], config, return_permutation=True)[1]
    whole, ref_perm = compress_kv(k, v, config, return_permutation=True)
    assert torch.equal(torch.cat([first, perm.cpu() + 64], 2), ref_perm)
    for got, ref in ((store.k.to("cpu"), whole.k), (store.v.to("cpu"), whole.v)):
        assert torch.equal(unpack_ints(got), unpack_ints(ref))
        for name in ("widths", "mins", "scale", "zero"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), name
        # Head 0's dropped block lies before head 1's kept words: it stays in the pool.
        assert got.words.numel() > ref.words.numel()


def test_to_moves_in_place():
    store = PackedStore(PackKVConfig(block_size=32, pack_size=32, repack="none"))
    k, v = random_kv((1, 1, 32, 16))
    store.append(k, v)
    nbytes = store.nbytes
    assert store.to("cpu") is store and store.device == torch.device("cpu")
    assert store.nbytes == nbytes


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
    # On the CPU (the reference codec) a rejected value raises at once, storing nothing.
    bad = v[:, :, :32].clone()
    bad[0, 1, 3, 2] = float("inf")
    with pytest.raises(ValueError, match="v has a non-finite value"):
        store.append(k[:, :, :32], bad)
    assert store.n_blocks == 1


def test_pack_word_bound_holds_for_the_widest_packs():
    # Each channel spans the fp16 range at the finest step: 14 bits, the widest the codec
    # makes; the bound (15 bits, what a width code holds) is what the store reserves.
    config = PackKVConfig(block_size=32, pack_size=32, repack="none", k_grouping="channel", k_rel=1e-4, min_bits=0)
    k = torch.tensor([-60000.0, 60000.0]).repeat(16).view(1, 1, 32, 1).expand(1, 1, 32, 64).contiguous().half()
    packed = compress_kv(k, k, config)
    assert packed.k.words.numel() == 64 * 14 <= pack_word_bound(64, 32) == 64 * 15
