"""What the decode kernels compile to on an H100, without a GPU.

Question: for each decode kernel at the default settings, how many registers does a thread
take, does anything spill, and how many SASS instructions does one step of the main loop
issue per unpacked value? (The loop is the longest backward branch of the kernel.)

Compiles with ``triton.compile`` for ``sm_90`` (Triton's own ptxas and cuobjdump), so it
runs on any machine with Triton; run it with the Triton version of the GPU machine to see
what that machine will run:

    PYTHONPATH=src python3 benchmarks/sass_report.py
    PYTHONPATH=src python3 benchmarks/sass_report.py --tile-words 2 --dump /tmp/sass
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from packkv.kernels import _common
from packkv.kernels.decode_attention import _decode_kernel
from packkv.kernels.pv import _pv_kernel
from packkv.kernels.qk import _qk_kernel

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_PACKED = {"w": "*i32", "o": "*i32", "wd": "*u8", "mn": "*u8", "s": "*fp16", "z": "*fp16"}
POINTERS = {
    "q_ptr": "*fp16", "p_ptr": "*fp16", "out_ptr": "*fp32", "part_ptr": "*fp32", "m_part": "*fp32", "l_part": "*fp32",
    "acc_part": "*fp32", "kt_ptr": "*fp16", "vt_ptr": "*fp16", "mask_ptr": "*u8",
    "words_ptr": "*i32", "offsets_ptr": "*i32", "widths_ptr": "*u8", "mins_ptr": "*u8", "scale_ptr": "*fp16",
    "zero_ptr": "*fp16", **{f"{side}{k}_ptr": t for side in "kv" for k, t in _PACKED.items()},
}
# Innermost strides, 1 at run time, which Triton specializes on.
UNIT_STRIDES = {"s_word", "s_wc", "s_mc", "s_sx", "s_zx", "s_qd", "s_outt", "s_pt", "s_ktd", "s_vtd", "s_mkt",
                *(f"{side}{s}" for side in "kv" for s in ("s_word", "s_wc", "s_mc", "s_sx", "s_zx"))}


def signature(fn, constexprs: dict) -> tuple[dict, dict]:
    """Argument types of a kernel: pointers by name, unit strides as constants, the rest i32."""
    sig, consts = {}, dict(constexprs)
    for name in fn.arg_names:
        if name in constexprs or name in UNIT_STRIDES:
            sig[name] = "constexpr"
            consts.setdefault(name, 1)
        else:
            sig[name] = POINTERS.get(name, "fp32" if name == "qk_scale" else "i32")
    return sig, consts


def loop_mix(sass: str) -> tuple[int, collections.Counter]:
    """Instructions of the longest loop of a SASS listing, and their opcodes."""
    ins = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;", sass)]
    lo = hi = 0
    for addr, text in ins:
        m = re.search(r"BRA (0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr and addr - int(m.group(1), 16) > hi - lo:
            lo, hi = int(m.group(1), 16), addr
    ops = collections.Counter()
    for addr, text in ins:
        if lo <= addr <= hi:
            op = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]
            ops[op.split(".")[0] + (".MOV" if op.startswith("IMAD.MOV") else "")] += 1
    return (hi - lo) // 16 + 1, ops


def compile_sass(name: str, fn, sig: dict, consts: dict, options: dict, dump: str | None,
                 attrs: dict | None = None) -> tuple[dict, str]:
    """Compile ``fn`` for sm_90: its resource usage (REG, STACK, SHARED, LOCAL) and SASS;
    ``dump``: a folder for its TTGIR, PTX and SASS."""
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([f"{BIN}/cuobjdump", "-res-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([f"{BIN}/cuobjdump", "-sass", cubin], capture_output=True, text=True).stdout
    if dump:
        os.makedirs(dump, exist_ok=True)
        for ext in ("ttgir", "ptx"):
            with open(os.path.join(dump, f"{name}.{ext}"), "w") as f:
                f.write(kernel.asm[ext])
        with open(os.path.join(dump, f"{name}.sass"), "w") as f:
            f.write(sass)
    return dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)), sass


def report(name: str, fn, constexprs: dict, options: dict, values_per_step: int, dump: str | None) -> None:
    sig, consts = signature(fn, constexprs)
    res, sass = compile_sass(name, fn, sig, consts, options, dump)
    num_warps = options["num_warps"]
    body, ops = loop_mix(sass)
    per_thread = values_per_step / (32 * num_warps)
    print(f"| {name} | {res.get('REG')} | {res.get('STACK')} | {res.get('LOCAL')} | {body} | {body / per_thread:.2f} | "
          + ", ".join(f"{k} {v}" for k, v in ops.most_common(8)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tile-words", type=int, default=None, help="override the kernels' tile words")
    parser.add_argument("--dump", help="write each kernel's TTGIR, PTX and SASS here")
    args = parser.parse_args()
    print(f"Triton {triton.__version__}, sm_90, default PackKVConfig (token grouping, pack 32, block 64, min_bits 4)")
    print("| kernel | registers | stack | local | loop instructions | per value (a thread) | loop mix |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for d, group in ((128, 4), (64, 3)):
        _common.TILE_WORDS = args.tile_words
        for kernel, fn, extra, sides in (
            ("qk", _qk_kernel, {"TOKEN_GROUPED": True, "WIDE": False}, 1),
            ("pv", _pv_kernel, {"TOKEN_GROUPED": True, "WIDE": False}, 1),
            ("attention", _decode_kernel, {"K_TOKEN_GROUPED": True, "V_TOKEN_GROUPED": True, "HAS_MASK": False,
                                           "K_WIDE": False, "V_WIDE": False}, 2),
        ):
            settings = _common.launch_settings(kernel, d, 64, False)
            tw = settings["tile_words"]
            constexprs = dict(GROUP=group, D=d, PACK=32, BLOCK=64, MIN_BITS=4, TW=tw, ASM=True, **extra)
            report(f"{kernel} d{d} tw{tw}", fn, constexprs, settings["options"], sides * tw * 32 * d, args.dump)


if __name__ == "__main__":
    main()
