"""Fused decode attention on an NVIDIA GPU in Gluon, for the packed format's default layout.

Per tile of ``TW`` 32-token words of the packed blocks:

- **K.** ``S^T [T, 8] = K . q^T`` reduces over channels, which an MMA fragment spreads over
  the 4 lanes of a quad, so pv_gluon's unpack (a lane holds one channel of its tokens) cannot
  feed it directly: the tile ``K^T [D, T]`` is unpacked in that layout, stored to shared
  memory and read back transposed (ldmatrix) as the A operand (warps along tokens).
- **Softmax.** In the scores' MMA layout, where each warp holds its own tokens (a few
  values a thread; in the B fragments of the V product every warp would hold the whole tile
  and repeat the work): the tile's maxima across the warps, then the weights times V's steps
  go to the B fragments in fp16.
- **V.** ``P^T`` multiplies ``V^T`` unpacked straight into the A fragments
  (pv_gluon._tile_values). K and V share the slot order of the unpack, so P needs no
  permutation.
- **Latency.** Both sides' plane words are loaded before either is unpacked, and each
  tile's metadata a step ahead; the running sums keep 2 values a thread (_fold_rows).

The fp16/bf16 tail takes a program of its own (the same MMAs on tiles loaded from it, the
query split into two halves of the tail's dtype), and the last program of each (batch, KV
head) to finish merges the splits. The kernel takes the arguments of
decode_attention._decode_kernel, in the same order, so that DecodePlan launches either.

Measured on an H100 (docs/benchmarks.md, "v10"). Serves token grouping on both sides, packs
of 32, 4-bit minima, K widths of at most 8 bits and V widths of at most 4, GQA groups of at
most 8 (:func:`supported`); decode_attention.py's Triton kernel serves the rest and the CPU.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from ..codec.format import PackedTensor
from . import _common
from .planes import side_pointers, split_tiles
from .pv_gluon import (
    MAX_PLANES, TILE_WORDS, _pow2_at_most, _slot_tokens, _tile_meta, _tile_values, _tile_words, _token_values,
    _unpack_indices, _v_operand, flat_steps, layouts, serves_format,
)

# (32-token words a program unpacks per step, register cap, warps) by head_dim. Measured on
# an H100 at T = 32K (docs/benchmarks.md, v9): at 128 registers and 4 warps a multiprocessor
# holds 4 programs; at head_dim 128, tiles of 2 words or 8 warps were 18-33% slower, caps of
# 96 and 168 registers 6-18%; at head_dim 64, 2 warps 26-32% slower.
SETTINGS = {64: (4, 128, 4), 128: (4, 128, 4)}
K_MAX_PLANES = 8  # K widths the kernel unpacks (planes 4..7 take the byte path)
# The staged K^T tile [D, TW * 32] in shared memory, read back transposed.
SHARED = gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0])
# Values of the partial outputs a thread holds in the merge (_merge_rows): each of its rows
# (GQA group rows over warps) reads MERGE_SPLITS / rows splits at once. 16 a row at
# head_dim 128 (64 values) leaves the loop without spills under the register cap.
MERGE_SPLITS = 16
# Splits the first level of the merge reads per group (see the kernel's end).
FAN_IN = 32
# A barrier among a program's threads: Triton 3.6's name, renamed in later versions.
_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
# The weights of V times their steps go to the tensor cores in fp16, scaled by a power of
# two a tile so that the largest is below 2**15 (p <= 1): no overflow for any step, and the
# small ones stay out of fp16's subnormals.
WEIGHT_TOP = gl.constexpr(16384.0)


def supported(k: PackedTensor, v: PackedTensor, group: int, tail_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether this kernel serves the packed ``k`` / ``v`` for GQA groups of ``group``, with a
    tail of ``tail_dtype``, on ``device``: compiled CUDA and the format it unpacks."""
    return (
        _common.use_asm(device) and group <= 8 and tail_dtype in _common.QUERY_DTYPES
        and serves_format(k, K_MAX_PLANES) and serves_format(v, MAX_PLANES) and k.block_size == v.block_size
    )


def counters(n_split: int) -> int:
    """The int32 counters the merge takes per (batch, KV head), for ``n_split`` splits."""
    return 1 + -(-n_split // FAN_IN)


def launch_config(k: PackedTensor, v: PackedTensor, group: int, has_mask: bool, split_query: bool
                  ) -> tuple[int, int, dict, dict, tuple]:
    """``(tile words, programs a multiprocessor holds, launch options, constexprs, key)`` of
    a launch. The programs are those the register cap allows (the first launch counts them
    on the compiled kernel), the key names what sets the
    compiled kernel's registers (for _common.programs_per_sm). ``split_query``: the query
    does not fit the tail's dtype (fp16 against bf16), so the tail's scores take it in two
    halves."""
    d = k.head_dim
    tile_words, cap, warps = SETTINGS[d]
    tile_words = _common.TILE_WORDS or tile_words
    cap = _common.MAX_REGISTERS or cap
    if tile_words not in TILE_WORDS:
        raise ValueError(f"the Gluon attention takes tiles of {TILE_WORDS} words, not {tile_words}")
    mma, word_lanes, meta, _ = layouts(d, tile_words, warps)
    merge = gl.BlockedLayout(size_per_thread=[1, 1, 1], threads_per_warp=[1, 1, 32], warps_per_cta=[warps, 1, 1],
                             order=[2, 1, 0])
    k_planes, v_planes = max(1, k.width_bound), max(1, v.width_bound)
    gp = 1 << (group - 1).bit_length()
    flat = flat_steps(k) and flat_steps(v)
    constexprs = dict(GROUP=group, D=d, BLOCK=k.block_size, TW=tile_words, K_PLANES=k_planes, V_PLANES=v_planes,
                      HAS_MASK=has_mask, SPLIT_QUERY=split_query, GP=gp, CHUNK=MERGE_SPLITS // max(1, gp // warps),
                      FAN_IN=FAN_IN, FLAT=flat, MMA=mma, WQ=word_lanes, META=meta, MERGE=merge)
    options = {"num_warps": warps, **({"maxnreg": cap} if cap else {})}
    key = ("attention_gluon", d, group, k.block_size, tile_words, k_planes, v_planes, has_mask, split_query, cap, flat)
    per_sm = 65536 // (32 * warps * cap) if cap else 2
    return tile_words, per_sm, options, constexprs, key


@gluon.jit
def _query_operand(q_ptr, b, h, s_qb, s_qh, s_qd, GROUP: gl.constexpr, D: gl.constexpr, B: gl.constexpr):
    """q^T [D, 8] of the GQA group (padded with zero columns) in the B fragments, fp32, each
    column divided by a power of two that brings its largest value into [1, 2) (exact; fp16
    then holds a bf16 query too); and those powers [8]."""
    cB = gl.arange(0, D, layout=gl.SliceLayout(1, B))
    gB = gl.arange(0, 8, layout=gl.SliceLayout(0, B))
    q = gl.load(q_ptr + b * s_qb + (h * GROUP + gB[None, :]) * s_qh + cB[:, None] * s_qd,
                mask=(gB < GROUP)[None, :], other=0.0).to(gl.float32)
    pw = _pow2_at_most(gl.max(gl.abs(q), axis=0))
    return q / pw[None, :], pw


@gluon.jit
def _k_scores(kt, qt, qsum, sc, ze, tile_smem, A: gl.constexpr, MMA: gl.constexpr, NT: gl.constexpr):
    """Scores S^T [NT, 8] = zero_t qsum + step_t (K . q^T) of one tile (MMA layout, rows the
    fragment slots) for the fp16 query ``qt`` and its column sums, from the unpacked K^T
    ``kt`` [D, NT] (pv_gluon._tile_values): through shared memory, read back transposed."""
    _barrier()  # the previous tile's reads are done
    tile_smem.store(kt)
    _barrier()
    sp = mma_v2(tile_smem.permute((1, 0)).load(A), qt, gl.zeros([NT, 8], gl.float32, MMA))
    return ze[:, None] * qsum[None, :] + sc[:, None] * sp


@gluon.jit
def _fold_rows(x):
    """Scores-shaped ``x`` [NT, 8] (MMA layout) summed over the rows each thread holds (row
    bit 3 and those above the warps'): [NT / (16 W), W, 8, 8] -> [W, 8, 8] for W warps, 2
    values a thread where [NT, 8] takes 8. The running sums of the weights and of the
    weights times V's zeros keep this form: 12 registers fewer, so that fewer spill."""
    W: gl.constexpr = gl.num_warps()
    if x.shape[0] >= 16 * W:
        folded = gl.sum(gl.sum(gl.reshape(x, [x.shape[0] // (16 * W), W, 2, 8, 8]), axis=2), axis=0)
    else:  # 1-word tiles: fewer rows than 16 a warp (the warps past them repeat the rows)
        folded = gl.sum(gl.reshape(x, [x.shape[0] // 16, 2, 8, 8]), axis=1)
    return folded


@gluon.jit
def _fold_factor(alpha, acc):
    """The per-column ``alpha`` [8] broadcast over :func:`_fold_rows`' form ``acc``."""
    return gl.convert_layout(alpha, gl.SliceLayout(0, gl.SliceLayout(1, acc.type.layout)))[None, None, :]


@gluon.jit
def _folded_total(acc, L: gl.constexpr):
    """The column sums [8] of :func:`_fold_rows`' form ``acc``, in layout ``L``."""
    return gl.convert_layout(gl.sum(gl.sum(acc, axis=0), axis=0), L)


@gluon.jit
def _masked(s, mask_bh, tok, on, s_mkt, HAS_MASK: gl.constexpr):
    """Scores [NT, 8] with -inf where the token (cache order ``tok``) is out of range or masked out."""
    keep = on
    if HAS_MASK:
        keep = keep & (gl.load(mask_bh + tok * s_mkt, mask=on, other=0) != 0)
    return gl.where(keep[:, None], s, -float("inf"))


@gluon.jit
def _softmax_step(s, m_i):
    """One step of the running softmax (base 2) over a tile of scores ``s [NT, 8]`` in their
    MMA layout: the tile's weights, the new max [8], and the factor [8] for the old output
    and sums. A column that has seen only masked tokens keeps max -inf and weights 0."""
    m_new = gl.maximum(m_i, gl.max(s, axis=0))
    m_safe = gl.where(m_new > -float("inf"), m_new, 0.0)
    return gl.exp2(s - m_safe[None, :]), m_new, gl.exp2(m_i - m_safe)


@gluon.jit
def _merge_rows(m_part, l_part, acc_part, r0, n_split, first, count, step,
                GROUP: gl.constexpr, GP: gl.constexpr, CHUNK: gl.constexpr, D: gl.constexpr, L3: gl.constexpr):
    """Merge ``count`` partial results (splits ``first + i * step``) of each query row ``r0 ..
    r0 + GROUP - 1`` (batch * q_heads + head), ``CHUNK`` of every row at a time: their max
    [GP], sum [GP] and unnormalized output [GP, D] (layouts of ``L3``'s slices).

    ``L3`` lays out ``[GP, CHUNK, D]`` (GP: GROUP to a power of two): warps along rows, lanes
    along channels, the splits in each thread's registers, so that the rows merge in parallel
    and every reduction stays inside a thread (no shared memory, no barrier): the merge is a
    chain of ``count / CHUNK`` dependent L2 reads. The partials are read from L2 (``.cg``):
    other programs of the same launch wrote them.
    """
    L2: gl.constexpr = gl.SliceLayout(2, L3)  # [GP, CHUNK]
    LO: gl.constexpr = gl.SliceLayout(1, L3)  # [GP, D]
    g2 = gl.arange(0, GP, layout=gl.SliceLayout(1, L2))
    s2 = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, L2))
    c3 = gl.expand_dims(gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(0, LO)), 0), 1)
    rows = (r0 + g2) * n_split + first
    m_run = gl.full([GP], -float("inf"), gl.float32, gl.SliceLayout(1, L2))
    total = gl.zeros([GP], gl.float32, gl.SliceLayout(1, L2))
    out = gl.zeros([GP, D], gl.float32, LO)
    for start in range(0, count, CHUNK):
        valid = (g2 < GROUP)[:, None] & (start + s2 < count)[None, :]
        idx = rows[:, None] + (start + s2)[None, :] * step
        m = gl.load(m_part + idx, mask=valid, other=-float("inf"), cache_modifier=".cg")
        l = gl.load(l_part + idx, mask=valid, other=0.0, cache_modifier=".cg")
        part = gl.load(acc_part + gl.expand_dims(idx, 2) * D + c3, mask=gl.expand_dims(valid, 2), other=0.0,
                       cache_modifier=".cg")
        m_new = gl.maximum(m_run, gl.max(m, axis=1))
        m_safe = gl.where(m_new > -float("inf"), m_new, 0.0)
        scale = gl.exp2(m_run - m_safe)
        weight = gl.exp2(m - m_safe[:, None])
        total = total * scale + gl.sum(weight * l, axis=1)
        out = out * gl.convert_layout(scale, gl.SliceLayout(1, LO))[:, None] \
            + gl.sum(part * gl.expand_dims(weight, 2), axis=1)
        m_run = m_new
    return m_run, total, out


@gluon.jit
def _store_partial(m_part, l_part, acc_part, r0, n_split, slot, m, total, out,
                   GROUP: gl.constexpr, GP: gl.constexpr, D: gl.constexpr, L3: gl.constexpr):
    """Write a merge's result over split ``slot`` of rows ``r0 ..`` (_merge_rows read it; the
    barrier first: a warp may write a row that another warp still reads)."""
    LO: gl.constexpr = gl.SliceLayout(1, L3)
    g2 = gl.arange(0, GP, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))
    go = gl.arange(0, GP, layout=gl.SliceLayout(1, LO))
    chan = gl.arange(0, D, layout=gl.SliceLayout(0, LO))
    _barrier()
    gl.store(m_part + (r0 + g2) * n_split + slot, m, mask=g2 < GROUP)
    gl.store(l_part + (r0 + g2) * n_split + slot, total, mask=g2 < GROUP)
    gl.store(acc_part + ((r0 + go) * n_split + slot)[:, None] * D + chan[None, :], out, mask=(go < GROUP)[:, None])


@gluon.jit
def _store_output(out_ptr, r0, s_ob, s_oh, s_od, q_heads, total, out,
                  GROUP: gl.constexpr, GP: gl.constexpr, D: gl.constexpr, L3: gl.constexpr):
    """The normalized outputs of rows ``r0 .. r0 + GROUP - 1`` in the output's dtype."""
    LO: gl.constexpr = gl.SliceLayout(1, L3)
    out = out / gl.convert_layout(gl.where(total > 0, total, 1.0), gl.SliceLayout(1, LO))[:, None]
    go = gl.arange(0, GP, layout=gl.SliceLayout(1, LO))
    chan = gl.arange(0, D, layout=gl.SliceLayout(0, LO))
    row = r0 + go
    ptrs = out_ptr + (row // q_heads) * s_ob + (row % q_heads) * s_oh
    gl.store(ptrs[:, None] + chan[None, :] * s_od, out.to(out_ptr.dtype.element_ty), mask=(go < GROUP)[:, None])


# The strides and counts of decode_attention._decode_kernel's list, for the same reason.
@gluon.jit(do_not_specialize=['ks_ob', 'ks_oh', 'ks_wb', 'ks_wh', 'ks_mb', 'ks_mh', 'ks_sb', 'ks_sh', 'ks_zb', 'ks_zh', 'vs_ob', 'vs_oh', 'vs_wb', 'vs_wh', 'vs_mb', 'vs_mh', 'vs_sb', 'vs_sh', 'vs_zb', 'vs_zh', 's_ktb', 's_kth', 's_vtb', 's_vth', 's_mkb', 's_mkh', 's_knb', 's_knh', 's_vnb', 's_vnh', 'heads', 'n_words', 'tiles_per_split', 'n_pack_splits', 'n_split', 'tail_len', 'append', 'merge'])
def _attention_kernel(
    q_ptr, m_part, l_part, acc_part, counter_ptr, out_ptr, s_ob, s_oh, s_od,
    kw_ptr, ko_ptr, kwd_ptr, kmn_ptr, ks_ptr, kz_ptr,
    ks_word, ks_ob, ks_oh, ks_op, ks_wb, ks_wh, ks_wp, ks_wc, ks_mb, ks_mh, ks_mp, ks_mc,
    ks_sb, ks_sh, ks_sn, ks_sx, ks_zb, ks_zh, ks_zn, ks_zx,
    vw_ptr, vo_ptr, vwd_ptr, vmn_ptr, vs_ptr, vz_ptr,
    vs_word, vs_ob, vs_oh, vs_op, vs_wb, vs_wh, vs_wp, vs_wc, vs_mb, vs_mh, vs_mp, vs_mc,
    vs_sb, vs_sh, vs_sn, vs_sx, vs_zb, vs_zh, vs_zn, vs_zx,
    kt_ptr, s_ktb, s_kth, s_ktt, s_ktd, vt_ptr, s_vtb, s_vth, s_vtt, s_vtd,
    mask_ptr, s_mkb, s_mkh, s_mkt,
    s_qb, s_qh, s_qd,
    kn_ptr, s_knb, s_knh, s_knd, vn_ptr, s_vnb, s_vnh, s_vnd,
    heads, n_words, tiles_per_split, n_pack_splits, n_split, tail_len, append, merge, qk_scale,
    GROUP: gl.constexpr, D: gl.constexpr, BLOCK: gl.constexpr, TW: gl.constexpr,
    K_PLANES: gl.constexpr, V_PLANES: gl.constexpr, HAS_MASK: gl.constexpr, SPLIT_QUERY: gl.constexpr,
    GP: gl.constexpr, CHUNK: gl.constexpr, FAN_IN: gl.constexpr, FLAT: gl.constexpr,
    MMA: gl.constexpr, WQ: gl.constexpr, META: gl.constexpr, MERGE: gl.constexpr,
):
    """Grid (batch * kv_heads, n_split); split ``n_pack_splits`` (if any) takes the tail.

    decode_attention._decode_kernel's contract: per query head and split, the running max
    and sum (base-2 scores) and the unnormalized output, fp32; with ``merge`` 1 the last
    program of each (batch, KV head) merges them into ``out_ptr``; with ``append`` 1 the tail
    program first copies the new token's rows into the tail at ``tail_len - 1``.
    """
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    NT: gl.constexpr = TW * 32
    pid_bh = gl.program_id(0)
    split = gl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    mask_bh = mask_ptr + b * s_mkb + h * s_mkh
    qs, pw = _query_operand(q_ptr, b, h, s_qb, s_qh, s_qd, GROUP, D, B)
    # The scores' column factor: the query's powers of two and the scale, in log2 units.
    col_scale = gl.convert_layout(pw, gl.SliceLayout(0, MMA)) * qk_scale
    m_i = gl.full([8], -float("inf"), gl.float32, gl.SliceLayout(0, MMA))
    # The sums of the weights and of the weights times V's zeros, by fragment slot, reduced
    # once at the end.
    l_acc = _fold_rows(gl.zeros([NT, 8], gl.float32, MMA))
    z_acc = _fold_rows(gl.zeros([NT, 8], gl.float32, MMA))
    acc = gl.zeros([D, 8], gl.float32, MMA)
    tile_smem = gl.allocate_shared_memory(gl.float16, [D, NT], SHARED)
    if split < n_pack_splits:
        first, last, word_end = split_tiles(split, tiles_per_split, n_words, TW)
        k_off, k_wd, k_mn, k_sc, k_ze = side_pointers(
            ko_ptr, kwd_ptr, kmn_ptr, ks_ptr, kz_ptr, b, h, ks_ob, ks_oh, ks_wb, ks_wh, ks_mb, ks_mh, ks_sb, ks_sh,
            ks_zb, ks_zh)
        v_off, v_wd, v_mn, v_sc, v_ze = side_pointers(
            vo_ptr, vwd_ptr, vmn_ptr, vs_ptr, vz_ptr, b, h, vs_ob, vs_oh, vs_wb, vs_wh, vs_mb, vs_mh, vs_sb, vs_sh,
            vs_zb, vs_zh)
        qt = qs.to(gl.float16)
        qsum = gl.convert_layout(gl.sum(qt.to(gl.float32), axis=0), gl.SliceLayout(0, MMA))
        mw, mc, q3 = _unpack_indices(TW, D, META, WQ)
        token = _slot_tokens(gl.arange(0, NT, layout=gl.SliceLayout(1, MMA)), TW)
        # Each tile's metadata is loaded a step ahead (masked past word_end), and both sides'
        # plane words before either is unpacked: the loads' latency hides behind the work
        # (docs/benchmarks.md, v10).
        kwb_n, kmb_n, kfw_n = _tile_meta(k_wd, k_mn, k_off, first, word_end, mw, mc, ks_wp, ks_wc, ks_mp, ks_mc,
                                         ks_op, TW)
        vwb_n, vmb_n, vfw_n = _tile_meta(v_wd, v_mn, v_off, first, word_end, mw, mc, vs_wp, vs_wc, vs_mp, vs_mc,
                                         vs_op, TW)
        for tile in range(first, last):
            kwb, kmb, kfw = kwb_n, kmb_n, kfw_n
            vwb, vmb, vfw = vwb_n, vmb_n, vfw_n
            kwb_n, kmb_n, kfw_n = _tile_meta(k_wd, k_mn, k_off, tile + 1, word_end, mw, mc, ks_wp, ks_wc, ks_mp, ks_mc,
                                             ks_op, TW)
            vwb_n, vmb_n, vfw_n = _tile_meta(v_wd, v_mn, v_off, tile + 1, word_end, mw, mc, vs_wp, vs_wc, vs_mp, vs_mc,
                                             vs_op, TW)
            tok = tile * NT + token
            on = tok < word_end * 32
            sc = _token_values(k_sc, tok, on, ks_sn, ks_sx, BLOCK, FLAT)
            ze = _token_values(k_ze, tok, on, ks_zn, ks_zx, BLOCK, FLAT)
            vsc = _token_values(v_sc, tok, on, vs_sn, vs_sx, BLOCK, FLAT)
            vze = _token_values(v_ze, tok, on, vs_zn, vs_zx, BLOCK, FLAT)
            k0, k1, k2, k3, k4, k5, k6, k7, km = _tile_words(kw_ptr, ks_word, kwb, kmb, kfw, mc, WQ, K_PLANES)
            v0, v1, v2, v3, v4, v5, v6, v7, vm = _tile_words(vw_ptr, vs_word, vwb, vmb, vfw, mc, WQ, V_PLANES)
            kt = _tile_values(k0, k1, k2, k3, k4, k5, k6, k7, km, q3, WQ, NT, D, K_PLANES)
            s = _k_scores(kt, qt, qsum, sc, ze, tile_smem, A, MMA, NT) * col_scale[None, :]
            p, m_i, alpha = _softmax_step(_masked(s, mask_bh, tok, on, s_mkt, HAS_MASK), m_i)
            # V[t, c] = zero_t + step_t (m_c + u_tc): the zeros ride with the weights,
            # sum_t p_t zero_t, and the weights times the steps go to the tensor cores.
            fold_alpha = _fold_factor(alpha, l_acc)  # l_acc and z_acc share a layout
            l_acc = l_acc * fold_alpha + _fold_rows(p)
            z_acc = z_acc * fold_alpha + _fold_rows(p * vze[:, None])
            unit = _pow2_at_most(gl.max(vsc, axis=0))
            weights = gl.convert_layout((p * (vsc * (WEIGHT_TOP / unit))[:, None]).to(gl.float16), B)
            vt = _v_operand(_tile_values(v0, v1, v2, v3, v4, v5, v6, v7, vm, q3, WQ, NT, D, V_PLANES), A)
            acc = acc * alpha[None, :] + mma_v2(vt, weights, gl.zeros([D, 8], gl.float32, MMA)) * (unit / WEIGHT_TOP)
    else:
        # The tail, in its dtype: the query as two halves of it (exact enough for either).
        dt = kt_ptr.dtype.element_ty
        kt_bh = kt_ptr + b * s_ktb + h * s_kth
        vt_bh = vt_ptr + b * s_vtb + h * s_vth
        if append:
            row = tail_len - 1
            chan = gl.arange(0, D, layout=gl.SliceLayout(0, gl.SliceLayout(1, MERGE)))
            gl.store(kt_bh + row * s_ktt + chan * s_ktd, gl.load(kn_ptr + b * s_knb + h * s_knh + chan * s_knd))
            gl.store(vt_bh + row * s_vtt + chan * s_vtd, gl.load(vn_ptr + b * s_vnb + h * s_vnh + chan * s_vnd))
            _barrier()  # the tiles below are loaded by other threads than those that stored it
        q_hi = qs.to(dt)
        if SPLIT_QUERY:  # an fp16 query, a bf16 tail
            q_lo = (qs - q_hi.to(gl.float32)).to(dt)
        k_tok = gl.arange(0, NT, layout=gl.SliceLayout(1, A))  # K [NT, D] as the A operand
        k_chan = gl.arange(0, D, layout=gl.SliceLayout(0, A))
        v_tok = gl.arange(0, NT, layout=gl.SliceLayout(0, A))  # V^T [D, NT] as the A operand
        v_chan = gl.arange(0, D, layout=gl.SliceLayout(1, A))
        s_tok = gl.arange(0, NT, layout=gl.SliceLayout(1, MMA))
        for start in range(0, tail_len, NT):
            kt = gl.load(kt_bh + (start + k_tok)[:, None] * s_ktt + k_chan[None, :] * s_ktd,
                         mask=(start + k_tok < tail_len)[:, None], other=0.0)
            s = mma_v2(kt, q_hi, gl.zeros([NT, 8], gl.float32, MMA))
            if SPLIT_QUERY:
                s = mma_v2(kt, q_lo, s)
            s = s * col_scale[None, :]
            s = _masked(s, mask_bh, n_words * 32 + start + s_tok, start + s_tok < tail_len, s_mkt, HAS_MASK)
            p, m_i, alpha = _softmax_step(s, m_i)
            l_acc = l_acc * _fold_factor(alpha, l_acc) + _fold_rows(p)
            vt = gl.load(vt_bh + (start + v_tok)[None, :] * s_vtt + v_chan[:, None] * s_vtd,
                         mask=(start + v_tok < tail_len)[None, :], other=0.0)
            acc = acc * alpha[None, :] + mma_v2(vt, gl.convert_layout(p.to(dt), B), gl.zeros([D, 8], gl.float32, MMA))
    # Partials in _decode_kernel's order: query row r = b * q_heads + h * GROUP + g, index
    # r * n_split + split; acc [.., D].
    acc += _folded_total(z_acc, gl.SliceLayout(0, MMA))[None, :]
    rows = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))
    row_ids = (b * heads * GROUP + h * GROUP + rows) * n_split + split
    gl.store(m_part + row_ids, m_i, mask=rows < GROUP)
    gl.store(l_part + row_ids, _folded_total(l_acc, gl.SliceLayout(0, MMA)), mask=rows < GROUP)
    chan = gl.arange(0, D, layout=gl.SliceLayout(1, MMA))
    cols = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))
    col_ids = (b * heads * GROUP + h * GROUP + cols) * n_split + split
    gl.store(acc_part + col_ids[None, :] * D + chan[:, None], acc, mask=(cols < GROUP)[None, :])
    if merge:
        # In two levels, so that no program merges a long chain: the last program of each
        # FAN_IN consecutive splits to finish merges theirs (over its first split's slot),
        # then the last of those, the groups'; one level if there is one group. Counters
        # [1 + groups] a (batch, KV head): the final one, then the groups'. As in
        # _decode_kernel: every thread's stores come before a counter's release (the
        # barrier), and the loads of the program that merges after its acquire.
        _barrier()
        n_groups = (n_split + FAN_IN - 1) // FAN_IN
        grp = split // FAN_IN
        counters = counter_ptr + pid_bh * (n_groups + 1)
        size = gl.minimum(n_split - grp * FAN_IN, FAN_IN)
        done = gl.atomic_add(counters + 1 + grp, 1, sem="acq_rel")
        if done == size - 1:
            gl.store(counters + 1 + grp, 0)  # every program has counted: ready for the next launch
            r0 = pid_bh * GROUP
            m, total, out = _merge_rows(m_part, l_part, acc_part, r0, n_split, grp * FAN_IN, size, 1,
                                        GROUP, GP, CHUNK, D, MERGE)
            if n_groups == 1:
                _store_output(out_ptr, r0, s_ob, s_oh, s_od, heads * GROUP, total, out, GROUP, GP, D, MERGE)
            else:
                _store_partial(m_part, l_part, acc_part, r0, n_split, grp * FAN_IN, m, total, out, GROUP, GP, D, MERGE)
                _barrier()
                if gl.atomic_add(counters, 1, sem="acq_rel") == n_groups - 1:
                    gl.store(counters, 0)
                    m, total, out = _merge_rows(m_part, l_part, acc_part, r0, n_split, 0, n_groups, FAN_IN,
                                                GROUP, GP, CHUNK, D, MERGE)
                    _store_output(out_ptr, r0, s_ob, s_oh, s_od, heads * GROUP, total, out, GROUP, GP, D, MERGE)
