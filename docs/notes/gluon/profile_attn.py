"""Run the decode attention a few times on one case, for a profiler (Nsight Compute) to
catch: the same cache as run_attn.py (real KV tiled to ``--tokens``, the 32-token fp16
tail). GPU only. For example::

    ncu --clock-control none --kernel-name regex:_attention_kernel --launch-skip 2 --launch-count 1 \\
        --section WarpStateStats --section SourceCounters -o attn \\
        python3 docs/notes/gluon/profile_attn.py --shape Llama-3.1-8B --batch 8

``--variant`` runs a module with attention_gluon's interface in its place (run_attn.py).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from bench_attention import SHAPES, build_cache, encode_chunk, real_chunk  # noqa: E402

from packkv.kernels import decode_attention  # noqa: E402

module = importlib.import_module("packkv.kernels.decode_attention")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=".kvdata/smollm2_kv.pt")
    parser.add_argument("--shape", default=SHAPES[0].name, choices=[s.name for s in SHAPES])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--variant", default="")
    args = parser.parse_args()
    if args.variant:
        module._gluon = importlib.import_module(f"packkv.kernels.{args.variant}")
    shape = next(s for s in SHAPES if s.name == args.shape)
    k, v = (t.cuda() for t in real_chunk(torch.load(args.data), shape))
    kv = build_cache(encode_chunk(k, v), args.batch, args.tokens)
    q = torch.randn(args.batch, shape.q_heads, shape.head_dim, device="cuda", dtype=torch.float16)
    for _ in range(args.runs):
        decode_attention(q, kv)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
