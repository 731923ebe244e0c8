"""How many splits the decode kernel should cut a (batch, KV head)'s packed sequence into.

Times the fused decode attention (splits merged in the kernel) at explicit split counts on
the real-KV caches of bench_attention.py: for k = 1, 2, 3, 4, 6, "k waves", the splits
that make the programs exactly fill k times the programs the GPU holds at once (from the
compiled kernel's registers a thread), and the heuristic's own count. One CUDA graph of a
rotation of cache copies per setting (more than the L2 holds), median of replays.

    PYTHONPATH=src python3 docs/notes/splits_sweep.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_attention import (  # noqa: E402
    SHAPES, TAIL_TOKENS, build_cache, encode_chunk, real_chunk, rotation, time_graph,
)

from packkv import PackKVConfig  # noqa: E402
from packkv.kernels.decode_attention import DecodePlan  # noqa: E402


def resident_programs(plan: DecodePlan, device: torch.device) -> tuple[int, int, int]:
    """Programs of the plan's compiled kernel one multiprocessor holds at once (registers
    bound them here), its registers a thread and warps a program."""
    compiled = plan._launch.compiled
    warps = compiled.metadata.num_warps
    props = torch.cuda.get_device_properties(device)
    regs_sm = getattr(props, "regs_per_multiprocessor", 65536)
    per_program = compiled.n_regs * 32 * warps
    return max(1, min(regs_sm // per_program, 64 // warps)), compiled.n_regs, warps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=".kvdata/smollm2_kv.pt")
    parser.add_argument("--tokens", default="32768,131072")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device("cuda")
    data = torch.load(args.data)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    config, rows = PackKVConfig(), []
    print(f"{torch.cuda.get_device_name(device)}, {sms} SMs")
    for shape in SHAPES:
        k, v = (t.to(device) for t in real_chunk(data, shape))
        chunk = encode_chunk(k, v, config)
        for batch in (1, 8):
            for tokens in map(int, args.tokens.split(",")):
                kv = build_cache(chunk, batch, tokens)
                sets = rotation(kv)
                q = torch.randn(batch, shape.q_heads, shape.head_dim, device=device, dtype=torch.float16)
                scale = shape.head_dim ** -0.5

                def plans(splits):
                    return [DecodePlan(q, s.k, s.v, s.k_tail, s.v_tail, scale, None, splits) for s in sets]

                default = plans(None)
                default[0].run(q, TAIL_TOKENS)
                resident, regs, warps = resident_programs(default[0], device)
                work = batch * shape.kv_heads
                settings = {"heuristic": None}
                for waves in (1, 2, 3, 4, 6):
                    settings[f"{waves} wave(s)"] = max(1, waves * resident * sms // work)
                for name, splits in settings.items():
                    ps = default if splits is None else plans(splits)
                    us = time_graph(lambda: [p.run(q, TAIL_TOKENS) for p in ps], args.reps) * 1e6 / len(ps)
                    n_split = ps[0]._grids[0][1]
                    row = dict(model=shape.name, batch=batch, tokens=tokens, setting=name, requested=splits,
                               grid_splits=n_split, programs=work * n_split, resident_per_sm=resident,
                               regs=regs, warps=warps, us=us)
                    rows.append(row)
                    print(f"{shape.name:<13} b{batch} T {tokens:>6} {name:<11} requested {str(splits):>5} -> "
                          f"{n_split:>4} splits (tail incl.), {work * n_split:>5} programs "
                          f"({resident}/SM resident, {regs} regs x {warps} warps): {us:8.1f} us", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
