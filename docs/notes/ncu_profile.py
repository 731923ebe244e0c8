"""Where the decode kernels spend their time: one launch of each under Nsight Compute.

Builds bench_attention.py's real-KV caches (Llama-3.1-8B shapes, T = 32K, batch 1 and 8),
compiles and warms up the K product, V product and fused attention, then runs each once
between cudaProfilerStart/Stop, so that ncu started with ``--profile-from-start off`` sees
exactly those launches (plus the fp16 baselines, SDPA and cuBLAS, for comparison).

    ncu --clock-control none --profile-from-start off --set full --import-source yes \\
        -o prof python3 docs/notes/ncu_profile.py
    ncu --import prof.ncu-rep --page raw --csv > raw.csv
    python3 docs/notes/ncu_profile.py --summarize raw.csv

Without ncu it only runs the launches (a smoke check of the setup). ``--summarize`` prints,
per profiled kernel, its time, throughputs, occupancy, issue rate and the warp stall
reasons (cycles a warp spends stalled per instruction issued, largest first).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_attention import SHAPES, build_cache, encode_chunk, real_chunk  # noqa: E402

from packkv.codec import decode_tensor  # noqa: E402
from packkv.kernels import decode_attention, pv, qk  # noqa: E402


SUMMARY = {
    "gpu__time_duration.sum": "time",
    "dram__bytes_read.sum.per_second": "DRAM read rate",
    "dram__bytes_read.sum": "DRAM read",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "SM % peak",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "occupancy %",
    "launch__registers_per_thread": "registers",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue active %",
    "smsp__inst_executed.sum": "warp instructions",
    "smsp__average_warp_latency_per_inst_issued.ratio": "cycles a warp per issue",
}
STALL = "smsp__average_warps_issue_stalled_"


def summarize(path: str) -> None:
    """Print the key metrics and stall reasons of every kernel in ncu's ``--page raw --csv``."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, units, data = rows[0], rows[1], rows[2:]
    col = {name: i for i, name in enumerate(header)}
    for row in data:
        print(f"\n== {row[col['Kernel Name']][:60]}  grid {row[col['Grid Size']]} block {row[col['Block Size']]}")
        for metric, label in SUMMARY.items():
            if metric in col:
                print(f"  {label:<24} {row[col[metric]]:>14} {units[col[metric]]}")
        stalls = []
        for name, i in col.items():
            if name.startswith(STALL) and name.endswith("_per_issue_active.ratio") and "not_issued" not in name:
                try:
                    stalls.append((float(row[i].replace(",", "")), name[len(STALL):-len("_per_issue_active.ratio")]))
                except ValueError:
                    pass
        stalls.sort(reverse=True)
        print("  stalls (warp cycles per issued instruction): "
              + ", ".join(f"{reason} {value:.2f}" for value, reason in stalls[:8]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--summarize", metavar="RAW_CSV", help="print the summary of an ncu raw CSV and stop")
    parser.add_argument("--data", default=".kvdata/smollm2_kv.pt")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()
    if args.summarize:
        return summarize(args.summarize)
    data = torch.load(args.data)
    shape = SHAPES[0]
    k, v = (t.cuda() for t in real_chunk(data, shape))
    chunk = encode_chunk(k, v)
    group = shape.q_heads // shape.kv_heads
    launches = []
    for batch in map(int, args.batches.split(",")):
        kv = build_cache(chunk, batch, args.tokens)
        q = torch.randn(batch, shape.q_heads, shape.head_dim, device="cuda", dtype=torch.float16)
        p = torch.softmax(torch.randn(batch, shape.q_heads, args.tokens, device="cuda"), -1).half()
        copies = args.tokens // chunk.k.n_tokens
        kd = torch.cat([decode_tensor(chunk.k).half().repeat(batch, 1, copies, 1), kv.k_tail], 2)
        vd = torch.cat([decode_tensor(chunk.v).half().repeat(batch, 1, copies, 1), kv.v_tail], 2)
        qg = q.view(batch, shape.kv_heads, group, -1)
        pg = p.view(batch, shape.kv_heads, group, -1)
        launches += [
            (f"b{batch} K product", lambda kv=kv, q=q: qk(q, kv.k)),
            (f"b{batch} V product", lambda kv=kv, p=p: pv(p, kv.v)),
            (f"b{batch} attention", lambda kv=kv, q=q: decode_attention(q, kv)),
            (f"b{batch} cuBLAS K", lambda qg=qg, kd=kd: torch.matmul(qg, kd[:, :, :args.tokens].transpose(-1, -2))),
            (f"b{batch} cuBLAS V", lambda pg=pg, vd=vd: torch.matmul(pg, vd[:, :, :args.tokens])),
            (f"b{batch} SDPA", lambda q=q, kd=kd, vd=vd: F.scaled_dot_product_attention(
                q.unsqueeze(2), kd, vd, scale=shape.head_dim ** -0.5, enable_gqa=True)),
        ]
    for _, fn in launches:  # compile and warm up outside the profiled range
        fn(), fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, fn in launches:
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled, in order:", ", ".join(name for name, _ in launches))


if __name__ == "__main__":
    main()
