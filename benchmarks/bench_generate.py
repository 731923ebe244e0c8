"""End-to-end decode with transformers: DynamicCache vs QuantizedCache vs PackKVCache.

Question: on a Llama-3.1-8B-shaped model, how fast does decode run and how much GPU
memory does it take with each cache, at long context and batch > 1; and what is the
longest context / largest batch each cache fits in the GPU?

Model: ``LlamaConfig`` of Llama-3.1-8B (32 layers, hidden 4096, 32 query heads, 8 KV
heads, head_dim 128, vocab 128256) with random fp16 weights; decode speed does not depend
on weight values. Prompts are random token ids. Prefill runs in chunks of at most
``--prefill-tokens`` batch-tokens for every cache alike; only the last position's logits
are computed. ``--layers N`` keeps only N layers (default 8, so that the table takes a
few minutes; the header says so).

Per (cache, context, batch), after the prefill: ``--warmup-steps`` greedy decode steps
(by default a PackKV block's worth, so that every layer packs a block at its decode shape,
and Triton compiles that variant, before the timing), then ``--decode-tokens`` timed steps
(by default two blocks' worth: each layer packs exactly two blocks in them, the amortized
rate). *tok/s*: batch x steps / CUDA-synchronized wall time; *ms/step* that time / steps;
*med* and *max*: the median and longest step (CUDA events; on a GPU that keeps up with the
host, a step that packs a block is the longest); *host ms*: the median host time to
enqueue a step (the Python call, not waiting for the device); *dev ms*: the device's busy time a step
(kernel and copy durations summed by torch.profiler over 8 more steps): the work a cache
gives the GPU, which a host-bound (batch-1) step's wall time hides. SDPA is restricted to its flash and
memory-efficient kernels (see ``sdpa_backends``). Bytes of the cache: *fp16* (its tokens
as fp16 K and V), *stored* (what it holds: for PackKVCache ``stats()``' stored bytes, for
the others their tensors), *alloc* (GPU memory allocated by the cache after the prefill,
spare capacity included; on the CPU PackKVCache's ``allocated_bytes``); *ratio*: fp16 /
stored. Peak allocated GPU memory (weights included) during the prefill and the decode.
PackKVCache runs with ``attn_implementation="packkv"`` (decode: the fused Triton kernel on
the packed cache) at the default PackKVConfig (median repacking); the others with
``"sdpa"``. QuantizedCache rows appear for each backend that constructs here (quanto and
hqq need their packages, fp8 a transformers release that has it), else a note says why.
``--caches`` may add ablations of PackKVCache's decode-step host path, each undoing one
more change of 2026-11-24 (so: the earlier versions): ``packkv-combine`` (a second kernel
merges the splits), ``packkv-copy`` (also: update copies the token into the buffer, two
copy kernels a layer) and ``packkv-runner`` (also: launches through Triton's
``kernel[grid]`` runner).
``--rounds N`` runs each (context, batch) N times with the caches interleaved (A B, B A, ...)
and prints the median tok/s over the rounds: a batch-1 step is bound by the host, whose
speed drifts by tens of percent within one run on the GPU machine.
``--paired N`` replaces the table by a measurement made for a host-bound step: every cache
is prefilled with the same prompt and held at once, then N rounds of ``--segment`` decode
steps of each run alternately (A B, B A, ...), each segment timed between two
synchronizations. It prints each cache's median ms a step, its throughput against
DynamicCache over all rounds (total time over the same steps), and the per-round ratios.
Before the table, one small run of each cache compiles the kernels (prefill appends of
16 and of 17 blocks, decode appends of one), so that *prefill s* is not compile time.

``--fit``: with ``--fit-layers`` layers (default 32, the whole model), the longest context
at the largest ``--batches`` and the largest batch at the longest ``--contexts`` each cache
holds in the GPU memory together with a decode step. A probe fills a fresh cache directly
with K and V that the model computed for a real 4096-token prompt, tiled to the size (no
prefill attention: a prefill can be chunked as finely as memory needs, and a 32-layer
prefill of 100K+ tokens would take minutes), then runs two decode steps; it fits if
nothing runs out of memory. So it bounds what decode holds, not a prefill: PackKVCache's
prefill attends a chunk over its history decoded to fp16 (with K and V repeated for the
GQA group), one layer at a time, which takes more at the longest contexts. The search starts at a prediction (free memory / the bytes a
token took in a calibration fill) and narrows it to ``--fit-context-step`` tokens or one
batch row, at most ``--fit-probes`` probes per answer; it reports the largest size that
fitted, with the smallest that did not, or the cap (the model's 131072 positions, or
1024 rows). On the CPU (``--tiny``) a pretend memory of 4 MiB for the cache stands in.

    PYTHONPATH=src python3 benchmarks/bench_generate.py --json out.json
    PYTHONPATH=src python3 benchmarks/bench_generate.py --quick
    PYTHONPATH=src python3 benchmarks/bench_generate.py --paired 48 --segment 16 --batches 1 --caches dynamic,packkv
    PYTHONPATH=src python3 benchmarks/bench_generate.py --fit --contexts 32768 --batches 8
    PYTHONPATH=src python3 benchmarks/bench_generate.py --tiny --fit   # CPU check, tiny model
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import packkv.cache  # noqa: F401  (registers attn_implementation="packkv")
from packkv import PackKVConfig
from packkv.cache import PackKVCache

from _cli import ints  # benchmarks/_cli.py

GiB = 2**30
MiB = 2**20
# The default: median repacking, PackKV's throughput setting (greedy packs 1-2% tighter and
# encodes far slower).
BENCH_PACKKV = PackKVConfig()
QUANTIZED_BACKENDS = (("quanto", {"nbits": 4}), ("hqq", {"nbits": 4}), ("fp8", {}))
# The compile warm-up: a prompt whose first chunk leaves 17 blocks to pack and whose second
# 16 (Triton specializes integer arguments on divisibility by 16), then a block of decode.
WARM_CHUNK = BENCH_PACKKV.buffer_size + 17 * BENCH_PACKKV.block_size
WARM_CONTEXT = WARM_CHUNK + 16 * BENCH_PACKKV.block_size
# Decode steps profiled for a row's device time (after the timed ones).
DEVICE_STEPS = 8
# The largest batch --fit tries.
BATCH_LIMIT = 1024
# Tokens of the real prompt whose K and V fill the caches of a --fit probe.
FIT_SOURCE_TOKENS = 4096
# Fraction of the free memory a --fit prediction plans the cache in (the rest: the decode
# step's activations and the allocator's rounding).
FIT_MARGIN = 0.92


def llama_8b_config(layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )


def tiny_config(layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
    )


def build_model(config: LlamaConfig, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """Random weights, created on ``device`` in ``dtype`` (no fp32 copy on the host)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def set_attention(model: LlamaForCausalLM, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


@dataclass
class Row:
    cache: str
    context: int
    batch: int
    status: str  # "ok", "OOM" or an error message
    decode_tok_s: float = 0.0
    ms_per_step: float = 0.0  # mean over the timed steps
    ms_step_median: float = 0.0
    ms_step_max: float = 0.0
    host_ms_step: float = 0.0  # median host time to enqueue a step
    device_ms_step: float = 0.0  # the device's busy time a step (profiled), 0 on the CPU
    fp16_gib: float = 0.0  # the cache's tokens as fp16 K and V
    stored_gib: float = 0.0  # what the cache holds
    alloc_gib: float = 0.0  # GPU memory the cache allocated (on the CPU: its allocated_bytes)
    prefill_peak_gib: float = 0.0  # peak allocated GPU memory during the prefill (weights included)
    decode_peak_gib: float = 0.0  # the same during the decode steps
    prefill_s: float = 0.0
    ratio: float = 0.0  # fp16 / stored
    round: int = 0  # which of --rounds


def cache_makers(model: LlamaForCausalLM, wanted: list[str]) -> tuple[dict[str, tuple[str, Callable]], list[str]]:
    """``{label: (attn_implementation, () -> cache)}`` for the caches that construct here, and notes."""
    makers: dict[str, tuple[str, Callable]] = {}
    notes = []
    if "dynamic" in wanted:
        makers["dynamic"] = ("sdpa", lambda: DynamicCache(config=model.config))
    if "quantized" in wanted:
        from transformers import QuantizedCache

        for backend, kwargs in QUANTIZED_BACKENDS:
            try:
                QuantizedCache(backend=backend, config=model.config, **kwargs)
            except Exception as e:  # missing package, unknown backend in this transformers
                notes.append(f"QuantizedCache backend {backend!r} unavailable: {type(e).__name__}: {str(e)[:120]}")
                continue
            label = f"quantized-{backend}" + (f"{kwargs['nbits']}" if "nbits" in kwargs else "")
            makers[label] = ("sdpa", lambda b=backend, k=kwargs: QuantizedCache(backend=b, config=model.config, **k))
    # PackKVCache, and ablations of its decode step's host path, each undoing one more change
    # (the earlier versions): "packkv-combine" merges the splits in a second kernel;
    # "packkv-copy" also copies each token into the buffer in update (two copy kernels);
    # "packkv-runner" also launches through Triton's kernel[grid] runner.
    for label, switches in PACKKV_ABLATIONS.items():
        if label in wanted:
            makers[label] = ("packkv", lambda s=switches: packkv_cache(model, *s))
    return makers, notes


# label: (the decode kernel merges the splits, it appends the token, direct launches)
PACKKV_ABLATIONS = {
    "packkv": (True, True, True), "packkv-combine": (False, True, True),
    "packkv-copy": (False, False, True), "packkv-runner": (False, False, False),
}


def set_host_path(folded: bool, fused_append: bool, direct_launch: bool) -> None:
    """The module switches of PackKVCache's decode-step host path (read at each step)."""
    kernels = sys.modules["packkv.kernels.decode_attention"]
    kernels.FOLDED_COMBINE, packkv.cache.FUSED_APPEND, kernels.DIRECT_LAUNCH = folded, fused_append, direct_launch


def packkv_cache(model: LlamaForCausalLM, folded: bool, fused_append: bool, direct_launch: bool) -> PackKVCache:
    """A PackKVCache; the switches of its host path hold for the runs until the next one is made."""
    set_host_path(folded, fused_append, direct_launch)
    return PackKVCache(model.config, BENCH_PACKKV)


def sdpa_backends(device: torch.device):
    """Flash and memory-efficient SDPA (math as a fallback), not cuDNN, on CUDA.

    torch 2.11 picks cuDNN attention for one-token SDPA calls and rebuilds its plan on the
    CPU at every step (7 ms a call seen on the H100), which would make every cache's decode
    CPU-bound; flash / memory-efficient SDPA is what serving stacks use.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type != "cuda":
        return nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cache_bytes(cache, batch: int, config: LlamaConfig) -> dict[str, int]:
    """``fp16``, ``stored`` and ``allocated`` bytes of a cache of ``batch`` rows, from the cache itself."""
    if isinstance(cache, PackKVCache):
        total = cache.stats()["total"]
        return {"fp16": total["fp16_bytes"], "stored": total["stored_bytes"], "allocated": total["allocated_bytes"]}
    # Other caches: the tensors their layers hold (quantized ones keep (data, scale) tuples).
    held = [x for layer in cache.layers for v in vars(layer).values() for x in (v if isinstance(v, tuple) else (v,))]
    stored = sum(t.numel() * t.element_size() for t in held if isinstance(t, torch.Tensor))
    fp16 = 2 * 2 * batch * config.num_key_value_heads * cache.get_seq_length() * config.head_dim * len(cache.layers)
    return {"fp16": fp16, "stored": stored, "allocated": stored}


@torch.no_grad()
def decode(model, cache, nxt: torch.Tensor, steps: int,
           device: torch.device) -> tuple[torch.Tensor, list[float], list[float]]:
    """``steps`` greedy decode steps from tokens ``nxt [batch, 1]``; the last tokens, each
    step's milliseconds (CUDA events: the steps are not synchronized one by one) and each
    step's host milliseconds (the Python call that enqueues it; the same on the CPU)."""
    times, host = [], []
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)] if device.type == "cuda" else []
    if events:
        events[0].record()
    for i in range(steps):
        start = time.perf_counter()
        nxt = model(nxt, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
        host.append(1e3 * (time.perf_counter() - start))
        if events:
            events[i + 1].record()
    if events:
        sync(device)
        times = [a.elapsed_time(b) for a, b in zip(events, events[1:])]
    else:
        times = host
    return nxt, times, host


def device_time(model, cache, nxt: torch.Tensor, steps: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """``steps`` more decode steps under torch.profiler; the last tokens and the device's busy
    milliseconds a step (the kernels' and copies' durations summed). A batch-1 step is bound
    by the host, so its wall time says little about the work a cache gives the device."""
    if device.type != "cuda":
        return nxt, 0.0
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        nxt, _, _ = decode(model, cache, nxt, steps, device)
        sync(device)
    busy_us = sum(e.device_time_total for e in prof.events() if e.device_type == DeviceType.CUDA)
    return nxt, busy_us / 1e3 / steps


def prefill(model, cache, prompt: torch.Tensor, chunk: int) -> torch.Tensor:
    """Feed ``prompt [batch, tokens]`` through ``model`` into ``cache``, ``chunk`` tokens at a
    time; the logits of the last position ``[batch, 1, vocab]``."""
    for lo in range(0, prompt.shape[1], chunk):
        logits = model(prompt[:, lo : lo + chunk], past_key_values=cache, logits_to_keep=1).logits
    return logits


@torch.no_grad()
def run_one(model, make_cache, context: int, batch: int, args, device) -> Row:
    """Prefill ``batch`` random prompts of ``context`` tokens, then warm up and time greedy decode steps."""
    gen = torch.Generator(device="cpu").manual_seed(context + batch)
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).to(device)
    reset_peak(device)
    before = allocated(device)
    cache = make_cache()
    sync(device)
    start = time.perf_counter()
    logits = prefill(model, cache, prompt, max(1, args.prefill_tokens // batch))
    sync(device)
    prefill_s = time.perf_counter() - start
    alloc = allocated(device) - before - logits.numel() * logits.element_size()
    del prompt
    nxt = logits[:, -1:].argmax(-1)
    del logits
    prefill_peak = peak(device)
    reset_peak(device)
    nxt, _, _ = decode(model, cache, nxt, args.warmup_steps, device)
    sync(device)
    start = time.perf_counter()
    nxt, times, host = decode(model, cache, nxt, args.decode_tokens, device)
    elapsed = time.perf_counter() - start
    decode_peak = peak(device)
    nxt, device_ms = device_time(model, cache, nxt, DEVICE_STEPS, device)
    sizes = cache_bytes(cache, batch, model.config)
    if device.type != "cuda":
        alloc = sizes["allocated"]
    return Row(
        cache="", context=context, batch=batch, status="ok",
        decode_tok_s=batch * args.decode_tokens / elapsed, ms_per_step=1e3 * elapsed / args.decode_tokens,
        ms_step_median=statistics.median(times), ms_step_max=max(times), host_ms_step=statistics.median(host), device_ms_step=device_ms,
        fp16_gib=sizes["fp16"] / GiB, stored_gib=sizes["stored"] / GiB, alloc_gib=alloc / GiB,
        prefill_peak_gib=prefill_peak / GiB, decode_peak_gib=decode_peak / GiB, prefill_s=prefill_s,
        ratio=sizes["fp16"] / sizes["stored"] if sizes["stored"] else 0.0,
    )


def activate(model, label: str, attn: str) -> None:
    """Select a cache's attention implementation and, for PackKVCache and its ablations, the
    switches of its host path (read at each step, so caches of several labels can alternate)."""
    set_attention(model, attn)
    if label in PACKKV_ABLATIONS:
        set_host_path(*PACKKV_ABLATIONS[label])


@dataclass
class Segment:
    cache: str
    context: int
    batch: int
    pair: int  # which round of segments
    ms_per_step: float  # CUDA-synchronized wall time of the segment / its steps
    host_ms_step: float  # median host time to enqueue a step


@torch.no_grad()
def run_paired(model, makers, context: int, batch: int, args, device) -> list[Segment]:
    """Every cache prefilled with the same prompt and held at once, then ``args.paired`` rounds
    of ``args.segment`` decode steps of each, alternating (A B, B A, ...): a segment's
    neighbours ran a second or less before or after it, so a drift of the host's speed
    reaches each cache alike. Each cache grows by ``paired x segment`` tokens in all."""
    gen = torch.Generator(device="cpu").manual_seed(context + batch)
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).to(device)
    state = {}
    for label, (attn, make) in makers.items():
        activate(model, label, attn)
        cache = make()
        logits = prefill(model, cache, prompt, max(1, args.prefill_tokens // batch))
        nxt, _, _ = decode(model, cache, logits[:, -1:].argmax(-1), args.warmup_steps, device)
        state[label] = cache, nxt
        del logits
    del prompt
    free_memory(device)
    segments, order = [], list(makers)
    for pair in range(args.paired):
        for label in order if pair % 2 == 0 else order[::-1]:
            activate(model, label, makers[label][0])
            cache, nxt = state[label]
            sync(device)
            start = time.perf_counter()
            nxt, _, host = decode(model, cache, nxt, args.segment, device)
            sync(device)
            elapsed = time.perf_counter() - start
            state[label] = cache, nxt
            segments.append(Segment(label, context, batch, pair, 1e3 * elapsed / args.segment, statistics.median(host)))
    del state
    free_memory(device)
    return segments


def print_paired(segments: list[Segment]) -> None:
    """Per (context, batch, cache): median ms a step over its segments; against DynamicCache,
    the throughput ratio over all rounds (its total time / this cache's, the same steps: a
    segment that packs a block counts in full) and, per round, its step time / this cache's
    (> 1: faster than DynamicCache)."""
    by_key: dict[tuple, dict[int, Segment]] = {}
    for s in segments:
        by_key.setdefault((s.context, s.batch, s.cache), {})[s.pair] = s
    print(f"{'cache':<18}{'context':>8}{'batch':>6}{'segments':>9}{'median ms/step':>16}{'tok/s':>9}{'host ms':>9}"
          f"{'vs dynamic: throughput':>24}{'per round: median':>19}{'min':>7}{'max':>7}{'faster in':>11}")
    for (context, batch, cache), runs in by_key.items():
        ms = statistics.median(s.ms_per_step for s in runs.values())
        base = by_key.get((context, batch, "dynamic"), {})
        pairs = [(base[p].ms_per_step, s.ms_per_step) for p, s in runs.items() if p in base]
        ratios = [b / m for b, m in pairs]
        paired = (f"{sum(b for b, _ in pairs) / sum(m for _, m in pairs):>24.3f}{statistics.median(ratios):>19.3f}"
                  f"{min(ratios):>7.3f}{max(ratios):>7.3f}{sum(r > 1 for r in ratios):>6} of {len(ratios):<3}"
                  ) if pairs and cache != "dynamic" else f"{'-':>24}"
        print(f"{cache:<18}{context:>8}{batch:>6}{len(runs):>9}{ms:>16.3f}{1e3 * batch / ms:>9.1f}"
              f"{statistics.median(s.host_ms_step for s in runs.values()):>9.2f}{paired}")


def guarded(model, label, attn, make_cache, context, batch, args, device) -> Row:
    """``run_one`` that turns an out-of-memory error into a row, and frees everything after."""
    set_attention(model, attn)
    try:
        row = run_one(model, make_cache, context, batch, args, device)
    except torch.OutOfMemoryError:
        row = Row(cache=label, context=context, batch=batch, status="OOM")
    except Exception as e:  # a cache that fails at this size: report it, keep going
        row = Row(cache=label, context=context, batch=batch, status=f"{type(e).__name__}: {str(e)[:100]}")
    free_memory(device)
    row.cache = label
    return row


def warm_up(model, makers, args, device) -> None:
    """Compile every kernel the table's runs will meet, outside the table (see WARM_CONTEXT)."""
    warm = argparse.Namespace(prefill_tokens=WARM_CHUNK, warmup_steps=0, decode_tokens=BENCH_PACKKV.block_size + 2)
    for label, (attn, make) in makers.items():
        row = guarded(model, label, attn, make, WARM_CONTEXT, 1, warm, device)
        if row.status != "ok":
            print(f"warm-up of {label} failed: {row.status}")


# -- --fit ----------------------------------------------------------------------------------------

@torch.no_grad()
def source_kv(model, tokens: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the K (after RoPE) and V ``[1, kv_heads, tokens, head_dim]`` of a random prompt."""
    set_attention(model, "sdpa")
    prompt = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    model(prompt.to(device), past_key_values=cache, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in cache.layers]


def tiled(src: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Tokens ``[start, start + n)`` of ``src [1, h, S, d]`` repeated along the tokens."""
    s = src.shape[2]
    first = start % s
    return src.repeat(1, 1, -(-(first + n) // s), 1)[:, :, first : first + n]


def fill(cache, sources, batch: int, context: int) -> None:
    """Put ``context`` tokens of tiled ``sources`` K/V in every layer of ``cache``, for ``batch`` rows."""
    for i, (k_src, v_src) in enumerate(sources):
        h, d = k_src.shape[1], k_src.shape[3]
        if not isinstance(cache, PackKVCache):
            k, v = tiled(k_src, 0, context), tiled(v_src, 0, context)
            cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), i)
            continue
        layer, s = cache.layers[i], cache.packkv_config.block_size
        # Chunks of at most 2**26 elements, whole blocks: the fp16 staging stays small.
        chunk = max(s, min(context, 2**26 // (batch * h * d)) // s * s)
        for lo in range(0, context, chunk):
            n = min(chunk, context - lo)
            layer.update(tiled(k_src, lo, n).expand(batch, -1, -1, -1), tiled(v_src, lo, n).expand(batch, -1, -1, -1))
            layer.settle(None)


@dataclass
class Probe:
    batch: int
    context: int
    fits: bool
    cache_gib: float  # allocated by the filled cache (CUDA allocator; on the CPU, the cache's own count)
    seconds: float
    error: str = ""  # why it did not fit: "OOM", "over the budget", or an error message


def probe(model, attn, make_cache, sources, batch, context, device, budget: int | None) -> Probe:
    """Fill a cache to (batch, context), run two decode steps; ``fits`` unless out of memory
    (on the CPU: unless the cache's allocated bytes exceed ``budget``)."""
    set_attention(model, attn)
    start = time.perf_counter()
    cache, size, error = None, 0, ""
    try:
        before = allocated(device)
        cache = make_cache()
        fill(cache, sources, batch, context)
        sync(device)
        if device.type == "cuda":
            size = allocated(device) - before
        else:
            size = cache_bytes(cache, batch, model.config)["allocated"]
        nxt = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
        decode(model, cache, nxt, 2, device)
        if budget is not None and size > budget:
            error = "over the budget"
    except torch.OutOfMemoryError:
        error = "OOM"
    except Exception as e:  # e.g. a store past its int32 word offsets: it does not fit either
        error = f"{type(e).__name__}: {str(e)[:100]}"
    del cache
    free_memory(device)
    return Probe(batch, context, not error, size / GiB, time.perf_counter() - start, error)


def largest(ok: Callable[[int], bool], guess: int, limit: int, step: int, max_probes: int) -> tuple[int, int | None]:
    """Largest multiple of ``step`` in [step, limit] with ``ok`` (0 if none was found), and the
    smallest size that failed (None if none did).

    ``guess`` first (a prediction, usually close); then 15% lower while nothing has fitted,
    15% higher while nothing has failed, else bisection between the largest size that fitted
    and the smallest that did not. At most ``max_probes`` calls of ``ok``.
    """
    lo, hi = 0, limit + step  # lo fitted (0: none yet), hi did not (limit + step: none yet)
    nxt = max(step, min(limit, guess // step * step))
    for _ in range(max_probes):
        if ok(nxt):
            lo = nxt
        else:
            hi = nxt
        if lo == 0:
            nxt = int(0.85 * hi) // step * step
        elif hi > limit:
            nxt = min(limit, max(lo + step, int(1.15 * lo) // step * step))
        else:
            nxt = (lo + hi) // 2 // step * step
        if hi - lo <= step or not lo < nxt < hi or nxt < step:
            break
    return lo, hi if hi <= limit else None


def fit(model, makers, args, device, budget: int | None) -> tuple[list[dict], int]:
    """The longest context and the largest batch each cache holds with a decode step (see
    --fit), and the free bytes it planned with."""
    sources = source_kv(model, min(FIT_SOURCE_TOKENS, model.config.max_position_embeddings // 2), device)
    free_memory(device)
    free = torch.cuda.mem_get_info(device)[0] if budget is None else budget
    batch, context = max(args.batches), max(args.contexts)
    step, limit_context = args.fit_context_step, model.config.max_position_embeddings
    results = []
    for label, (attn, make) in makers.items():
        probes: list[Probe] = []

        def ok(b, c):
            probes.append(probe(model, attn, make, sources, b, c, device, budget))
            p = probes[-1]
            print(f"  probe {label:<16} batch {b:>5} context {c:>7}: {'fits' if p.fits else 'no, ' + p.error}"
                  f" ({p.cache_gib:.2f} GiB cache, {p.seconds:.1f} s)", flush=True)
            return p.fits

        if not ok(1, args.fit_calibration):
            print(f"  {label}: the calibration fill does not fit; no search")
            continue
        per_token = probes[0].cache_gib * GiB / args.fit_calibration  # bytes a token of one row takes
        margin = FIT_MARGIN if budget is None else 1.0
        longest, context_failed = largest(lambda c: ok(batch, c), int(margin * free / (batch * per_token)),
                                          limit_context, step, args.fit_probes)
        widest, batch_failed = largest(lambda b: ok(b, context), int(margin * free / (context * per_token)),
                                       BATCH_LIMIT, 1, args.fit_probes)
        results.append({
            "cache": label, "kib_per_token": per_token / 1024, "free_gib": free / GiB,
            "batch": batch, "longest_context": longest, "context_failed": context_failed,
            "context_limit": limit_context,
            "context": context, "largest_batch": widest, "batch_failed": batch_failed, "batch_limit": BATCH_LIMIT,
            "probes": [asdict(p) for p in probes],
        })
    return results, free


# -- output -----------------------------------------------------------------------------------------

TABLE_HEAD = (f"{'cache':<18}{'context':>8}{'batch':>6}{'tok/s':>9}{'ms/step':>9}{'med':>7}{'max':>7}{'host ms':>8}{'dev ms':>8}"
              f"{'fp16 GiB':>10}{'stored':>8}{'alloc':>8}{'ratio':>7}{'peak pre':>10}{'peak dec':>10}{'prefill s':>11}")


def table_line(r: Row) -> str:
    if r.status != "ok":
        return f"{r.cache:<18}{r.context:>8}{r.batch:>6}  {r.status}"
    return (f"{r.cache:<18}{r.context:>8}{r.batch:>6}{r.decode_tok_s:>9.1f}{r.ms_per_step:>9.2f}"
            f"{r.ms_step_median:>7.2f}{r.ms_step_max:>7.2f}{r.host_ms_step:>8.2f}{r.device_ms_step:>8.2f}{r.fp16_gib:>10.3f}{r.stored_gib:>8.3f}"
            f"{r.alloc_gib:>8.3f}{r.ratio:>7.2f}{r.prefill_peak_gib:>10.2f}{r.decode_peak_gib:>10.2f}"
            f"{r.prefill_s:>11.2f}")


def print_rounds(rows: list[dict]) -> None:
    """Median decode tok/s of each (context, batch, cache) over the rounds, and its ratio to
    DynamicCache's median (a host-bound batch-1 step varies by tens of percent from run to run)."""
    runs: dict[tuple, list[float]] = {}
    host: dict[tuple, list[float]] = {}
    for r in rows:
        if r["status"] == "ok":
            runs.setdefault((r["context"], r["batch"], r["cache"]), []).append(r["decode_tok_s"])
            host.setdefault((r["context"], r["batch"], r["cache"]), []).append(r["host_ms_step"])
    print(f"{'cache':<18}{'context':>8}{'batch':>6}{'rounds':>7}{'median tok/s':>14}{'min':>9}{'max':>9}{'vs dynamic':>12}"
          f"{'host ms':>9}")
    for key, rates in runs.items():
        context, batch, cache = key
        base = runs.get((context, batch, "dynamic"))
        vs = f"{statistics.median(rates) / statistics.median(base):.2f}" if base else "-"
        print(f"{cache:<18}{context:>8}{batch:>6}{len(rates):>7}{statistics.median(rates):>14.1f}"
              f"{min(rates):>9.1f}{max(rates):>9.1f}{vs:>12}{statistics.median(host[key]):>9.2f}")


def bound(found: int, failed: int | None, limit: int) -> str:
    """``found``, with what is known above it."""
    if failed is not None:
        return f"{found} ({failed} did not fit)"
    return f"{found} (the limit)" if found == limit else f"{found} (more not tried)"


def print_fit(results: list[dict], layers: int, free: int) -> None:
    print(f"fit: {layers} layers, the cache and two decode steps in {free / GiB:.3g} GiB free "
          "(probes above; the first of each cache calibrates)")
    for r in results:
        print(f"  {r['cache']:<16} {r['kib_per_token']:8.1f} KiB a token-row | longest context at batch {r['batch']}: "
              f"{bound(r['longest_context'], r['context_failed'], r['context_limit'])} | largest batch at context "
              f"{r['context']}: {bound(r['largest_batch'], r['batch_failed'], r['batch_limit'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama on the CPU (a check of the script)")
    parser.add_argument("--quick", action="store_true", help="the first context only, fewer decode steps")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers kept for the table (Llama-3.1-8B has 32)")
    parser.add_argument("--contexts", type=ints, default=[4096, 32768, 65536])
    parser.add_argument("--batches", type=ints, default=[1, 8])
    parser.add_argument("--caches", type=lambda s: s.split(","), default=["dynamic", "quantized", "packkv"],
                        help="comma list of dynamic, quantized, packkv, and the ablations packkv-combine, packkv-copy, "
                             "packkv-runner")
    parser.add_argument("--decode-tokens", type=int, default=2 * BENCH_PACKKV.block_size, help="timed decode steps")
    parser.add_argument("--warmup-steps", type=int, default=BENCH_PACKKV.block_size + 2,
                        help="untimed decode steps before them")
    parser.add_argument("--prefill-tokens", type=int, default=32768, help="batch x tokens of one prefill chunk")
    parser.add_argument("--fit", action="store_true",
                        help="also find the longest context / largest batch each cache fits")
    parser.add_argument("--fit-layers", type=int, default=32, help="decoder layers of the --fit model")
    parser.add_argument("--fit-context-step", type=int, default=4096, help="granularity of the longest context")
    parser.add_argument("--fit-probes", type=int, default=5, help="most probes for each --fit answer")
    parser.add_argument("--fit-calibration", type=int, default=16384, help="tokens of the calibration fill")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of each (context, batch, cache), the caches interleaved; then medians")
    parser.add_argument("--paired", type=int, default=0, metavar="N",
                        help="instead of the table: hold every cache at once and time N rounds of --segment "
                             "decode steps of each, alternating (see run_paired)")
    parser.add_argument("--segment", type=int, default=BENCH_PACKKV.block_size,
                        help="decode steps of a --paired segment (default a block: each packs one block a layer)")
    parser.add_argument("--json", metavar="FILE", help="write the rows and settings as JSON")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.paired < 0 or args.segment < 1:
        parser.error(f"--paired must be >= 0 and --segment >= 1, got {args.paired} and {args.segment}")
    if args.decode_tokens < 1 or args.warmup_steps < 0 or args.prefill_tokens < 1 or args.fit_probes < 1:
        parser.error("--decode-tokens, --prefill-tokens and --fit-probes must be >= 1, --warmup-steps >= 0")

    budget = None
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float16
        make_config, budget = tiny_config, 4 * MiB  # a pretend memory for --fit on the CPU
        if args.contexts == parser.get_default("contexts"):
            args.contexts = [256, 512]
        if args.batches == parser.get_default("batches"):
            args.batches = [1, 2]
        args.layers, args.fit_layers = min(args.layers, 2), min(args.fit_layers, 2)
        args.decode_tokens, args.warmup_steps = min(args.decode_tokens, 8), min(args.warmup_steps, 2)
        args.prefill_tokens = min(args.prefill_tokens, 512)
        args.fit_context_step, args.fit_calibration = min(args.fit_context_step, 256), min(args.fit_calibration, 512)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_generate.py needs a CUDA GPU (or --tiny for a CPU check)")
        device, dtype, make_config = torch.device("cuda"), torch.float16, llama_8b_config
    if args.quick:
        args.contexts = args.contexts[:1]
        args.decode_tokens = min(args.decode_tokens, BENCH_PACKKV.block_size)

    model = build_model(make_config(args.layers), device, dtype)
    makers, notes = cache_makers(model, args.caches)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    shape = f"tiny Llama ({args.layers} layers)" if args.tiny else f"Llama-3.1-8B shape, {args.layers} of 32 layers"
    header = (f"bench_generate: {shape}, random fp16 weights, {device_name}, "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
              f"{args.warmup_steps} warm-up + {args.decode_tokens} timed decode steps, PackKV {BENCH_PACKKV}")
    report = {"header": header, "args": vars(args), "notes": notes, "packkv_config": BENCH_PACKKV.to_dict(),
              "rows": [], "segments": [], "fit": []}

    def save() -> None:
        # After the table and again after --fit: a run cut short keeps what it measured.
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)

    start = time.perf_counter()
    print(header)
    with sdpa_backends(device):
        warm_up(model, makers, args, device)
        if args.paired:
            for c in args.contexts:
                for b in args.batches:
                    try:
                        segments = run_paired(model, makers, c, b, args, device)
                    except torch.OutOfMemoryError:
                        print(f"paired: context {c} batch {b}: out of memory with every cache held at once")
                        free_memory(device)
                        continue
                    report["segments"] += [asdict(s) for s in segments]
                    print_paired(segments)
        else:
            print(TABLE_HEAD, flush=True)
            for c in args.contexts:
                for b in args.batches:
                    order = list(makers.items())
                    for r in range(args.rounds):
                        # A B, B A, ...: a drift of the host's speed during the rounds cancels.
                        for label, (attn, make) in (order if r % 2 == 0 else order[::-1]):
                            row = guarded(model, label, attn, make, c, b, args, device)
                            row.round = r
                            report["rows"].append(asdict(row))
                            print(table_line(row), flush=True)
    if args.rounds > 1:
        print_rounds(report["rows"])
    for note in notes:
        print("note:", note)
    print(f"table: {time.perf_counter() - start:.0f} s", flush=True)
    save()

    if args.fit:
        start = time.perf_counter()
        del model, makers  # the makers hold the model too
        free_memory(device)
        model = build_model(make_config(args.fit_layers), device, dtype)
        makers, _ = cache_makers(model, args.caches)
        with sdpa_backends(device):
            report["fit"], free = fit(model, makers, args, device, budget)
        print_fit(report["fit"], args.fit_layers, free)
        print(f"fit: {time.perf_counter() - start:.0f} s")
        save()

if __name__ == "__main__":
    main()
