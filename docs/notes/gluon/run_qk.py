"""Check and timing of the Gluon K product (packkv/kernels/qk_gluon.py) at tiles of 2 and 4
words and one or two waves of programs, against qk_reference and qk.py's Triton kernel, on
bench_attention.py's real-KV caches, T = 32K. GPU only. (The prototype it first timed is at
commit 25bd50c, docs/notes/gluon/qk_gluon.py.)

    PYTHONPATH=src python3 docs/notes/gluon/run_qk.py [--variants _exp_a,_exp_b] [--json out.json]

A variant is a module with qk_gluon's interface (a copy of it with one change, written next
to it in src/packkv/kernels/), timed through qk() at its own settings.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[2] / "benchmarks"))
from bench_attention import (  # noqa: E402
    SHAPES, build_cache, encode_chunk, real_chunk, rel_err, rotation, time_graph,
)
from rows import report, save, variant_modules  # noqa: E402

from packkv.kernels import _common, pv_gluon, qk, qk_reference  # noqa: E402
from packkv.kernels.qk_gluon import _qk_gluon_kernel as _qk_gluon  # noqa: E402
from packkv.kernels.planes import packed_args  # noqa: E402


def qk_gluon(q, k, tw: int, pps: int | None, resident: dict):
    batch, q_heads, d = q.shape
    group = q_heads // k.heads
    nw = d // 32
    assert k.grouping == "token" and k.pack_size == 32 and k.min_bits == 4 and k.width_bound <= 8
    n_words = k.n_tokens // 32
    mma, wq, meta, _ = pv_gluon.layouts(d, tw, d // 32)
    key = (d, tw)
    per_split, n_split = _common.tile_splits(batch * k.heads, n_words, tw, q.device, None, pps or resident.get(key, 4))
    out = torch.empty(batch, q_heads, k.n_tokens, dtype=torch.float32, device=q.device)
    compiled = _qk_gluon[(batch * k.heads, n_split)](
        q, out, *packed_args(k), *q.stride(), *out.stride(), k.heads, n_words, per_split,
        GROUP=group, D=d, BLOCK=k.block_size, TW=tw, NPLANES=max(1, k.width_bound), FLAT=pv_gluon.flat_steps(k),
        MMA=mma, WQ=wq, META=meta, num_warps=nw)
    if key not in resident:
        resident[key] = _common.resident_programs(compiled, torch.cuda.get_device_properties(q.device))
        print(f"  compiled d{d} tw{tw}: {compiled.n_regs} registers, {resident[key]} programs an SM", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=".kvdata/smollm2_kv.pt")
    parser.add_argument("--variants", default="", help="comma-separated module names in packkv.kernels")
    parser.add_argument("--json")
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    module = importlib.import_module("packkv.kernels.qk")
    library = module._gluon
    variants = variant_modules(args.variants)
    data = torch.load(args.data)
    rows, resident = [], {}
    for shape in SHAPES:
        k, v = (t.cuda() for t in real_chunk(data, shape))
        chunk = encode_chunk(k, v)
        torch.manual_seed(0)
        q = torch.randn(1, shape.q_heads, shape.head_dim, device="cuda", dtype=torch.float16)
        for tw in (2, 4):
            err = rel_err(qk_gluon(q, chunk.k, tw, None, resident), qk_reference(q, chunk.k))
            print(f"check {shape.name} tw{tw}: rel err gluon {err:.1e} (K width bound {chunk.k.width_bound})", flush=True)
            if not err < 1e-5:
                raise SystemExit("gluon qk disagrees with the reference")
        for batch in (1, 8):
            kv = build_cache(chunk, batch, 32768)
            sets = rotation(kv)
            q = torch.randn(batch, shape.q_heads, shape.head_dim, device="cuda", dtype=torch.float16)
            _common.GLUON = False
            row = dict(model=shape.name, batch=batch, tokens=32768,
                       rel_err_32k=rel_err(qk_gluon(q, kv.k, 2, None, resident), qk_reference(q, kv.k)),
                       triton_us=time_graph(lambda: [qk(q, s.k) for s in sets], args.reps) * 1e6 / len(sets))
            _common.GLUON = True
            row["library_us"] = time_graph(lambda: [qk(q, s.k) for s in sets], args.reps) * 1e6 / len(sets)
            for name, variant in variants.items():  # through qk(), at the variant's settings
                module._gluon = variant
                row[f"{name}_err"] = rel_err(qk(q, kv.k), qk_reference(q, kv.k))
                row[f"{name}_us"] = time_graph(lambda: [qk(q, s.k) for s in sets], args.reps) * 1e6 / len(sets)
            module._gluon = library
            for tw in (2, 4):
                qk_gluon(q, sets[0].k, tw, None, resident)
                for mult in (1, 2):
                    pps = resident[(shape.head_dim, tw)] * mult
                    row[f"gluon_tw{tw}_x{mult}_us"] = time_graph(
                        lambda: [qk_gluon(q, s.k, tw, pps, resident) for s in sets], args.reps) * 1e6 / len(sets)
            report(rows, row)
    save(args.json, rows)


if __name__ == "__main__":
    main()
