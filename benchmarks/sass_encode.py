"""What the store stage's encoder kernel compiles to on an H100, without a GPU.

Question: for the fused encoder (``_encode_kernel``, a program per block of one head) at
the default settings, how many registers does a thread take, does anything spill, and how
many SASS instructions does a program issue? With the instruction count the throughput of
a prefill (thousands of programs) can be judged offline: an H100 issues at most 4 warp
instructions a cycle per multiprocessor, 132 multiprocessors.

Compiles with ``triton.compile`` for ``sm_90`` as the launcher specializes a call (pointers
16-byte aligned, the token strides multiples of 16; the other strides and counts are not
specialized), with the wrapper's launch options. Counts the main body (up to the last
EXIT: the warp-divergent fallbacks ptxas appends after it never run here) and its loops;
the bit-plane loop runs once per bit of the widest channel (about 5 for K and 3 for V at
the default rel, both sides in one loop).

    PYTHONPATH=src python3 benchmarks/sass_encode.py [--dump /tmp/sass]
"""

from __future__ import annotations

import argparse
import re

from sass_report import compile_sass

from packkv import PackKVConfig
from packkv.codec.quantize import level_bits
from packkv.kernels.encode import _encode_kernel, launch_options

TYPES = {"k_ptr": "*fp16", "v_ptr": "*fp16", "perm_ptr": "*i64", "counts_ptr": "*i64", "scratch_ptr": "*i64",
         "ints_ptr": "*u8", "k_rel": "fp32", "v_rel": "fp32",
         **{f"{s}{name}_ptr": t for s in "kv" for name, t in (("w", "*i32"), ("o", "*i32"), ("wd", "*u8"),
                                                               ("mn", "*u8"), ("s", "*fp16"), ("z", "*fp16"))}}
DIVISIBLE = {"sk_t", "sv_t"}  # head_dim at run time


def body(sass: str) -> tuple[int, list[int], dict]:
    """Instructions of the main body, of each outermost loop in it, and load/store-local counts."""
    ins = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;", sass)]
    end = max(a for a, t in ins if t.strip().endswith("EXIT"))
    loops = []
    for addr, text in ins:
        m = re.search(r"BRA (0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr <= end:
            loops.append((int(m.group(1), 16), addr))
    outer = [(lo, hi) for lo, hi in loops if not any((a, b) != (lo, hi) and a <= lo and hi <= b for a, b in loops)]
    local = {op: sum(1 for a, t in ins if a <= end and op in t.split()[0 if not t.startswith("@") else 1])
             for op in ("LDL", "STL")}
    return end // 16 + 1, sorted({(hi - lo) // 16 + 1 for lo, hi in outer}), local


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dump", help="write each variant's TTGIR, PTX and SASS here")
    args = parser.parse_args()
    import triton

    print(f"Triton {triton.__version__}, sm_90, PackKVConfig() but the repacking named (block 64, pack 32, min_bits 4)")
    print("| repack | head_dim | warps | registers | stack | LDL/STL | main body | loops (a pass each) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for repack in ("median", "none"):
        config = PackKVConfig(repack=repack)
        for d in (128, 64):
            consts = dict(S=config.block_size, D=d, P=config.pack_size, WPP=config.pack_size // 32,
                          MIN_BITS=config.min_bits, K_BITS=level_bits(config.k_rel), V_BITS=level_bits(config.v_rel),
                          K_TOKEN=config.k_grouping == "token", V_TOKEN=config.v_grouping == "token",
                          MEDIAN=repack == "median", COMPILED=True)
            fn = _encode_kernel
            sig = {name: "constexpr" if name in consts else TYPES.get(name, "i32") for name in fn.arg_names}
            attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                     if sig[name].startswith("*") or name in DIVISIBLE}
            options = launch_options(d, config.block_size)
            res, sass = compile_sass(f"encode_{repack}_d{d}", fn, sig, consts, options, args.dump, attrs)
            n, loops, local = body(sass)
            print(f"| {repack} | {d} | {options['num_warps']} | {res.get('REG')} | {res.get('STACK')} | "
                  f"{local['LDL']}/{local['STL']} | {n} | {', '.join(map(str, loops))} |")


if __name__ == "__main__":
    main()
