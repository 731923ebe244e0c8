"""A/B timing of variants of the Gluon decode attention (kernels/attention_gluon.py) through
decode_attention, against the Triton kernel and SDPA, T = 32K (or --tokens) with the 32-token fp16 tail,
in one run. A variant is a module with attention_gluon's interface (a copy of it with one
change, written next to it in src/packkv/kernels/); GPU only.

    PYTHONPATH=src python3 docs/notes/gluon/run_attn.py [--variants _exp_a,_exp_b] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from bench_attention import SHAPES, build_cache, encode_chunk, real_chunk, rel_err, rotation, time_graph  # noqa: E402
from rows import report, save, variant_modules  # noqa: E402

from packkv.codec import decode_tensor  # noqa: E402
from packkv.kernels import _common, decode_attention, decode_attention_reference  # noqa: E402

module = importlib.import_module("packkv.kernels.decode_attention")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=".kvdata/smollm2_kv.pt")
    parser.add_argument("--variants", default="", help="comma-separated module names in packkv.kernels")
    parser.add_argument("--programs", default="", help="comma-separated programs per SM to sweep (folded and not)")
    parser.add_argument("--tile-words", default="", help="comma-separated tile words to sweep (folded)")
    parser.add_argument("--json")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=32768, help="packed tokens of the cache (a multiple of 32)")
    args = parser.parse_args()
    library = module._gluon
    variants = {"gluon": library} | variant_modules(args.variants)
    data = torch.load(args.data)
    rows = []
    for shape in SHAPES:
        k, v = (t.cuda() for t in real_chunk(data, shape))
        chunk = encode_chunk(k, v)
        for batch in (1, 8):
            kv = build_cache(chunk, batch, args.tokens)
            sets = rotation(kv)
            q = torch.randn(batch, shape.q_heads, shape.head_dim, device="cuda", dtype=torch.float16)
            ref = decode_attention_reference(q, kv)
            row = dict(model=shape.name, batch=batch, tokens=args.tokens)

            def attention_us() -> float:
                """µs a call of decode_attention under the settings as they stand, each set in turn."""
                return time_graph(lambda: [decode_attention(q, s) for s in sets], args.reps) * 1e6 / len(sets)

            for name, variant in variants.items():
                module._gluon = variant
                row[name + "_rel_err"] = rel_err(decode_attention(q, kv), ref)
                row[name + "_us"] = attention_us()
            module._gluon = library
            for pps in [None] + [int(x) for x in filter(None, args.programs.split(","))]:
                _common.PROGRAMS_PER_SM = pps
                tag = "" if pps is None else f"_pps{pps}"
                for folded in (True, False):  # False: decode_attention's separate combining kernel
                    module.FOLDED_COMBINE = folded
                    name = "gluon" + tag + ("" if folded else "_unfolded")
                    if pps is not None or not folded:
                        row[name + "_rel_err"] = rel_err(decode_attention(q, kv), ref)
                        row[name + "_us"] = attention_us()
            _common.PROGRAMS_PER_SM = None
            module.FOLDED_COMBINE = True
            for tw in [int(x) for x in filter(None, args.tile_words.split(","))]:
                _common.TILE_WORDS = tw
                try:
                    row[f"gluon_tw{tw}_rel_err"] = rel_err(decode_attention(q, kv), ref)
                    row[f"gluon_tw{tw}_us"] = attention_us()
                except Exception as error:  # noqa: BLE001 (a setting the kernel cannot take: noted in the row)
                    row[f"gluon_tw{tw}_error"] = str(error).splitlines()[0][:200]
            _common.TILE_WORDS = None
            _common.GLUON = False
            row["triton_us"] = attention_us()
            _common.GLUON = True
            copies = args.tokens // chunk.k.n_tokens
            kd = torch.cat([decode_tensor(chunk.k).half().repeat(batch, 1, copies, 1), kv.k_tail], 2)
            vd = torch.cat([decode_tensor(chunk.v).half().repeat(batch, 1, copies, 1), kv.v_tail], 2)
            dense = [(kd, vd)] + [(kd.clone(), vd.clone()) for _ in range(len(sets) - 1)]
            row["sdpa_us"] = time_graph(lambda: [F.scaled_dot_product_attention(
                q.unsqueeze(2), a, b_, scale=shape.head_dim ** -0.5, enable_gqa=True) for a, b_ in dense],
                args.reps) * 1e6 / len(sets)
            report(rows, row)
    save(args.json, rows)


if __name__ == "__main__":
    main()
