"""End-to-end decode with transformers: DynamicCache vs QuantizedCache vs PackKVCache.

Question: on a Llama-3.1-8B-shaped model, how fast does decode run and how much GPU
memory does it take with each cache, at long context and batch > 1; and what is the
longest context / largest batch each cache fits in the GPU?

Model: ``LlamaConfig`` of Llama-3.1-8B (32 layers, hidden 4096, 32 query heads, 8 KV
heads, head_dim 128, vocab 128256) with random fp16 weights; decode speed does not depend
on weight values. ``--layers N`` keeps only N layers (the table says so). Prompts are
random token ids. Prefill runs in chunks of at most ``--prefill-tokens`` batch-tokens for
every cache alike; only the last position's logits are computed.

Per (cache, context, batch): decode tokens/s over ``--decode-tokens`` greedy steps after
2 warm-up steps (CUDA synchronized wall time; SDPA restricted to its flash and
memory-efficient kernels, see ``sdpa_backends``); the cache's GPU bytes (allocated after the
prefill minus before; on the CPU, --tiny, the bytes a DynamicCache/PackKVCache holds);
peak allocated GPU memory (weights included) during the prefill and during the decode.
PackKVCache runs with ``attn_implementation="packkv"`` (decode: the fused Triton kernel on
the packed cache) at the default PackKVConfig but median repacking (PackKV's throughput
setting; greedy packs a little tighter and encodes far slower); the others run with
``"sdpa"``. QuantizedCache rows appear for each backend that constructs here (quanto and
hqq need their packages, fp8 a transformers release that has it), else a note says why.

    PYTHONPATH=src python3 benchmarks/bench_generate.py --json out.json
    PYTHONPATH=src python3 benchmarks/bench_generate.py --quick
    PYTHONPATH=src python3 benchmarks/bench_generate.py --fit --contexts 32768 --batches 8
    PYTHONPATH=src python3 benchmarks/bench_generate.py --tiny   # CPU check, tiny model
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import packkv.cache  # noqa: F401  (registers attn_implementation="packkv")
from packkv import PackKVConfig
from packkv.cache import PackKVCache

GiB = 2**30
# PackKV's throughput setting: median repacking (greedy packs a little tighter, far slower to encode).
BENCH_PACKKV = PackKVConfig(repack="median")
QUANTIZED_BACKENDS = (("quanto", {"nbits": 4}), ("hqq", {"nbits": 4}), ("fp8", {}))


def llama_8b_config(layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
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
    ms_per_step: float = 0.0
    cache_gib: float = 0.0
    prefill_peak_gib: float = 0.0  # peak allocated GPU memory during the prefill (weights included)
    decode_peak_gib: float = 0.0  # the same during the decode steps
    prefill_s: float = 0.0
    packed_ratio: float = 0.0  # PackKVCache: fp16 bytes / stored bytes


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
    if "packkv" in wanted:
        makers["packkv"] = ("packkv", lambda: PackKVCache(model.config, BENCH_PACKKV))
    return makers, notes


def sdpa_backends(device: torch.device):
    """Flash and memory-efficient SDPA (math as a fallback), not cuDNN, on CUDA."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type != "cuda":
        return nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


@torch.no_grad()
def run_one(model, make_cache, context: int, batch: int, decode_tokens: int, prefill_tokens: int, device) -> Row:
    """Prefill ``batch`` random prompts of ``context`` tokens, then time greedy decode steps."""
    gen = torch.Generator(device="cpu").manual_seed(context + batch)
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = allocated(device)
    cache = make_cache()
    chunk = max(1, prefill_tokens // batch)
    sync(device)
    start = time.perf_counter()
    for lo in range(0, context, chunk):
        logits = model(prompt[:, lo : lo + chunk], past_key_values=cache, logits_to_keep=1).logits
    sync(device)
    prefill_s = time.perf_counter() - start
    cache_bytes = allocated(device) - before - logits.numel() * logits.element_size() if device.type == "cuda" else 0
    del prompt
    nxt = logits[:, -1:].argmax(-1)
    if device.type == "cuda":
        prefill_peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(2 + decode_tokens):
        if i == 2:
            sync(device)
            start = time.perf_counter()
        nxt = model(nxt, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
    sync(device)
    elapsed = time.perf_counter() - start
    ratio = 0.0
    if isinstance(cache, PackKVCache):
        ratio = cache.stats()["total"]["ratio"]
        if device.type != "cuda":
            cache_bytes = cache.nbytes()
    elif device.type != "cuda" and isinstance(cache, DynamicCache):
        cache_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    decode_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return Row(
        cache="", context=context, batch=batch, status="ok",
        decode_tok_s=batch * decode_tokens / elapsed, ms_per_step=1e3 * elapsed / decode_tokens,
        cache_gib=cache_bytes / GiB, prefill_peak_gib=prefill_peak / GiB if device.type == "cuda" else 0.0,
        decode_peak_gib=decode_peak / GiB, prefill_s=prefill_s, packed_ratio=ratio,
    )


def guarded(model, label, attn, make_cache, context, batch, args, device) -> Row:
    """``run_one`` that turns an out-of-memory error into a row, and frees everything after."""
    set_attention(model, attn)
    try:
        row = run_one(model, make_cache, context, batch, args.decode_tokens, args.prefill_tokens, device)
    except torch.OutOfMemoryError:
        row = Row(cache=label, context=context, batch=batch, status="OOM")
    except Exception as e:  # a cache that fails at this size: report it, keep going
        row = Row(cache=label, context=context, batch=batch, status=f"{type(e).__name__}: {str(e)[:100]}")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    row.cache = label
    return row


def fits(model, attn, make_cache, context, batch, args, device) -> bool:
    probe = argparse.Namespace(decode_tokens=1, prefill_tokens=args.prefill_tokens)
    return guarded(model, "", attn, make_cache, context, batch, probe, device).status == "ok"


def largest(ok: Callable[[int], bool], start: int, limit: int, step: int) -> int:
    """Largest multiple of ``step`` in [start, limit] with ``ok`` (0 if none): doubling, then bisection."""
    if not ok(start):
        return 0
    lo, hi = start, None
    while hi is None:
        nxt = min(2 * lo, limit)
        if nxt == lo:
            return lo
        if ok(nxt):
            lo = nxt
        else:
            hi = nxt
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            break
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def print_table(rows: list[Row], header: str) -> None:
    print(header)
    print(f"{'cache':<18}{'context':>9}{'batch':>6}{'status':>8}{'tok/s':>10}{'ms/step':>9}"
          f"{'cache GiB':>11}{'peak prefill':>14}{'peak decode':>13}{'prefill s':>11}{'ratio':>7}")
    for r in rows:
        if r.status != "ok":
            print(f"{r.cache:<18}{r.context:>9}{r.batch:>6}  {r.status}")
            continue
        print(f"{r.cache:<18}{r.context:>9}{r.batch:>6}{'ok':>8}{r.decode_tok_s:>10.1f}{r.ms_per_step:>9.2f}"
              f"{r.cache_gib:>11.3f}{r.prefill_peak_gib:>14.2f}{r.decode_peak_gib:>13.2f}{r.prefill_s:>11.2f}"
              f"{r.packed_ratio or float('nan'):>7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama on the CPU (a check of the script)")
    parser.add_argument("--quick", action="store_true", help="4K context only, fewer decode steps")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers kept (Llama-3.1-8B has 32)")
    parser.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 32768, 65536])
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument("--caches", type=lambda s: s.split(","), default=["dynamic", "quantized", "packkv"])
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--prefill-tokens", type=int, default=32768, help="batch x tokens of one prefill chunk")
    parser.add_argument("--fit", action="store_true",
                        help="also search the longest context (at the largest --batches) and the largest batch "
                             "(at the largest --contexts) each cache fits (CUDA only)")
    parser.add_argument("--json", metavar="FILE", help="write the rows and settings as JSON")
    args = parser.parse_args()

    if args.tiny:
        device, dtype, config = torch.device("cpu"), torch.float16, tiny_config()
        if args.contexts == parser.get_default("contexts"):
            args.contexts = [256, 512]
        if args.batches == parser.get_default("batches"):
            args.batches = [1, 2]
        args.decode_tokens = min(args.decode_tokens, 4)
        args.prefill_tokens = min(args.prefill_tokens, 512)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_generate.py needs a CUDA GPU (or --tiny for a CPU check)")
        device, dtype, config = torch.device("cuda"), torch.float16, llama_8b_config(args.layers)
    if args.quick:
        args.contexts = args.contexts[:1]
        args.decode_tokens = min(args.decode_tokens, 8)

    model = build_model(config, device, dtype)
    makers, notes = cache_makers(model, args.caches)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    shape = "tiny Llama (2 layers)" if args.tiny else f"Llama-3.1-8B shape, {args.layers} of 32 layers"
    header = (f"bench_generate: {shape}, random fp16 weights, {device_name}, "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
              f"PackKV {BENCH_PACKKV}")
    # torch 2.11 picks cuDNN attention for one-token SDPA calls and rebuilds its plan on
    # the CPU at every step (7 ms a call seen on the H100), which would make every cache's
    # decode CPU-bound; flash / memory-efficient SDPA is what serving stacks use.
    with sdpa_backends(device):
        rows = [guarded(model, label, attn, make, c, b, args, device)
                for c in args.contexts for b in args.batches for label, (attn, make) in makers.items()]
    print_table(rows, header)
    for note in notes:
        print("note:", note)

    limits = []
    if args.fit and device.type == "cuda":
        batch, context = max(args.batches), max(args.contexts)
        step = 4096
        for label, (attn, make) in makers.items():
            longest = largest(lambda c: fits(model, attn, make, c, batch, args, device),
                              step, config.max_position_embeddings, step)
            widest = largest(lambda b: fits(model, attn, make, context, b, args, device), 1, 1024, 1)
            limits.append({"cache": label, "longest_context_at_batch": batch, "longest_context": longest,
                           "largest_batch_at_context": context, "largest_batch": widest})
            print(f"fit {label:<18} longest context at batch {batch}: {longest:>7}   "
                  f"largest batch at context {context}: {widest}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "args": vars(args), "notes": notes, "packkv_config": BENCH_PACKKV.to_dict(),
                       "rows": [asdict(r) for r in rows], "fit": limits}, f, indent=1)


if __name__ == "__main__":
    main()
