"""Where does a decode step's host time go? packkv's attention path, piece by piece, against
transformers' SDPA on a DynamicCache layer.

Question: at batch 1 a decode step of a Llama-shaped model is bound by the host's time per
layer (docs/benchmarks.md, bench_generate 2026-11-24): how many microseconds of Python and
launch overhead does each piece of packkv's decode path take, and what does a layer's
attention cost in all (the cache's ``update`` plus the attention function) against
DynamicCache's ``update`` plus ``sdpa_attention_forward``?

Shapes: one Llama-3.1-8B attention layer (8 KV heads, 32 query heads, head_dim 128), fp16,
batches 1 and 8, contexts of 4K and 32K tokens of realistic random K/V
(``bench_encode.realistic_kv``) packed by a ``PackKVLayer`` at the default PackKVConfig,
and the same K/V in a transformers ``DynamicLayer``. The query has transformers' layout
(``[batch, heads, 1, head_dim]``, a transposed view of the projection).

Each piece is timed in two ways:
  * *host us*: median (and mean) of calls timed one by one with ``time.perf_counter``, the
    device synchronized every few calls outside the timing, so that a full launch queue
    never throttles the host: what the host spends;
  * *wall us*: a run of calls ended by one synchronize, per call: the device's time when
    it is slower than the host.
Pieces: the store's views (``store.k``, ``store.v``); a ``PackedKV`` of them and the buffer;
``check_attention``; the public ``decode_attention`` (checks, a one-shot ``DecodePlan``,
two launches through Triton's dispatcher); the two launches through Triton's dispatcher,
arguments prepared; ``DecodePlan.run`` (the output's allocation and the two launches of
the cached compiled kernels); then decode steps of the layer: ``update`` of one token,
``packkv_attention`` (the plan, the launches, ``settle``; a block compressed every
block_size steps, in the mean), and both; and DynamicCache's ``update`` (a concatenation),
``sdpa_attention_forward`` (SDPA restricted as bench_generate restricts it) and both.
*identical*: the plan's output equals the public ``decode_attention`` bit for bit.

    PYTHONPATH=src python3 benchmarks/bench_decode_step.py [--batches 1,8] [--contexts 4096,32768] [--json FILE]
    PYTHONPATH=src python3 benchmarks/bench_decode_step.py --smoke   # tiny shapes; CPU: Triton's interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable

import torch

from _cli import ints  # benchmarks/_cli.py


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], reps: int, device: torch.device) -> dict[str, float]:
    """Host microseconds per call (median, mean) and wall microseconds per call of ``fn``:
    :func:`timed_step` of a step of one part."""
    return timed_step([("call", fn)], reps, device)["step"]


def timed_step(parts: list[tuple[str, Callable[[], object]]], reps: int, device: torch.device) -> dict[str, dict]:
    """The parts of a step that must run in order (``update``, then the attention), ``reps``
    steps after one untimed: each part's host microseconds and the whole step's (median and
    mean, each step timed alone, the device synchronized every 8 steps outside the timing),
    and the step's wall microseconds over ``reps`` steps ended by a synchronize."""
    host = {name: [] for name, _ in parts}
    host["step"] = []
    for i in range(reps + 1):
        if i % 8 == 0:
            sync(device)
        step = 0.0
        for name, fn in parts:
            start = time.perf_counter()
            fn()
            took = time.perf_counter() - start
            step += took
            if i:  # the first step warms up
                host[name].append(took)
        if i:
            host["step"].append(step)
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        for _, fn in parts:
            fn()
    sync(device)
    wall = 1e6 * (time.perf_counter() - start) / reps
    return {name: {"host_us": 1e6 * statistics.median(t), "host_mean_us": 1e6 * statistics.fmean(t),
                   "wall_us": wall if name == "step" else None} for name, t in host.items()}


def bench_one(batch: int, context: int, shape: dict, reps: int, device: torch.device) -> tuple[list[dict], bool]:
    """The rows of one (batch, context), and whether the plan's output equals decode_attention's."""
    from bench_encode import realistic_kv
    from bench_generate import sdpa_backends
    from transformers.cache_utils import DynamicLayer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from packkv import PackedKV, PackKVConfig
    from packkv.cache import PackKVLayer, packkv_attention
    from packkv.kernels import decode_attention
    from packkv.kernels._common import check_attention

    kv_heads, q_heads, head_dim = shape["kv_heads"], shape["q_heads"], shape["head_dim"]
    dtype, scaling = torch.float16, head_dim**-0.5
    k, v = realistic_kv(batch, kv_heads, context, head_dim, str(device))
    layer = PackKVLayer(PackKVConfig())
    layer.update(k, v)
    layer.settle(None)
    dynamic = DynamicLayer()
    dynamic.update(k, v)
    del k, v
    g = torch.Generator(device=device).manual_seed(1)
    # transformers' layout: the projection [batch, 1, heads, head_dim], transposed.
    query = torch.randn(batch, 1, q_heads, head_dim, device=device, dtype=dtype, generator=g).transpose(1, 2)
    new_k = torch.randn(batch, 1, kv_heads, head_dim, device=device, dtype=dtype, generator=g).transpose(1, 2)
    new_v = torch.randn_like(new_k)
    q = query[:, :, 0]
    module = torch.nn.Module().eval()
    module.is_causal, module.num_key_value_groups, module.layer_idx = True, q_heads // kv_heads, 0

    store = layer.store
    views = lambda: PackedKV(k=store.k, v=store.v, k_tail=layer.k_buffer, v_tail=layer.v_buffer,
                             config=layer.config, dtype=dtype)
    kv = views()
    plan = layer.decode_plan(query, scaling)
    tail = layer.n_buffer

    def dispatched():
        plan._launch = None  # forget the compiled kernels: through Triton's dispatcher
        return plan.run(query, tail)

    def same() -> bool:
        """The layer's plan (its second run: the cached launches) against decode_attention."""
        mask = layer.valid_mask()
        layer.decode_plan(query, scaling).run(query, layer.n_buffer)
        return torch.equal(layer.decode_plan(query, scaling).run(query, layer.n_buffer),
                           decode_attention(q, views(), scaling, mask=mask))

    identical = same()
    rows = {
        "store views": timed(lambda: (store.k, store.v), reps, device),
        "PackedKV": timed(views, reps, device),
        "check_attention": timed(lambda: check_attention(q, kv, None), reps, device),
        "decode_attention": timed(lambda: decode_attention(q, kv, scaling), reps, device),
        "launch, dispatcher": timed(dispatched, reps, device),
        "launch, plan": timed(lambda: plan.run(query, tail), reps, device),
    }
    held = {}  # what update returned, for the attention
    packkv = timed_step([
        ("update", lambda: held.update(kv=layer.update(new_k, new_v))),
        ("attention", lambda: packkv_attention(module, query, *held["kv"], None, scaling)),
    ], reps, device)
    rows.update({f"packkv {name}": row for name, row in packkv.items()})
    identical &= same()  # after the steps' compressions
    with sdpa_backends(device):
        sdpa = timed_step([
            ("update", lambda: held.update(kv=dynamic.update(new_k, new_v))),
            ("attention", lambda: sdpa_attention_forward(module, query, *held["kv"], None, scaling=scaling)),
        ], reps, device)
    rows.update({f"sdpa {name}": row for name, row in sdpa.items()})
    return [{"batch": batch, "context": context, "piece": name, **row} for name, row in rows.items()], identical


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=ints, default=[1, 8])
    parser.add_argument("--contexts", type=ints, default=[4096, 32768])
    parser.add_argument("--reps", type=int, default=500, help="timed calls a piece (decode steps: every layer "
                        "packs a block each block_size of them)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few calls: a check of the script "
                        "(on the CPU under Triton's interpreter)")
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    args = parser.parse_args(argv)
    shape = {"kv_heads": 8, "q_heads": 32, "head_dim": 128}
    if args.smoke:
        shape = {"kv_heads": 2, "q_heads": 4, "head_dim": 64}
        args.batches, args.contexts, args.reps = [1, 2], [192], 2
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.smoke:
        device = torch.device("cpu")
        # Before packkv's kernels are imported: triton.jit reads it.
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        print("bench_decode_step: needs an NVIDIA GPU (torch.cuda.is_available() is False); --smoke runs on the CPU",
              file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_encode, bench_generate
    import transformers
    import triton

    rows, identical = [], {}
    with torch.no_grad():
        for batch in args.batches:
            for context in args.contexts:
                got, identical[batch, context] = bench_one(batch, context, shape, args.reps, device)
                rows += got
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"\ndecode step pieces, one attention layer ({shape['kv_heads']} KV heads, {shape['q_heads']} query heads, "
          f"head_dim {shape['head_dim']}), fp16, {name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"transformers {transformers.__version__}, {date}; {args.reps} calls a piece")
    keys = sorted(identical)
    print(f"{'piece':<20}" + "".join(f" | {f'b{b} T={t}':^25}" for b, t in keys))
    print(f"{'':<20}" + " | host us  (mean)  wall us" * len(keys))
    for piece in dict.fromkeys(r["piece"] for r in rows):
        cells = {(r["batch"], r["context"]): r for r in rows if r["piece"] == piece}
        print(f"{piece:<20}" + "".join(
            f" | {cells[key]['host_us']:7.1f} {cells[key]['host_mean_us']:7.1f} "
            + ("       -" if cells[key]["wall_us"] is None else f"{cells[key]['wall_us']:8.1f}") for key in keys))
    print("per layer, packkv step - sdpa step, host us (median): " + ", ".join(
        f"b{b} T={t}: {cell('packkv step', b, t, rows) - cell('sdpa step', b, t, rows):+.1f}" for b, t in keys))
    print("plan output identical to decode_attention: " + ", ".join(
        f"b{b} T={t}: {'yes' if identical[b, t] else 'NO'}" for b, t in keys))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "date": date, "torch": torch.__version__, "triton": triton.__version__,
                       "transformers": transformers.__version__, "shape": shape, "reps": args.reps,
                       "identical": {f"b{b}_T{t}": same for (b, t), same in identical.items()}, "rows": rows},
                      f, indent=1)
    return 0 if all(identical.values()) else 1


def cell(piece: str, batch: int, context: int, rows: list[dict]) -> float:
    return next(r["host_us"] for r in rows if (r["piece"], r["batch"], r["context"]) == (piece, batch, context))


if __name__ == "__main__":
    sys.exit(main())
