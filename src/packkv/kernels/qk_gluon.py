"""The K product on an NVIDIA GPU in Gluon: the scores of attention_gluon.py's K side alone.

``S^T [T, 8] = K [T, D] . q^T [D, 8]`` for the GQA group (padded to 8), a tile of ``TW``
32-token words at a time: K^T unpacked as in pv_gluon.py (the words on the quad's lanes),
stored to shared memory and read back transposed as the A operand of an m16n8k16 MMA, the
query (divided by a power of two per column, so that fp16 holds a bf16 one) as the B
operand. An MMA fragment spreads the channels a score sums over across the 4 lanes of a
quad, which the unpack does not give; hence the shared memory (docs/notes/kernels.md,
"Gluon"). The scores go out in packed token order, each fragment slot to its token.

Measured on an H100 (docs/notes/gluon/run_qk.py, docs/benchmarks.md v11): 1.2-1.5x faster than
qk.py's Triton kernel.
It serves the default format (:func:`supported`): token grouping, packs of 32, 4-bit
minima, widths of at most 8 bits, GQA groups of at most 8; qk.py's Triton kernel serves the
rest and the CPU.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from ..codec.format import PackedTensor
from . import _common
from .attention_gluon import K_MAX_PLANES, SHARED, _k_scores, _query_operand
from .planes import packed_args, side_pointers, split_tiles
from .pv_gluon import (
    _slot_tokens, _tile_meta, _token_values, _unpack_indices, _unpacked_tile, flat_steps, layouts, serves_format,
)

# (32-token words a program unpacks per step, programs a multiprocessor per resident one)
# by head_dim. Measured on an H100 at T = 32K (docs/notes/gluon/run_qk.py, docs/benchmarks.md
# v9): tiles of 4 words are up to 1.25x faster than tiles of 2 (equal at SmolLM2 batch 1);
# twice the resident programs (two waves) was 1-15% faster at batch 8 and up to 7% slower at
# batch 1 in two calls. Uncapped: Triton 3.6 compiled it to 96-128 registers.
SETTINGS = {64: (4, 2), 128: (4, 2)}


def supported(k: PackedTensor, group: int, device: torch.device) -> bool:
    """Whether this kernel serves ``k`` for GQA groups of ``group`` on ``device``: compiled
    CUDA, the format it unpacks, and at most 8 query heads a KV head (the B operand's width)."""
    return _common.use_asm(device) and serves_format(k, K_MAX_PLANES) and group <= 8


# Batch/head strides and counts change as a cache grows (see qk.py).
@gluon.jit(do_not_specialize=['s_ob', 's_oh', 's_wb', 's_wh', 's_mb', 's_mh', 's_sb', 's_sh', 's_zb', 's_zh', 's_outb', 's_outh', 'heads', 'n_words', 'tiles_per_split'])
def _qk_gluon_kernel(
    q_ptr, out_ptr,
    words_ptr, offsets_ptr, widths_ptr, mins_ptr, scale_ptr, zero_ptr,
    s_word, s_ob, s_oh, s_op, s_wb, s_wh, s_wp, s_wc, s_mb, s_mh, s_mp, s_mc,
    s_sb, s_sh, s_sn, s_sx, s_zb, s_zh, s_zn, s_zx,
    s_qb, s_qh, s_qd, s_outb, s_outh, s_outt,
    heads, n_words, tiles_per_split,
    GROUP: gl.constexpr, D: gl.constexpr, BLOCK: gl.constexpr, TW: gl.constexpr, NPLANES: gl.constexpr,
    FLAT: gl.constexpr, MMA: gl.constexpr, WQ: gl.constexpr, META: gl.constexpr,
):
    """Grid (batch * kv_heads, splits); a program writes the fp32 scores of its split's tokens."""
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    NT: gl.constexpr = TW * 32
    pid_bh = gl.program_id(0)
    b = pid_bh // heads
    h = pid_bh % heads
    offsets_bh, widths_bh, mins_bh, scale_bh, zero_bh = side_pointers(
        offsets_ptr, widths_ptr, mins_ptr, scale_ptr, zero_ptr, b, h, s_ob, s_oh, s_wb, s_wh, s_mb, s_mh, s_sb, s_sh, s_zb, s_zh)
    first, last, word_end = split_tiles(gl.program_id(1), tiles_per_split, n_words, TW)
    qs, pw = _query_operand(q_ptr, b, h, s_qb, s_qh, s_qd, GROUP, D, B)
    qt = qs.to(gl.float16)
    qsum = gl.convert_layout(gl.sum(qt.to(gl.float32), axis=0), gl.SliceLayout(0, MMA))
    col_scale = gl.convert_layout(pw, gl.SliceLayout(0, MMA))  # undoes the query's powers of two
    mw, mc, q3 = _unpack_indices(TW, D, META, WQ)
    token = _slot_tokens(gl.arange(0, NT, layout=gl.SliceLayout(1, MMA)), TW)
    cols = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))
    out_cols = out_ptr + b * s_outb + (h * GROUP + cols) * s_outh
    tile_smem = gl.allocate_shared_memory(gl.float16, [D, NT], SHARED)
    # Each tile's metadata is loaded a step ahead (masked past word_end), so that its latency
    # and that of the plane words' addresses do not add up (docs/benchmarks.md, v11).
    wb_n, mb_n, fw_n = _tile_meta(widths_bh, mins_bh, offsets_bh, first, word_end, mw, mc, s_wp, s_wc, s_mp, s_mc, s_op, TW)
    for tile in range(first, last):
        wb, mb, fw = wb_n, mb_n, fw_n
        wb_n, mb_n, fw_n = _tile_meta(widths_bh, mins_bh, offsets_bh, tile + 1, word_end, mw, mc, s_wp, s_wc, s_mp, s_mc,
                                      s_op, TW)
        tok = tile * NT + token
        on = tok < word_end * 32
        sc = _token_values(scale_bh, tok, on, s_sn, s_sx, BLOCK, FLAT)
        ze = _token_values(zero_bh, tok, on, s_zn, s_zx, BLOCK, FLAT)
        kt = _unpacked_tile(words_ptr, s_word, wb, mb, fw, mc, q3, WQ, NT, D, NPLANES)
        scores = _k_scores(kt, qt, qsum, sc, ze, tile_smem, A, MMA, NT) * col_scale[None, :]
        gl.store(out_cols[None, :] + tok[:, None] * s_outt, scores, mask=on[:, None] & (cols < GROUP)[None, :])


def qk_gluon(q: torch.Tensor, k: PackedTensor, splits: int | None = None) -> torch.Tensor:
    """:func:`qk.qk` with this kernel (inputs validated, :func:`supported` true).

    Returns fp32 ``[batch, q_heads, k.n_tokens]`` in packed token order.
    """
    batch, q_heads, d = q.shape
    group = q_heads // k.heads
    out = torch.empty(batch, q_heads, k.n_tokens, dtype=torch.float32, device=q.device)
    n_words = k.n_tokens // 32
    if n_words == 0:
        return out
    tile_words, waves = SETTINGS[d]
    warps = d // 32
    mma, word_lanes, meta, _ = layouts(d, tile_words, warps)
    planes = max(1, k.width_bound)
    flat = flat_steps(k)
    key = ("qk_gluon", q.device, d, group, k.block_size, planes, tile_words, flat)
    resident = _common.programs_per_sm(5 if d == 128 else 10, key)
    per_sm = resident if _common.PROGRAMS_PER_SM is not None else waves * resident
    per_split, n_split = _common.tile_splits(batch * k.heads, n_words, tile_words, q.device, splits, per_sm)
    compiled = _qk_gluon_kernel[(batch * k.heads, n_split)](
        q, out, *packed_args(k), *q.stride(), *out.stride(), k.heads, n_words, per_split,
        GROUP=group, D=d, BLOCK=k.block_size, TW=tile_words, NPLANES=planes, FLAT=flat,
        MMA=mma, WQ=word_lanes, META=meta, num_warps=warps,
    )
    _common.count_resident(key, compiled, q.device)
    return out
