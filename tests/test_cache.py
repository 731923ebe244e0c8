"""PackKVCache and the "packkv" attention on a tiny random Llama (GQA: 4 query heads, 2 KV heads)."""

import collections
import copy
import gc
import os
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig

import packkv.cache  # noqa: F401  (registers "packkv")
from packkv import PackedKV, PackKVConfig
from packkv.cache import PackKVCache, PackKVLayer, packkv_attention
from packkv.kernels import decode_attention
from packkv.kernels.decode_attention import DecodePlan
from packkv.store import PackedStore

VOCAB = 500
# Near-lossless: steps of 1/1000 of each group's range.
FINE = PackKVConfig(block_size=32, buffer_size=32, k_rel=1e-3, v_rel=1e-3, repack="median")


# tests/conftest.py runs Triton kernels under the interpreter; it is slow, so decode steps
# here use the PyTorch reference (as on a CPU), except in the one test that checks the kernel.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def model():
    # The model is tiny: one thread is faster, and far faster when other jobs share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
    )
    m = LlamaForCausalLM(config).eval()
    m.set_attn_implementation("packkv")
    yield m
    torch.set_num_threads(threads)


def tokens(batch, n, seed):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def left_padded(batch_ids, pads):
    mask = torch.ones_like(batch_ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return mask


@torch.no_grad()
def step(model, cache, ids, mask=None):
    return model(ids, attention_mask=mask, past_key_values=cache).logits.float()


@torch.no_grad()
def test_prefill_and_decode_match_dynamic_cache(model):
    ids = tokens(2, 150, seed=1)
    mask = left_padded(ids, [0, 37])
    cache, ref = PackKVCache(model.config, FINE), DynamicCache(config=model.config)
    # Prefill attends the K/V of the forward with SDPA, like the reference (padding queries aside).
    got, want = step(model, cache, ids, mask), step(model, ref, ids, mask)
    assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1, 37:], want[1, 37:], atol=1e-5)
    assert cache.get_seq_length() == 150
    # 150 tokens, buffer 32, block 32: 3 blocks packed, 54 tokens in the buffer (at least 32).
    assert cache.layers[0].store.n_tokens == 96 and cache.layers[0].k_buffer.shape[2] == 54
    for i in range(40):
        nxt = tokens(2, 1, seed=100 + i)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        got, want = step(model, cache, nxt, mask), step(model, ref, nxt, mask)
        assert (got - want).abs().max() < 5e-3
    assert cache.get_seq_length() == 190
    assert cache.layers[1].store.n_tokens == 128


@torch.no_grad()
def test_decode_through_the_triton_kernel_on_the_store_views(model, monkeypatch):
    """The Triton kernel (interpreted) reads the store's strided views and the buffer."""
    if not INTERPRETED:
        pytest.skip("needs the Triton interpreter (tests/conftest.py sets it)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ids = tokens(2, 110, seed=14)
    mask = left_padded(ids, [0, 40])
    cache, ref = PackKVCache(model.config, FINE), DynamicCache(config=model.config)
    step(model, cache, ids, mask), step(model, ref, ids, mask)
    nxt = tokens(2, 1, seed=15)
    mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
    want = step(model, ref, nxt, mask)

    def no_decompression(*args):
        raise AssertionError("a decode step decompressed the packed cache")

    # Neither the cache nor the kernel module may decode the packed blocks in a decode step.
    monkeypatch.setattr(packkv.cache, "decode_tensor", no_decompression)
    monkeypatch.setattr(sys.modules["packkv.kernels.reference"], "decode_tensor", no_decompression)
    assert (step(model, cache, nxt, mask) - want).abs().max() < 5e-3


@torch.no_grad()
def test_fp16_decode_steps_reuse_one_plan_until_a_block_is_packed(monkeypatch):
    """An fp16 decode step runs the kernels through the layer's DecodePlan, made when the
    packed blocks change, not at every step; the step's token is left pending by update and
    written into the buffer by the decode kernel; each step's output is decode_attention's
    on the same tokens, bit for bit (padding mask included). With PACKKV_TEST_DEVICE=cuda
    the kernels run compiled, and the plan's later steps take its cached launchers (the
    interpreter always goes through Triton's dispatcher)."""
    device = torch.device(os.environ.get("PACKKV_TEST_DEVICE", "cpu"))
    if device.type == "cpu":
        if not INTERPRETED:
            pytest.skip("needs the Triton interpreter (tests/conftest.py sets it)")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    made = []
    monkeypatch.setattr(packkv.cache, "DecodePlan", lambda *args, **kw: made.append(DecodePlan(*args, **kw)) or made[-1])
    g = torch.Generator().manual_seed(21)
    kv = lambda n: [torch.randn(2, 2, n, 64, generator=g).half().to(device) for _ in "kv"]
    layer = PackKVLayer(FINE)
    layer.update(*kv(94))
    valid = torch.ones(2, 94, dtype=torch.bool, device=device)
    valid[1, :40] = False
    layer.settle(valid)  # one block packed, 62 tokens in the buffer
    module = torch.nn.Module().eval()
    for i, (n_buffer, plans) in enumerate([(63, 1), (64, 1), (33, 2)]):  # the second step packs a block
        query = torch.randn(2, 1, 4, 64, generator=g).half().to(device).transpose(1, 2)  # transformers' layout
        k_new, v_new = kv(1)
        views = PackedKV(k=layer.store.k, v=layer.store.v, k_tail=torch.cat([layer.k_buffer, k_new], 2),
                         v_tail=torch.cat([layer.v_buffer, v_new], 2), config=FINE, dtype=torch.float16)
        mask = None if layer.valid_mask() is None else F.pad(layer.valid_mask(), (0, 1), value=True)
        want = decode_attention(query[:, :, 0], views, sm_scale=0.125, mask=mask)
        key, value = layer.update(k_new, v_new)
        assert layer.n_buffer == n_buffer and layer._pending is not None, i
        out, _ = packkv_attention(module, query, key, value, None, scaling=0.125)
        assert torch.equal(out, want.unsqueeze(1)) and len(made) == plans, i
        assert layer._pending is None, i
        assert torch.equal(layer.k_buffer[:, :, -1:], k_new) and torch.equal(layer.v_buffer[:, :, -1:], v_new), i


@torch.no_grad()
def test_a_pending_token_reaches_the_buffer_before_anything_reads_it(monkeypatch):
    """update leaves a decode token pending where the kernels will attend; every reader of
    the buffer (its views, crop, batch selection, compression) sees it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the kernels' path, without running them
    g = torch.Generator().manual_seed(5)
    kv = lambda n: [torch.randn(2, 2, n, 64, generator=g).half() for _ in "kv"]
    layer = PackKVLayer(FINE)
    first = kv(64)
    layer.update(*first)
    layer.settle(None)  # one block packed, 32 tokens in the buffer
    for name in ("k_buffer", "v_buffer", "batch_select"):
        k_new, v_new = kv(1)
        layer.update(k_new, v_new)
        assert layer._pending is not None, name
        if name == "batch_select":
            layer.batch_select_indices(torch.tensor([1, 0]))
            k_new, v_new = k_new.flip(0), v_new.flip(0)
        got = layer.v_buffer if name == "v_buffer" else layer.k_buffer
        assert layer._pending is None, name
        assert torch.equal(got[:, :, -1:], v_new if name == "v_buffer" else k_new), name
        layer.unseen = 0
    # A crop drops the pending token, or keeps it in its place.
    before = layer.k_buffer.clone()
    layer.update(*kv(1))
    layer.crop(-1)
    assert layer._pending is None and torch.equal(layer.k_buffer, before)
    k_new, v_new = kv(1)
    layer.update(k_new, v_new)
    layer.crop(layer.get_seq_length())
    assert layer._pending is None and torch.equal(layer.k_buffer, torch.cat([before, k_new], 2))
    layer.unseen = 0
    # Compression flushes too: fill the buffer to a whole block more than buffer_size.
    while layer.n_buffer < FINE.buffer_size + FINE.block_size - 1:
        layer.update(*kv(1))
        layer._flush()
        layer.unseen = 0
    k_new, v_new = kv(1)
    layer.update(k_new, v_new)
    layer.settle(None)  # packs a block; the pending token stays in the buffer's last place
    assert layer._pending is None and torch.equal(layer.k_buffer[:, :, -1:], k_new)


@torch.no_grad()
def test_left_padding_is_masked_in_packed_order(model):
    """A left-padded row gives the same logits as the same tokens alone, unpadded."""
    ids = tokens(2, 120, seed=2)
    pad = 45  # pads span a whole packed block and part of the next
    mask = left_padded(ids, [0, pad])
    batched = PackKVCache(model.config, FINE)
    alone = PackKVCache(model.config, FINE)
    got = step(model, batched, ids, mask)[1, pad:]
    want = step(model, alone, ids[1:, pad:])[0]
    assert (got - want).abs().max() < 1e-4
    valid = batched.layers[0].packed_valid
    assert valid.shape == (2, 2, 64) and valid[0].all()
    assert (valid[1].sum(-1) == 64 - pad).all()
    for i in range(3):
        nxt = tokens(2, 1, seed=200 + i)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        got = step(model, batched, nxt, mask)[1]
        want = step(model, alone, nxt[1:])[0]
        assert (got - want).abs().max() < 2e-3


class CacheOps(TorchDispatchMode):
    """Counts the torch ops that are not views inside the cache's parts of a step (the
    layer's ``update`` and ``settle``, the attention's ``_decode`` / ``_prefill``), except
    inside ``decode_attention`` and ``PackedStore.append`` (the kernels' and the codec's
    own); ``syncs`` are the ops whose output the host must wait for (``.item()``,
    ``bool(t)``, ``nonzero``...)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.ops = collections.Counter()
        self.syncs = collections.Counter()
        self.depth = 0
        for owner, name, inside in (
            (packkv.cache.PackKVLayer, "update", 1), (packkv.cache.PackKVLayer, "settle", 1),
            (packkv.cache, "_decode", 1), (packkv.cache, "_prefill", 1),
            (packkv.cache, "decode_attention", -1), (PackedStore, "append", -1),
        ):
            monkeypatch.setattr(owner, name, self.counted(getattr(owner, name), inside))

    def counted(self, fn, inside):
        def run(*args, **kwargs):
            self.depth += inside
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= inside
        return run

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.depth > 0 and not func.is_view:
            tags = set(func.tags)
            sync = torch.Tag.data_dependent_output in tags or torch.Tag.dynamic_output_shape in tags
            (self.syncs if sync else self.ops)[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def valid_capacity(layer):
    return None if layer._valid is None else layer._valid.shape[2]


@torch.no_grad()
@pytest.mark.parametrize("pads", [[0, 0], [0, 37]])
def test_decode_step_appends_in_place_without_host_syncs(model, monkeypatch, pads):
    """Per layer, a decode step of the cache (outside the kernels and the codec) is two
    one-token copies into the preallocated buffer and no host sync, padded batch or not;
    a step that packs a block moves the rest of the buffer, still without a sync. In fp16,
    as on a GPU (an fp32 model's query and buffer are rounded to fp16 for the kernels)."""
    model = copy.deepcopy(model).half()
    ids = tokens(2, 150, seed=16)
    mask = left_padded(ids, pads)
    cache = PackKVCache(model.config, FINE)
    step(model, cache, ids, mask)
    layer = cache.layers[0]
    assert (layer.valid_mask() is None) == (pads == [0, 0])
    counter = CacheOps(monkeypatch)
    seen_compression, mask_growths = False, 0
    for i in range(20):  # the buffer goes 54 -> 63 tokens, a block is packed, 32 -> 42
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        storage, blocks, mask_capacity = layer.k_buffer.data_ptr(), layer.store.n_blocks, valid_capacity(layer)
        counter.ops.clear()
        with counter:
            step(model, cache, tokens(2, 1, seed=300 + i), mask)
        per_layer = {name: n // len(cache.layers) for name, n in counter.ops.items()}
        if valid_capacity(layer) != mask_capacity:
            # The padding mask grows geometrically (here at the first step: it was made to
            # hold the prompt): a new one, and the old copied into it.
            assert per_layer == {"copy_.default": 3, "ones.default": 1}, i
            mask_growths += 1
        elif layer.store.n_blocks == blocks:
            assert per_layer == {"copy_.default": 2}, i
            assert layer.k_buffer.data_ptr() == storage
        else:
            seen_compression = True
            # The new token's K and V, the rest of the buffer moved to new storage, and the
            # packed block's padding flags permuted.
            moved = {"copy_.default": 4, "new_empty.default": 2}
            assert per_layer == (moved if pads == [0, 0] else {**moved, "copy_.default": 5, "gather.default": 1}), i
        if pads != [0, 0]:
            assert layer.valid_mask().data_ptr() == layer._valid.data_ptr()  # a view, no copy
    assert seen_compression and not counter.syncs and mask_growths == (pads != [0, 0])


@torch.no_grad()
@pytest.mark.parametrize("keep, atol", [(140, 1e-4), (32, 5e-3)])
def test_crop_keeps_padding_masked(model, keep, atol):
    """A cropped padded batch decodes like a fresh one holding the kept tokens: the dropped
    tokens' flags are forgotten (cropping to 32 drops padding, whose places new real tokens
    take). Not bit-equal: the prompts' K and V come from matmuls of different sizes, and a
    fresh prompt of 32 tokens is not packed yet."""
    ids = tokens(2, 150, seed=17)
    mask = left_padded(ids, [0, 37])
    cache = PackKVCache(model.config, FINE)
    step(model, cache, ids, mask)
    cache.crop(keep)
    ref = PackKVCache(model.config, FINE)
    mask = mask[:, :keep]
    step(model, ref, ids[:, :keep], mask)
    for i in range(40):  # through block compressions
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        nxt = tokens(2, 1, seed=400 + i)
        assert torch.allclose(step(model, cache, nxt, mask), step(model, ref, nxt, mask), atol=atol), i


@torch.no_grad()
def test_chunked_prefill_attends_packed_history(model):
    ids = tokens(1, 160, seed=3)
    cache, ref = PackKVCache(model.config, FINE), DynamicCache(config=model.config)
    for chunk in ids.split(50, dim=1):
        got, want = step(model, cache, chunk), step(model, ref, chunk)
        assert (got - want).abs().max() < 5e-3


def test_generate_greedy_matches_dynamic_cache(model):
    ids = tokens(2, 100, seed=4)
    mask = left_padded(ids, [0, 20])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                         past_key_values=DynamicCache(config=model.config))
    got = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                         past_key_values=PackKVCache(model.config, FINE))
    assert torch.equal(got, ref)


@torch.no_grad()
def test_beam_search_scores_are_the_sequences_log_probabilities(model):
    """Beam search reorders the cache every step; each returned beam's score must be its
    log-probability, recomputed here without any cache."""
    ids = tokens(2, 100, seed=4)
    mask = left_padded(ids, [0, 20])
    new = 16
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=3,
        length_penalty=0.0, return_dict_in_generate=True, output_scores=True,
        past_key_values=PackKVCache(model.config, FINE),
    )
    full_mask = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], dim=1)
    logits = model(out.sequences, attention_mask=full_mask).logits.float()
    logp = logits[:, 99:-1].log_softmax(-1).gather(2, out.sequences[:, 100:, None]).sum((1, 2))
    assert torch.allclose(out.sequences_scores, logp, atol=2e-2)


@torch.no_grad()
def test_reorder_select_and_repeat_batch(model):
    ids = tokens(3, 100, seed=5)
    nxt = tokens(3, 1, seed=6)
    cache = PackKVCache(model.config, FINE)
    step(model, cache, ids)
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    fresh = PackKVCache(model.config, FINE)
    step(model, fresh, ids[[2, 0, 0]])
    assert torch.allclose(step(model, cache, nxt), step(model, fresh, nxt), atol=1e-5)

    # Rows [2, 0] of the prompts, by index and by boolean mask.
    cache.batch_select_indices(torch.tensor([0, 2]))
    fresh.batch_select_indices(torch.tensor([True, False, True]))
    nxt2 = tokens(2, 1, seed=7)
    assert torch.allclose(step(model, cache, nxt2), step(model, fresh, nxt2), atol=1e-5)

    cache.batch_repeat_interleave(2)
    assert cache.layers[0].k_buffer.shape[0] == 4 and cache.layers[0].store.batch == 4
    logits = step(model, cache, tokens(1, 1, seed=8).expand(4, 1))
    assert torch.allclose(logits[0], logits[1], atol=1e-5) and torch.allclose(logits[2], logits[3], atol=1e-5)


@torch.no_grad()
def test_crop_within_buffer_or_at_block_boundary(model):
    ids = tokens(1, 150, seed=9)
    cache = PackKVCache(model.config, FINE)
    step(model, cache, ids)  # 96 packed + 54 buffered
    cache.crop(-10)
    assert cache.get_seq_length() == 140
    ref = PackKVCache(model.config, FINE)
    step(model, ref, ids[:, :140])
    nxt = tokens(1, 1, seed=10)
    assert torch.allclose(step(model, cache, nxt), step(model, ref, nxt), atol=1e-5)
    cache.crop(64)  # a block boundary: whole blocks go
    assert cache.get_seq_length() == 64 and cache.layers[0].store.n_tokens == 64
    with pytest.raises(NotImplementedError, match="crop to a multiple of 32"):
        cache.crop(40)
    with pytest.raises(ValueError, match="cannot crop"):
        cache.crop(-1000)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0
    assert PackKVCache(model.config, FINE).get_seq_length() == 0


@torch.no_grad()
def test_stats_count_bytes(model):
    cache = PackKVCache(model.config, PackKVConfig(block_size=32, buffer_size=32))
    step(model, cache, tokens(1, 300, seed=11))
    stats = cache.stats()
    layer = stats["layers"][0]
    assert layer["tokens"] == 300
    assert layer["fp16_bytes"] == 2 * 2 * 1 * 2 * 300 * 64
    store, k_buffer = cache.layers[0].store, cache.layers[0].k_buffer
    assert layer["stored_bytes"] == store.nbytes + 2 * k_buffer.numel() * k_buffer.element_size()
    assert layer["allocated_bytes"] >= layer["stored_bytes"]
    assert stats["total"]["fp16_bytes"] == 2 * layer["fp16_bytes"]
    assert stats["total"]["stored_bytes"] == cache.nbytes()
    assert stats["total"]["ratio"] > 1.5


@torch.no_grad()
def test_dropped_cache_frees_its_memory_at_once(model):
    """No reference cycle (the tagged buffer view names its layer weakly): dropping the cache
    frees its tensors without waiting for the garbage collector."""
    cache = PackKVCache(model.config, FINE)
    step(model, cache, tokens(1, 100, seed=18))
    step(model, cache, tokens(1, 1, seed=19))
    storage = weakref.ref(cache.layers[0]._k_buf)
    gc.disable()
    try:
        del cache
        assert storage() is None
    finally:
        gc.enable()


def test_clear_errors(model):
    ids = tokens(1, 8, seed=12)
    model.set_attn_implementation("sdpa")
    try:
        with pytest.raises(ValueError, match="attn_implementation='packkv'"):
            model(ids, past_key_values=PackKVCache(model.config, FINE))
    finally:
        model.set_attn_implementation("packkv")
    with pytest.raises(NotImplementedError, match="attention weights"):
        model(ids, past_key_values=PackKVCache(model.config, FINE), output_attentions=True)
    cache = PackKVCache(model.config, FINE)
    model(ids, past_key_values=cache)
    with pytest.raises(NotImplementedError, match="offloading"):
        cache.layers[0].offload()
    # A second update before the attention function ran on the first one.
    layer = PackKVCache(model.config, FINE).layers[0]
    k = torch.randn(1, 2, 3, 64)
    layer.update(k, k)
    with pytest.raises(RuntimeError, match="never attended"):
        layer.update(k, k)
    sliding = MistralConfig(num_hidden_layers=2, sliding_window=16)
    with pytest.raises(NotImplementedError, match="sliding_attention"):
        PackKVCache(sliding)
    with pytest.raises(NotImplementedError, match="head_dim"):
        PackKVCache(LlamaConfig(num_hidden_layers=1, hidden_size=256, num_attention_heads=8))
    with pytest.raises(NotImplementedError, match="causal"):
        PackKVCache(LlamaConfig(num_hidden_layers=1, head_dim=64, is_causal=False))
    with pytest.raises(TypeError, match="model's config"):
        PackKVCache(FINE)


def test_other_caches_get_plain_sdpa(model):
    """attn_implementation="packkv" with a DynamicCache is ordinary attention."""
    ids = tokens(1, 40, seed=13)
    with torch.no_grad():
        got = model(ids, past_key_values=DynamicCache(config=model.config)).logits
        model.set_attn_implementation("sdpa")
        want = model(ids, past_key_values=DynamicCache(config=model.config)).logits
        model.set_attn_implementation("packkv")
    assert torch.allclose(got, want, atol=1e-5)
