"""Prototype check and timing: the Gluon V product (pv_gluon.py) against pv_reference and
the current Triton pv, on bench_attention.py's real-KV caches, T = 32K (+ 32 tail tokens
not used by the products). GPU only (Gluon has no interpreter).

    PYTHONPATH=src python3 docs/notes/gluon/run_pv.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[2] / "benchmarks"))
from bench_attention import (  # noqa: E402
    L2_DEFEAT_BYTES, SHAPES, TAIL_TOKENS, build_cache, clone_cache, real_chunk, rel_err, time_graph,
)
from pv_gluon import _pv_gluon, _pv_gluon_pipe, layouts  # noqa: E402

from packkv import PackKVConfig, compress_kv  # noqa: E402
from packkv.kernels import _common, pv, pv_reference  # noqa: E402
from packkv.kernels.planes import packed_args  # noqa: E402


def pv_gluon(p, v, tw: int, pps: int | None, resident: dict, pipe: bool = False):
    batch, q_heads, _ = p.shape
    group = q_heads // v.heads
    d = v.head_dim
    nw = d // 32
    assert v.grouping == "token" and v.pack_size == 32 and v.min_bits == 4 and v.width_bound <= 4
    n_words = v.n_tokens // 32
    mma, wq, meta, wb = layouts(d, nw, tw)
    key = (d, tw, pipe)
    per_sm = pps or resident.get(key, 4)
    per_split, n_split = _common.tile_splits(batch * v.heads, n_words, tw, p.device, None, per_sm)
    part = torch.empty(batch, q_heads, n_split, d, dtype=torch.float32, device=p.device)
    compiled = (_pv_gluon_pipe if pipe else _pv_gluon)[(batch * v.heads, n_split)](
        p, part, *packed_args(v), *p.stride(), *part.stride()[:3], v.heads, n_words, per_split,
        GROUP=group, D=d, BLOCK=v.block_size, TW=tw, NPLANES=max(1, v.width_bound),
        MMA=mma, WQ=wq, META=meta, WB=wb, num_warps=nw)
    if key not in resident:
        resident[key] = _common.resident_programs(compiled, torch.cuda.get_device_properties(p.device))
        print(f"  compiled d{d} tw{tw} pipe {pipe}: {compiled.n_regs} registers, {resident[key]} programs an SM", flush=True)
    return part.sum(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=".kvdata/smollm2_kv.pt")
    parser.add_argument("--json")
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    data = torch.load(args.data)
    config = PackKVConfig()
    rows, resident = [], {}
    for shape in SHAPES:
        k, v = (t.cuda() for t in real_chunk(data, shape))
        chunk = compress_kv(torch.cat([k, k[:, :, :TAIL_TOKENS]], 2), torch.cat([v, v[:, :, :TAIL_TOKENS]], 2), config)
        # correctness on the chunk itself (2048 + 32 tokens: the tail is the products' last word)
        for tw, pipe in ((2, False), (4, False), (2, True), (4, True)):
            for pps in (None,):
                torch.manual_seed(0)
                p = torch.softmax(torch.randn(1, shape.q_heads, chunk.v.n_tokens, device="cuda") * 3, -1)
                err_g = rel_err(pv_gluon(p.half(), chunk.v, tw, pps, resident, pipe), pv_reference(p.half(), chunk.v))
                err_t = rel_err(pv(p.half(), chunk.v), pv_reference(p.half(), chunk.v))
                print(f"check {shape.name} tw{tw} pipe {pipe}: rel err gluon {err_g:.1e}, triton {err_t:.1e}", flush=True)
                if not err_g < 2**-9:
                    raise SystemExit("gluon pv disagrees with the reference")
        for batch in (1, 8):
            kv = build_cache(chunk, batch, 32768)
            sets = [kv] + [clone_cache(kv) for _ in range(max(1, min(16, math.ceil(L2_DEFEAT_BYTES / kv.nbytes))) - 1)]
            p = torch.softmax(torch.randn(batch, shape.q_heads, 32768, device="cuda"), -1).half()
            big = rel_err(pv_gluon(p, kv.v, 2, None, resident), pv_reference(p, kv.v))
            vd = torch.randn(batch, shape.kv_heads, 32768, shape.head_dim, device="cuda", dtype=torch.float16)
            pg = p.view(batch, shape.kv_heads, shape.q_heads // shape.kv_heads, -1)
            t_cublas = time_graph(lambda: torch.matmul(pg, vd), args.reps) * 1e6
            t_triton = time_graph(lambda: [pv(p, s.v) for s in sets], args.reps) * 1e6 / len(sets)
            row = dict(model=shape.name, batch=batch, tokens=32768, rel_err_32k=big, triton_us=t_triton, cublas_us=t_cublas)
            for tw, pipe in ((2, False), (4, False), (2, True), (4, True)):
                for mult in (1, 2):
                    pv_gluon(p, sets[0].v, tw, None, resident, pipe)
                    pps = resident[(shape.head_dim, tw, pipe)] * mult
                    t = time_graph(lambda: [pv_gluon(p, s.v, tw, pps, resident, pipe) for s in sets], args.reps) * 1e6 / len(sets)
                    row[f"gluon{'_pipe' if pipe else ''}_tw{tw}_x{mult}_us"] = t
            rows.append(row)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
