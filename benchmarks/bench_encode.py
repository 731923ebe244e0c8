"""How fast is the store stage on a GPU, against the work it rides on?

For one Llama-3.1-8B layer (8 KV heads, head_dim 128, 32 query heads, hidden 4096, MLP
14336), batch 1, the default PackKVConfig but the repacking named, it times:
  * encoding a prefill of T tokens (K and V) with ``encode_kv``, as fp16-input GB/s
    (median and none: the fused kernels; greedy: the reference codec with the Triton
    packer, timed on T/8 tokens and scaled), checked bit for bit against the reference
    codec first, and against the layer's prefill attention plus MLP (random weights);
  * appending ONE block to a ``PackedStore`` already holding those T tokens (what a decode
    step triggers once every block_size steps): CUDA events around each append, the device
    idle before it (so launch overhead counts), median and mean of many appends, each
    growing the store (the mean includes the rare appends that grow a pool and sync); and
    the device's own time (the GPU kept busy while the host enqueues: no launch overhead);
  * that time / block_size against one decode attention step of the layer at T tokens:
    fp16 SDPA and packkv's fused ``decode_attention`` over the store's packed blocks plus an
    fp16 tail of ``buffer_size`` tokens, each replayed from a CUDA graph (the device's time:
    do_bench flushes L2 by zeroing 256 MB before each call, which hides only ~0.09 ms of
    host launch cost, so a slower host shows up in an eager timing), every store timed in
    two passes in opposite orders after all are built; eager timings in --json;
  * the store's allocated and used bytes over the fp16 bytes of the tokens it holds, after
    the prefill (the table) and after the appends (--json).

Every kernel is compiled before anything is timed (a compile idles the GPU for seconds).

    PYTHONPATH=src python3 benchmarks/bench_encode.py [--tokens 32768] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def bench_ms(fn, quick: bool) -> float:
    """Median milliseconds of ``fn`` (CUDA events through triton.testing.do_bench)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=10 if quick else 50, rep=50 if quick else 300, return_mode="median")


def graph_ms(fn, quick: bool) -> float:
    """Median milliseconds of ``fn`` replayed from a CUDA graph: the device's time, no host
    launch cost (do_bench still flushes L2 before each replay)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # allocations and compilation outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_ms(graph.replay, quick)


def realistic_kv(batch: int, heads: int, tokens: int, head_dim: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """K with outlier channels and a slowly varying per-token structure, V roughly Gaussian.

    Never zeros: the widths after repacking depend on the data, so the generator mimics the
    statistics seen in real caches (a few large K channels, smooth token-to-token drift).
    """
    g = torch.Generator(device=device).manual_seed(0)
    channel_scale = torch.ones(head_dim, device=device)
    channel_scale[torch.randperm(head_dim, generator=g, device=device)[: head_dim // 16]] = 8.0
    drift = torch.cumsum(torch.randn(batch, heads, tokens, 1, device=device, generator=g) * 0.05, dim=2)
    k = (torch.randn(batch, heads, tokens, head_dim, device=device, generator=g) + drift) * channel_scale
    v = torch.randn(batch, heads, tokens, head_dim, device=device, generator=g)
    return k.half(), v.half()


def layer_prefill_ms(tokens: int, quick: bool) -> float:
    """One Llama-3.1-8B decoder layer (random weights, sdpa) over a prefill of ``tokens``."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, max_position_embeddings=max(tokens, 8192),
                      attn_implementation="sdpa")
    layer = LlamaDecoderLayer(cfg, 0).cuda().half().eval()
    rope = LlamaRotaryEmbedding(cfg).cuda()
    x = torch.randn(1, tokens, 4096, device="cuda", dtype=torch.float16) * 0.1
    pos = torch.arange(tokens, device="cuda").unsqueeze(0)
    emb = rope(x, pos)

    @torch.no_grad()
    def run():
        layer(x, position_embeddings=emb, position_ids=pos, attention_mask=None)

    return bench_ms(run, quick)


def sdpa_decode(k: torch.Tensor, v: torch.Tensor):
    """One fp16 SDPA decode step, 32 query heads over ``k``, ``v`` [1, 8, T, 128] (GQA: each KV
    head read once, as bench_attention's baseline)."""
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.float16)
    f = torch.nn.functional.scaled_dot_product_attention
    return lambda: f(q, k, v, enable_gqa=True)


def packed_decode(store, tail_k: torch.Tensor, tail_v: torch.Tensor):
    """One packkv decode attention step, 32 query heads over the store's blocks and the tail."""
    from packkv import PackedKV
    from packkv.kernels import decode_attention

    kv = PackedKV(k=store.k, v=store.v, k_tail=tail_k, v_tail=tail_v, config=store.config, dtype=torch.float16)
    q = torch.randn(1, 32, 128, device="cuda", dtype=torch.float16)
    return lambda: decode_attention(q, kv)


def store_sizes(store) -> dict:
    """The store's compression ratio, used and allocated bytes over its tokens' fp16 bytes."""
    fp16 = 2 * 2 * store.batch * store.heads * store.n_tokens * store.head_dim
    return {"store_tokens": store.n_tokens, "ratio": fp16 / store.nbytes, "used_vs_fp16": store.nbytes / fp16,
            "allocated_vs_fp16": store.allocated_nbytes / fp16}


def append_times(store, k: torch.Tensor, v: torch.Tensor, reps: int) -> dict:
    """Milliseconds of ``store.append(k, v)``, device idle before each: CUDA events (median,
    mean) and the host's time to return (median); then with the device kept busy (a 1 ms
    spin) while the host enqueues, CUDA events give the device's own time (median)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    device_ms, host_ms, gpu_ms = [], [], []
    realloc = store.reallocations
    for busy in (False, True):
        for _ in range(reps):
            torch.cuda.synchronize()
            if busy:
                torch.cuda._sleep(2_000_000)  # ~1 ms of GPU cycles: the host is ahead by then
            t0 = time.perf_counter()
            start.record()
            store.append(k, v)
            end.record()
            host = (time.perf_counter() - t0) * 1e3
            end.synchronize()
            (gpu_ms if busy else device_ms).append(start.elapsed_time(end))
            if not busy:
                host_ms.append(host)
    return {"append_ms": statistics.median(device_ms), "append_mean_ms": statistics.fmean(device_ms),
            "append_host_ms": statistics.median(host_ms), "append_gpu_ms": statistics.median(gpu_ms),
            "appends": 2 * reps, "reallocations_during": store.reallocations - realloc}


def warm_up(repacks: tuple[str, ...]) -> None:
    """Compile every kernel timed below on small inputs: a compile idles the GPU for seconds."""
    from packkv import PackKVConfig
    from packkv.kernels.encode import encode_kv
    from packkv.store import PackedStore

    k, v = realistic_kv(1, 8, 1024, 128, "cuda")
    for repack in repacks:
        config = PackKVConfig(repack=repack)
        encode_kv(k, v, config)
        store = PackedStore(config)
        store.append(k[:, :, :512], v[:, :, :512])
        store.append(k[:, :, 512:576], v[:, :, 512:576])
        packed_decode(store, k[:, :, 576:].contiguous(), v[:, :, 576:].contiguous())()
    sdpa_decode(k, v)()
    torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768, help="prefill length (default 32768)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_encode: needs an NVIDIA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2

    from packkv import PackKVConfig, compress_kv
    from packkv.kernels.encode import encode_kv
    from packkv.store import PackedStore

    torch.manual_seed(0)
    t = args.tokens
    repacks = ("median", "none", "greedy")
    warm_up(repacks)
    k, v = realistic_kv(1, 8, t, 128, "cuda")
    fp16_bytes = 2 * k.numel() * 2
    prefill_ms = layer_prefill_ms(t, args.quick)
    rows, stores = [], []
    for repack in repacks:
        config = PackKVConfig(repack=repack)
        # Greedy is sequential per pack: time it on a 1/8 slice and scale, and say so.
        part = t if repack != "greedy" else t // 8
        ks, vs = k[:, :, :part].contiguous(), v[:, :, :part].contiguous()
        ref = compress_kv(ks[:, :, :1024], vs[:, :, :1024], config)
        fast = encode_kv(ks[:, :, :1024], vs[:, :, :1024], config)
        for side in ("k", "v"):
            for name, tensor in getattr(ref, side).tensors().items():
                assert torch.equal(getattr(getattr(fast, side), name), tensor), f"kernel != reference: {side}.{name}"
        encode_ms = bench_ms(lambda: encode_kv(ks, vs, config), args.quick) * (t / part)
        # A store holding the prefill but a tail of buffer_size tokens (as the cache leaves it).
        n_packed = (t - config.buffer_size) // config.block_size * config.block_size
        store = PackedStore(config)
        store.append(k[:, :, :n_packed], v[:, :, :n_packed])
        stores.append(store)
        rows.append({
            "repack": repack, "tokens": t, "encode_ms": encode_ms, "gbps_fp16_input": fp16_bytes / encode_ms / 1e6,
            "encode_scaled_from_tokens": part, "prefill_layer_ms": prefill_ms, "encode_vs_prefill": encode_ms / prefill_ms,
            **store_sizes(store),
        })
        del ks, vs

    # One decode attention step over each store and the tail (the same for every store),
    # after all are built: two passes in opposite orders, from CUDA graphs; then eager.
    tail_k, tail_v = k[:, :, n_packed:].contiguous(), v[:, :, n_packed:].contiguous()
    steps = [sdpa_decode(k, v)] + [packed_decode(store, tail_k, tail_v) for store in stores]
    passes = [[graph_ms(step, args.quick) for step in steps],
              [graph_ms(step, args.quick) for step in reversed(steps)][::-1]]
    eager = [bench_ms(step, args.quick) for step in steps]
    sdpa_ms = statistics.fmean(p[0] for p in passes)
    for i, row in enumerate(rows, start=1):
        row.update(sdpa_decode_ms=sdpa_ms, packed_decode_ms=statistics.fmean(p[i] for p in passes),
                   packed_decode_passes_ms=[p[i] for p in passes], sdpa_decode_eager_ms=eager[0],
                   packed_decode_eager_ms=eager[i])

    # One block at a time appended to each store.
    s = PackKVConfig().block_size
    block_k, block_v = tail_k[:, :, :s], tail_v[:, :, :s]
    for row, store in zip(rows, stores):
        reps = (20 if args.quick else 200) if row["repack"] != "greedy" else (3 if args.quick else 10)
        append_times(store, block_k, block_v, 3)  # warm-up
        appended = append_times(store, block_k, block_v, reps)
        per_token_ms = appended["append_ms"] / s
        row.update(**appended, per_token_ms=per_token_ms, per_token_vs_sdpa=per_token_ms / sdpa_ms,
                   per_token_vs_packed=per_token_ms / row["packed_decode_ms"],
                   per_token_gpu_vs_sdpa=appended["append_gpu_ms"] / s / sdpa_ms,
                   **{f"{key}_after_appends": value for key, value in store_sizes(store).items()})
    del stores

    dev = torch.cuda.get_device_name()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"\nstore stage, Llama-3.1-8B layer (8 KV heads x 128), batch 1, {t} tokens, {dev}, "
          f"torch {torch.__version__}, {date}")
    print(f"{'repack':>7} {'encode ms':>9} {'GB/s in':>7} {'vs prefill':>10} | {'append ms':>9} {'mean':>6} "
          f"{'host':>6} {'gpu':>6} | {'/64 vs sdpa':>11} {'vs packed':>9} | {'ratio':>5} {'alloc/fp16':>10}")
    for r in rows:
        note = f"  (encode timed on {r['encode_scaled_from_tokens']} tokens, scaled)" if r["encode_scaled_from_tokens"] != t else ""
        print(f"{r['repack']:>7} {r['encode_ms']:>9.2f} {r['gbps_fp16_input']:>7.1f} {r['encode_vs_prefill']:>10.1%} | "
              f"{r['append_ms']:>9.3f} {r['append_mean_ms']:>6.3f} {r['append_host_ms']:>6.3f} "
              f"{r['append_gpu_ms']:>6.3f} | "
              f"{r['per_token_vs_sdpa']:>11.2%} {r['per_token_vs_packed']:>9.2%} | "
              f"{r['ratio']:>5.2f} {r['allocated_vs_fp16']:>10.3f}{note}")
    print(f"layer prefill (attention + MLP, sdpa, fp16): {prefill_ms:.2f} ms; decode attention step at {t} tokens "
          f"(CUDA graph; eager in parentheses): fp16 SDPA {sdpa_ms:.3f} ms ({rows[0]['sdpa_decode_eager_ms']:.3f}), "
          "packkv " + ", ".join(f"{r['repack']} {r['packed_decode_ms']:.3f} ms ({r['packed_decode_eager_ms']:.3f})"
                                for r in rows))
    print(f"append: one block into a store of {rows[0]['store_tokens']}+ tokens (CUDA events, device idle before "
          "each; mean includes pool growth; gpu: the device's own time, the host ahead); '/64 vs': append ms / "
          "block_size over one decode attention step; alloc/fp16: the store's allocation over its tokens' fp16 "
          "bytes, after the prefill")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev, "date": date, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
