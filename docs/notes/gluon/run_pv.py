"""The Gluon V product (packkv/kernels/pv_gluon.py) against the Triton kernel of pv.py, and
its settings: tile words x register cap, on bench_attention.py's real-KV caches, T = 32K.
GPU only (Gluon has no interpreter).

    PYTHONPATH=src python3 docs/notes/gluon/run_pv.py [--variants _exp_a,_exp_b] [--json out.json]

A variant is a module with pv_gluon's interface (a copy of it with one change, written next
to it in src/packkv/kernels/), timed at its own settings.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from bench_attention import (  # noqa: E402
    SHAPES, build_cache, encode_chunk, real_chunk, rel_err, rotation, time_graph,
)
from rows import report, save, variant_modules  # noqa: E402

from packkv.kernels import _common, pv, pv_gluon, pv_reference  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=".kvdata/smollm2_kv.pt")
    parser.add_argument("--variants", default="", help="comma-separated module names in packkv.kernels")
    parser.add_argument("--json")
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    module = importlib.import_module("packkv.kernels.pv")
    variants = variant_modules(args.variants)
    data = torch.load(args.data)
    rows = []
    defaults = dict(pv_gluon.SETTINGS)
    for shape in SHAPES:
        k, v = (t.cuda() for t in real_chunk(data, shape))
        chunk = encode_chunk(k, v)
        for batch in (1, 8):
            kv = build_cache(chunk, batch, 32768)
            sets = rotation(kv)
            p = torch.softmax(torch.randn(batch, shape.q_heads, 32768, device="cuda"), -1).half()
            _common.GLUON = False
            row = dict(model=shape.name, batch=batch, tokens=32768,
                       triton_us=time_graph(lambda: [pv(p, s.v) for s in sets], args.reps) * 1e6 / len(sets))
            _common.GLUON = True
            for tw in (2, 4):
                for cap in (None, 128):
                    pv_gluon.SETTINGS[shape.head_dim] = (tw, cap)
                    err = rel_err(pv(p, kv.v), pv_reference(p, kv.v))
                    us = time_graph(lambda: [pv(p, s.v) for s in sets], args.reps) * 1e6 / len(sets)
                    row[f"gluon_tw{tw}_cap{cap}_us"] = us
                    row[f"gluon_tw{tw}_cap{cap}_err"] = err
            pv_gluon.SETTINGS.update(defaults)
            for name, variant in variants.items():
                module._gluon = variant
                row[f"{name}_err"] = rel_err(pv(p, kv.v), pv_reference(p, kv.v))
                row[f"{name}_us"] = time_graph(lambda: [pv(p, s.v) for s in sets], args.reps) * 1e6 / len(sets)
            module._gluon = pv_gluon
            report(rows, row)
    save(args.json, rows)


if __name__ == "__main__":
    main()
