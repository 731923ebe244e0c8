"""Decode-time products over the packed cache vs fp16 baselines, on an NVIDIA GPU.

Question: how fast are the fused Triton kernels (K product, V product, fused decode
attention) against fp16 cuBLAS (torch.matmul) and fp16 SDPA on the same shapes, and how
close do they get to the copy bandwidth on the bytes they actually read?

Data: real K (after RoPE) and V of SmolLM2-135M on Hamlet, captured by
``benchmarks/capture_kv.py`` (2048 tokens, 6 layers, 3 KV heads, head_dim 64). Shapes of
head_dim 128 (Llama-3.1-8B) concatenate the channels of two real heads. One chunk of
2048 real tokens per KV head is encoded on the GPU with the reference codec at the
default PackKVConfig; longer sequences and larger batches replicate its packs (words are
copied, not aliased, so every byte is read from memory). The fp16 baselines use the
decoded values of the same cache. Timing: CUDA graphs of several input sets in rotation
(more than the L2 cache holds), CUDA events around each replay, median.

    PYTHONPATH=src python3 benchmarks/bench_attention.py --data .kvdata/smollm2_kv.pt --json out.json
    PYTHONPATH=src python3 benchmarks/bench_attention.py --data .kvdata/smollm2_kv.pt --quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import triton

from packkv import PackKVConfig, PackedKV, PackedTensor, compress_kv
from packkv.codec import decode_tensor
from packkv.kernels import _common as kernel_settings
from packkv.kernels import (
    decode_attention, decode_attention_reference, pv, pv_reference, qk, qk_reference,
)

from _cli import ints, optional_ints  # benchmarks/_cli.py

CHUNK_TOKENS = 2048
TAIL_TOKENS = 32  # fp16 tail after the packed blocks, read by the fused kernel and SDPA alike
L2_DEFEAT_BYTES = 256 * 2**20  # rotate input sets until at least this much is touched


@dataclass(frozen=True)
class ModelShape:
    name: str
    kv_heads: int
    q_heads: int
    head_dim: int


SHAPES = (ModelShape("Llama-3.1-8B", 8, 32, 128), ModelShape("SmolLM2-135M", 3, 9, 64))


def real_chunk(data: dict, shape: ModelShape) -> tuple[torch.Tensor, torch.Tensor]:
    """Real K, V ``[1, kv_heads, CHUNK_TOKENS, head_dim]`` fp16 for a model shape.

    head_dim 64: the 3 heads of the 4th captured layer (SmolLM2 layer 15). head_dim 128:
    KV head j joins the channels of real head sequences 2j and 2j+1 (layers x heads).
    """
    k, v = data["k"], data["v"]  # [layers, 3, tokens, 64]
    if shape.head_dim == 64:
        pick = lambda x: x[3, : shape.kv_heads]
    else:
        pick = lambda x: x.reshape(-1, *x.shape[2:])[: 2 * shape.kv_heads].reshape(shape.kv_heads, 2, *x.shape[2:]).permute(0, 2, 1, 3).reshape(shape.kv_heads, x.shape[2], 128)
    return pick(k)[None, :, :CHUNK_TOKENS].contiguous(), pick(v)[None, :, :CHUNK_TOKENS].contiguous()


def tile_packed(p: PackedTensor, batch: int, reps: int) -> PackedTensor:
    """Replicate a batch-1 PackedTensor to ``batch`` and ``reps`` times the packs, words copied."""
    heads = p.heads
    off = p.offsets[0].long()  # [heads, n_packs]; a head's packs are contiguous in words
    bounds = off[:, 0].tolist() + [p.words.numel()]
    segments = [p.words[bounds[h] : bounds[h + 1]] for h in range(heads)]
    words, offsets, start = [], [], 0
    for _ in range(batch):
        row = []
        for h in range(heads):
            seg = segments[h]
            rel = off[h] - off[h, 0]
            row.append(torch.cat([rel + start + r * seg.numel() for r in range(reps)]))
            words.append(seg.repeat(reps))
            start += seg.numel() * reps
        offsets.append(torch.stack(row))
    return replace(
        p,
        words=torch.cat(words),
        offsets=torch.stack(offsets).to(torch.int32),
        widths=p.widths.repeat(batch, 1, reps, 1),
        mins=p.mins.repeat(batch, 1, reps, 1),
        scale=p.scale.repeat(batch, 1, reps, 1),
        zero=p.zero.repeat(batch, 1, reps, 1),
    )


def build_cache(chunk: PackedKV, batch: int, tokens: int) -> PackedKV:
    """A packed layer of ``tokens`` packed tokens plus the fp16 tail, from one encoded chunk."""
    copies = tokens // chunk.k.n_tokens
    tail = lambda t: t[:, :, :TAIL_TOKENS].repeat(batch, 1, 1, 1).contiguous()
    return replace(
        chunk, k=tile_packed(chunk.k, batch, copies), v=tile_packed(chunk.v, batch, copies),
        k_tail=tail(chunk.k_tail), v_tail=tail(chunk.v_tail),
    )


def clone_cache(kv: PackedKV) -> PackedKV:
    copy = lambda p: replace(p, **{n: t.clone() for n, t in p.tensors().items()})
    return replace(kv, k=copy(kv.k), v=copy(kv.v), k_tail=kv.k_tail.clone(), v_tail=kv.v_tail.clone())


def encode_chunk(k: torch.Tensor, v: torch.Tensor, config: PackKVConfig = PackKVConfig()) -> PackedKV:
    """The benchmarks' cache chunk: real K, V ``[1, heads, CHUNK_TOKENS, head_dim]`` (from
    :func:`real_chunk`) encoded, their first TAIL_TOKENS tokens again as the fp16 tail."""
    return compress_kv(torch.cat([k, k[:, :, :TAIL_TOKENS]], 2), torch.cat([v, v[:, :, :TAIL_TOKENS]], 2), config)


def rotation(kv: PackedKV) -> list[PackedKV]:
    """``kv`` and copies of it (16 at most), together more than the L2 holds: timed in turn,
    every read comes from memory."""
    return [kv] + [clone_cache(kv) for _ in range(max(1, min(16, math.ceil(L2_DEFEAT_BYTES / kv.nbytes))) - 1)]


def time_graph(fn, reps: int) -> float:
    """Median seconds of one replay of a CUDA graph of ``fn``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(reps: int) -> float:
    """Bytes read + written per second of a 2 GiB device-to-device copy."""
    src = torch.randn(2**29, device="cuda")
    dst = torch.empty_like(src)
    seconds = time_graph(lambda: dst.copy_(src), reps)
    return 2 * src.numel() * src.element_size() / seconds


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def check_correctness(chunk_kv: dict, log: list) -> None:
    """Kernels vs references on the GPU, over groupings, pack sizes, min_bits and dtypes."""
    torch.manual_seed(0)
    cases = [
        dict(),
        dict(pack_size=64, min_bits=0, k_grouping="token", v_grouping="channel"),
        dict(min_bits=8, k_grouping="token", v_grouping="token", k_rel=0.02, v_rel=0.05),
    ]
    for (name, (k, v)), case in [(n, c) for n in chunk_kv.items() for c in cases]:
        cfg = PackKVConfig(**case)
        kv = compress_kv(k[:, :, :1024 + 40], v[:, :, :1024 + 40], cfg)
        group = {64: 3, 128: 4}[k.shape[-1]]
        for dtype in (torch.float16, torch.bfloat16) if not case else (torch.float16,):
            q = torch.randn(1, k.shape[1] * group, k.shape[-1], device="cuda", dtype=dtype)
            p = torch.softmax(qk_reference(q, kv.k) / 8, -1)
            mask = torch.rand(1, k.shape[1], kv.n_tokens, device="cuda") > 0.2
            errs = (
                rel_err(qk(q, kv.k), qk_reference(q, kv.k)),
                rel_err(pv(p, kv.v), pv_reference(p, kv.v)),
                rel_err(decode_attention(q, kv), decode_attention_reference(q, kv)),
                rel_err(decode_attention(q, kv, mask=mask), decode_attention_reference(q, kv, mask=mask)),
            )
            line = f"check {name} {case or 'default'} {dtype}: rel err qk {errs[0]:.1e} pv {errs[1]:.1e} attn {errs[2]:.1e} masked {errs[3]:.1e}"
            log.append(line)
            print(line, flush=True)
            # The K product is exact fp16 products with fp32 sums; the V product rounds its
            # weights to fp16 (about 2**-12 each); the attention output is rounded to q's dtype.
            if errs[0] > 1e-5 or errs[1] > 2**-10 or max(errs[2:]) > 1e-2:
                raise SystemExit(f"kernel disagrees with the reference: {line}")


def bench_case(shape: ModelShape, chunk: PackedKV, batch: int, tokens: int, copy_bw: float, reps: int,
               unfused: bool = False) -> list[dict]:
    """Rows for one (model, batch, tokens): K product, V product, fused attention (and with
    ``unfused`` the attention as three kernels), vs baselines."""
    group = shape.q_heads // shape.kv_heads
    kv = build_cache(chunk, batch, tokens)
    n_total = kv.n_tokens
    dense_bytes = 2 * batch * shape.kv_heads * n_total * shape.head_dim * 2
    n_sets = max(1, min(16, math.ceil(L2_DEFEAT_BYTES / dense_bytes)))
    copies = tokens // chunk.k.n_tokens
    dense = lambda p, tail: torch.cat([decode_tensor(p).half().repeat(batch, 1, copies, 1), tail], 2)
    k_dense, v_dense = dense(chunk.k, kv.k_tail), dense(chunk.v, kv.v_tail)
    sets = []
    for i in range(n_sets):
        c = kv if i == 0 else clone_cache(kv)
        q = torch.randn(batch, shape.q_heads, shape.head_dim, device="cuda", dtype=torch.float16)
        p = torch.softmax(torch.randn(batch, shape.q_heads, tokens, device="cuda"), -1).half()
        kd, vd = (k_dense, v_dense) if i == 0 else (k_dense.clone(), v_dense.clone())
        sets.append((c, q, p, kd, vd))
    scale = 1 / math.sqrt(shape.head_dim)

    def three_kernels(c, q):
        """Attention as the K product, a softmax over packed + tail scores, the V product
        (and the tail's few tokens in PyTorch): unfused, to compare with the fused kernel."""
        tail_k = c.k_tail.repeat_interleave(group, 1)
        tail_v = c.v_tail.repeat_interleave(group, 1)
        scores = torch.cat([qk(q, c.k), torch.einsum("bhd,bhtd->bht", q.float(), tail_k.float())], -1) * scale
        probs = torch.softmax(scores, -1)
        n = c.k.n_tokens
        return pv(probs[..., :n].half(), c.v) + torch.einsum("bht,bhtd->bhd", probs[..., n:], tail_v.float())

    if tokens <= 4096:  # the references materialize fp32 copies: check at the small size only
        c, q, p, _, _ = sets[0]
        assert rel_err(decode_attention(q, c), decode_attention_reference(q, c)) < 1e-2
        assert rel_err(three_kernels(c, q).to(q.dtype), decode_attention_reference(q, c)) < 1e-2
        assert rel_err(qk(q, c.k), qk_reference(q, c.k)) < 1e-5

    def k_base(s):
        c, q, p, kd, vd = s
        return torch.matmul(q.view(batch, shape.kv_heads, group, -1), kd[:, :, :tokens].transpose(-1, -2))

    def v_base(s):
        c, q, p, kd, vd = s
        return torch.matmul(p.view(batch, shape.kv_heads, group, -1), vd[:, :, :tokens])

    def attn_base(s):
        c, q, p, kd, vd = s
        return F.scaled_dot_product_attention(q.unsqueeze(2), kd, vd, scale=scale, enable_gqa=True)

    ops = [
        ("K product", lambda s: qk(s[1], s[0].k), k_base, kv.k.nbytes, dense_bytes // 2 * tokens // n_total, 2 * batch * shape.q_heads * shape.head_dim),
        ("V product", lambda s: pv(s[2], s[0].v), v_base, kv.v.nbytes, dense_bytes // 2 * tokens // n_total, 2 * batch * shape.q_heads * tokens),
        ("attention", lambda s: decode_attention(s[1], s[0]), attn_base, kv.nbytes, dense_bytes, 2 * batch * shape.q_heads * shape.head_dim),
    ]
    if unfused:  # the scores' fp32 round trip is not counted in the bytes read
        ops.append(("attn, 3 kernels", lambda s: three_kernels(s[0], s[1]), attn_base, kv.nbytes, dense_bytes,
                    2 * batch * shape.q_heads * shape.head_dim))
    rows = []
    for op, packed_fn, base_fn, packed_bytes, fp16_bytes, side_bytes in ops:
        t_packed = time_graph(lambda: [packed_fn(s) for s in sets], reps) / n_sets
        t_base = time_graph(lambda: [base_fn(s) for s in sets], reps) / n_sets
        for impl, t, read in (("packed", t_packed, packed_bytes + side_bytes), ("fp16", t_base, fp16_bytes + side_bytes)):
            rows.append(dict(
                model=shape.name, batch=batch, tokens=n_total, op=op, impl=impl, time_us=t * 1e6,
                fp16_equiv_GBps=(fp16_bytes + side_bytes) / t / 1e9, bytes_read_MB=read / 1e6,
                frac_copy_bw=read / t / copy_bw, speedup_vs_fp16=t_base / t, compression=fp16_bytes / packed_bytes,
                baseline="torch.matmul" if op.endswith("product") else "SDPA enable_gqa",
                input_sets=n_sets,
            ))
    return rows


def resident_counts(head_dim: int) -> dict:
    """Programs a multiprocessor counted on the kernels compiled for ``head_dim`` at the
    current settings (tile words, launch options), by kernel."""
    counts = {}
    for key, resident in kernel_settings._RESIDENT.items():
        kernel, constexprs, options = key[0], dict(key[2]), dict(key[3])
        now = kernel_settings.launch_settings(kernel, head_dim, PackKVConfig().block_size, False)
        if constexprs.get("D") == head_dim and constexprs.get("TW") == now["tile_words"] and options == now["options"]:
            counts[kernel] = resident
    return counts


def sweep_variants(chunks: dict, reps: int, tile_words=(2, 4), programs=(8, 16), caps=(None, 128)) -> list[dict]:
    """Times of the three kernels at T = 32K for tile sizes, programs per multiprocessor and
    register caps (the same setting for all three kernels; every combination of the three
    lists, a cap of None being no cap).

    Shapes: Llama and SmolLM2, batch 1 and 8, each over copies of its cache in rotation
    (more than the L2 holds). Each setting is timed twice (the second time after all
    others) to show the run-to-run spread.
    """
    config = PackKVConfig()
    cases = []
    for shape, batch in ((SHAPES[0], 1), (SHAPES[0], 8), (SHAPES[1], 1), (SHAPES[1], 8)):
        k, v = chunks[shape.name]
        chunk = encode_chunk(k, v, config)
        kv = build_cache(chunk, batch, 32768)
        sets = rotation(kv)
        q = torch.randn(batch, shape.q_heads, shape.head_dim, device="cuda", dtype=torch.float16)
        p = torch.softmax(torch.randn(batch, shape.q_heads, 32768, device="cuda"), -1).half()
        cases.append((shape, batch, sets, q, p))
    settings = [(tw, pps, regs) for tw in tile_words for pps in programs for regs in caps]
    rows = []
    for attempt in (1, 2):
        for tw, pps, regs in settings:
            kernel_settings.TILE_WORDS, kernel_settings.PROGRAMS_PER_SM, kernel_settings.MAX_REGISTERS = tw, pps, regs
            for shape, batch, sets, q, p in cases:
                times = [time_graph(fn, reps) * 1e6 / len(sets) for fn in (
                    lambda: [qk(q, kv.k) for kv in sets], lambda: [pv(p, kv.v) for kv in sets],
                    lambda: [decode_attention(q, kv) for kv in sets])]
                resident = resident_counts(shape.head_dim) if pps is None else {}
                rows.append(dict(model=shape.name, batch=batch, tile_words=tw, programs_per_sm=pps, max_registers=regs,
                                 attempt=attempt, qk_us=times[0], pv_us=times[1], attention_us=times[2],
                                 resident=resident))
                print(f"variant tw {tw} programs/SM {pps or resident} maxnreg {regs} {shape.name} b{batch} T 32800 "
                      f"(try {attempt}): K {times[0]:7.1f} us, V {times[1]:7.1f} us, attention {times[2]:7.1f} us",
                      flush=True)
    kernel_settings.TILE_WORDS = kernel_settings.PROGRAMS_PER_SM = kernel_settings.MAX_REGISTERS = None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=".kvdata/smollm2_kv.pt", help="file written by capture_kv.py")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--quick", action="store_true", help="T=4K, batch 1, few repeats")
    parser.add_argument("--no-check", action="store_true", help="skip the correctness sweep")
    parser.add_argument("--num-warps", type=int, help="override the kernels' warps a program (default: head_dim / 32)")
    parser.add_argument("--tile-words", type=int, help="override the 32-token words a program unpacks per step")
    parser.add_argument("--programs-per-sm", type=int, help="override the split heuristic's programs per multiprocessor")
    parser.add_argument("--max-registers", type=int, help="override the register cap a thread (Triton maxnreg)")
    parser.add_argument("--variants", action="store_true", help="first time tile sizes x programs per SM x register caps at T=32K")
    parser.add_argument("--variant-tile-words", type=optional_ints, default=[2, 4],
                        help="tile words --variants tries ('none': each kernel's default)")
    parser.add_argument("--variant-programs", type=optional_ints, default=[8, 16],
                        help="programs per SM --variants tries ('none': those counted on the compiled kernel, one wave)")
    parser.add_argument("--variant-caps", type=optional_ints, default=[None, 128],
                        help="register caps --variants tries ('none': each kernel's default, 128 for the products and "
                             "none for attention), e.g. none,128,144")
    parser.add_argument("--variants-only", action="store_true", help="stop after --variants (no table)")
    parser.add_argument("--tokens", type=ints, help="context lengths of the table (default 4096,32768,131072)")
    parser.add_argument("--batches", type=ints, help="batches of the table (default 1,8)")
    parser.add_argument("--combine-kernel", action="store_true",
                        help="merge the attention's splits in a second kernel (the version before 2026-11-24's "
                             "last change), not in the decode kernel's last program")
    parser.add_argument("--unfused", action="store_true",
                        help="also time the attention as three kernels (K product, softmax, V product)")
    parser.add_argument("--no-gluon", action="store_true",
                        help="the V product and the attention with the Triton kernels (pv.py, decode_attention.py), "
                             "not the Gluon ones (pv_gluon.py, attention_gluon.py)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention needs an NVIDIA GPU")
    token_list = args.tokens or ([4096] if args.quick else [4096, 32768, 131072])
    batch_list = args.batches or ([1] if args.quick else [1, 8])
    if args.combine_kernel:
        sys.modules["packkv.kernels.decode_attention"].FOLDED_COMBINE = False
    kernel_settings.GLUON = not args.no_gluon
    gluon_kernel = sys.modules["packkv.kernels.pv"]._gluon
    attention_gluon = sys.modules["packkv.kernels.decode_attention"]._gluon
    reps = 10 if args.quick else 30
    data = torch.load(args.data)
    device = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"device {device}, torch {torch.__version__}, triton {triton.__version__}, {date}; kernel defaults "
          f"(tile words, programs/SM) {kernel_settings.DEFAULTS}; overrides: warps {args.num_warps}, tile words "
          f"{args.tile_words}, programs/SM {args.programs_per_sm}, max registers {args.max_registers}; splits merged "
          f"{'by a second kernel' if args.combine_kernel else 'in the decode kernel'}; V product by "
          f"{'Gluon where it serves the format' if kernel_settings.GLUON and gluon_kernel else 'Triton'}, attention by "
          f"{'Gluon where it serves the format' if kernel_settings.GLUON and attention_gluon else 'Triton'}", flush=True)
    chunks = {s.name: tuple(t.cuda() for t in real_chunk(data, s)) for s in SHAPES}
    log: list[str] = []
    if not args.no_check:
        check_correctness(chunks, log)
    copy_bw = copy_bandwidth(reps)
    print(f"copy bandwidth (read + written): {copy_bw / 1e9:.0f} GB/s", flush=True)
    variants = (sweep_variants(chunks, reps, args.variant_tile_words, args.variant_programs, args.variant_caps)
                if args.variants or args.variants_only else [])
    if args.variants_only:
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": device, "date": date, "copy_bandwidth": copy_bw, "variants": variants}, f, indent=1)
        return
    kernel_settings.NUM_WARPS, kernel_settings.TILE_WORDS = args.num_warps, args.tile_words
    kernel_settings.PROGRAMS_PER_SM, kernel_settings.MAX_REGISTERS = args.programs_per_sm, args.max_registers
    config = PackKVConfig()
    rows = []
    for shape in SHAPES:
        k, v = chunks[shape.name]
        chunk = encode_chunk(k, v, config)
        print(f"{shape.name}: chunk of {CHUNK_TOKENS} real tokens, compression {chunk.fp16_nbytes / chunk.nbytes:.2f}x"
              + (" (head_dim 128 = channels of two real SmolLM2 heads)" if shape.head_dim == 128 else ""), flush=True)
        for batch in batch_list:
            for tokens in token_list:
                need = 2.5 * 2 * batch * shape.kv_heads * tokens * shape.head_dim * 2  # fp16 K, V + packed + temporaries
                free = torch.cuda.mem_get_info()[0]
                if need > 0.8 * free:
                    print(f"skip {shape.name} batch {batch} T {tokens}: needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} free")
                    continue
                new = bench_case(shape, chunk, batch, tokens, copy_bw, reps, args.unfused)
                rows += new
                for r in new:
                    print(f"  {r['model']:13s} b{r['batch']} T{r['tokens']:7d} {r['op']:9s} {r['impl']:6s} "
                          f"{r['time_us']:9.1f} us {r['fp16_equiv_GBps']:7.0f} GB/s(fp16-eq) read {r['bytes_read_MB']:8.1f} MB "
                          f"{r['frac_copy_bw']:5.2f} of copy  x{r['speedup_vs_fp16']:.2f}", flush=True)
                torch.cuda.empty_cache()
    print_table(rows, device, date, copy_bw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, date=date, copy_GBps=copy_bw / 1e9, torch=torch.__version__,
                           triton=triton.__version__, defaults={f"{k} d{d}": v for (k, d), v in kernel_settings.DEFAULTS.items()},
                           overrides=dict(num_warps=args.num_warps, tile_words=args.tile_words,
                                          programs_per_sm=args.programs_per_sm, max_registers=args.max_registers,
                                          combine_kernel=args.combine_kernel,
                                          gluon=kernel_settings.GLUON and gluon_kernel is not None),
                           checks=log, variants=variants, rows=rows), f, indent=1)


def print_table(rows: list[dict], device: str, date: str, copy_bw: float) -> None:
    print(f"\n{device}, {date}, copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + written)")
    print("| model | batch | T | op | packed us | fp16 us (baseline) | speedup | compression | packed fp16-eq GB/s | packed read MB | packed frac of copy BW | fp16 frac of copy BW |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for packed, base in zip(rows[0::2], rows[1::2]):
        print(f"| {packed['model']} | {packed['batch']} | {packed['tokens']} | {packed['op']} | {packed['time_us']:.1f} | "
              f"{base['time_us']:.1f} ({packed['baseline']}) | {packed['speedup_vs_fp16']:.2f} | {packed['compression']:.2f} | "
              f"{packed['fp16_equiv_GBps']:.0f} | {packed['bytes_read_MB']:.1f} | {packed['frac_copy_bw']:.2f} | {base['frac_copy_bw']:.2f} |")


if __name__ == "__main__":
    main()
