"""Prototype check and timing: the Gluon decode attention (attn_gluon.py) over the packed
blocks, its splits merged by decode_attention.py's _combine_kernel, against
decode_attention_reference (packed blocks only) and the Triton decode_attention and SDPA
(both with the 32-token fp16 tail), T = 32K. GPU only.

    PYTHONPATH=src python3 docs/notes/gluon/run_attn.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[2] / "benchmarks"))
from attn_gluon import _attn_gluon  # noqa: E402
from bench_attention import (  # noqa: E402
    SHAPES, build_cache, encode_chunk, real_chunk, rel_err, rotation, time_graph,
)

from packkv.codec import decode_tensor  # noqa: E402
from packkv.kernels import _common, decode_attention, decode_attention_reference, pv_gluon  # noqa: E402
from packkv.kernels.decode_attention import COMBINE_CHUNK, _combine_kernel  # noqa: E402
from packkv.kernels.planes import packed_args  # noqa: E402


def attn_gluon(q, kv, tw: int, resident: dict, merge: bool = True, cap: int | None = None):
    batch, q_heads, d = q.shape
    heads = kv.k.heads
    group = q_heads // heads
    n_words = kv.k.n_tokens // 32
    mma, wq, meta, _ = pv_gluon.layouts(d, tw)
    key = (d, tw, cap)
    per_split, n_split = _common.tile_splits(batch * heads, n_words, tw, q.device, None, resident.get(key, 2))
    m = torch.empty(batch * q_heads * n_split, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(batch * q_heads * n_split, d, device=q.device)
    compiled = _attn_gluon[(batch * heads, n_split)](
        q, m, l, acc, *packed_args(kv.k), *packed_args(kv.v), *q.stride(), d ** -0.5 * math.log2(math.e),
        heads, n_words, per_split, n_split,
        GROUP=group, D=d, BLOCK=kv.k.block_size, TW=tw, K_PLANES=max(1, kv.k.width_bound),
        V_PLANES=max(1, kv.v.width_bound), MMA=mma, WQ=wq, META=meta, num_warps=d // 32,
        **({"maxnreg": cap} if cap else {}))
    if key not in resident:
        resident[key] = _common.resident_programs(compiled, torch.cuda.get_device_properties(q.device))
        print(f"  compiled d{d} tw{tw} cap {cap}: {compiled.n_regs} registers, {compiled.n_spills} spills, "
              f"{resident[key]} programs an SM", flush=True)
    if not merge:
        return None
    out = torch.empty_like(q)
    _combine_kernel[(batch * q_heads,)](m, l, acc, out, *out.stride(), q_heads, n_split, CHUNK=COMBINE_CHUNK, D=d)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=".kvdata/smollm2_kv.pt")
    parser.add_argument("--json")
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    data = torch.load(args.data)
    rows, resident = [], {}
    for shape in SHAPES:
        k, v = (t.cuda() for t in real_chunk(data, shape))
        chunk = encode_chunk(k, v)
        no_tail = lambda kv: replace(kv, k_tail=kv.k_tail[:, :, :0], v_tail=kv.v_tail[:, :, :0])
        torch.manual_seed(0)
        q = torch.randn(1, shape.q_heads, shape.head_dim, device="cuda", dtype=torch.float16)
        for tw in (2, 4):
            err = rel_err(attn_gluon(q, chunk, tw, resident), decode_attention_reference(q, no_tail(chunk)))
            print(f"check {shape.name} tw{tw}: rel err {err:.1e}", flush=True)
            if not err < 1e-2:
                raise SystemExit("gluon attention disagrees with the reference")
        for batch in (1, 8):
            kv = build_cache(chunk, batch, 32768)
            sets = rotation(kv)
            q = torch.randn(batch, shape.q_heads, shape.head_dim, device="cuda", dtype=torch.float16)
            row = dict(model=shape.name, batch=batch, tokens=32768,
                       triton_us=time_graph(lambda: [decode_attention(q, s) for s in sets], args.reps) * 1e6 / len(sets))
            copies = 32768 // chunk.k.n_tokens
            kd = torch.cat([decode_tensor(chunk.k).half().repeat(batch, 1, copies, 1), kv.k_tail], 2)
            vd = torch.cat([decode_tensor(chunk.v).half().repeat(batch, 1, copies, 1), kv.v_tail], 2)
            dense = [(kd, vd)] + [(kd.clone(), vd.clone()) for _ in range(len(sets) - 1)]
            row["sdpa_us"] = time_graph(lambda: [F.scaled_dot_product_attention(
                q.unsqueeze(2), a, b_, scale=shape.head_dim ** -0.5, enable_gqa=True) for a, b_ in dense],
                args.reps) * 1e6 / len(sets)
            del dense, kd, vd
            for tw, cap in ((2, None), (2, 128), (2, 168), (4, 168)):
                name = f"gluon_tw{tw}_cap{cap}"
                row[name + "_rel_err"] = rel_err(attn_gluon(q, kv, tw, resident, cap=cap),
                                                 decode_attention_reference(q, no_tail(kv))) if batch == 1 else None
                row[name + "_kernel_us"] = time_graph(
                    lambda: [attn_gluon(q, s, tw, resident, merge=False, cap=cap) for s in sets], args.reps) * 1e6 / len(sets)
                row[name + "_merged_us"] = time_graph(
                    lambda: [attn_gluon(q, s, tw, resident, cap=cap) for s in sets], args.reps) * 1e6 / len(sets)
            rows.append(row)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
