"""Prototype: the K product from a tile unpacked as in pv_gluon.py, through shared memory (Gluon).

``S'^T [T, 8] = K [T, D] . q^T [D, 8]`` reduces over channels, which an MMA fragment spreads
over the 4 lanes of a quad; K's tokens sit on the 8 quads. So the cheap unpack of the V
prototype (4 lanes share a channel's plane words, nibble lane q each) cannot feed the
fragment directly: the tile ``K^T [D, T]`` is unpacked in that layout, stored to shared
memory and read back transposed (ldmatrix) as the A operand. Slot ``k`` of the tile holds
token ``32 w + 8 r0 + 16 r1 + 4 r2 + q`` as in pv_gluon.py; the scores follow.
Token grouping, pack 32, min_bits 4, widths <= 8 (NPLANES planes), fp16 queries.
(A first version gave each lane one byte lane of 32 channels, 8 lanes sharing a load:
11.7 instructions a value, 160 loads a word and thread; see docs/notes/kernels.md.)
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from packkv.kernels.pv_gluon import _add, _bytes_f16


def layouts(D: int, NW: int, TW: int):
    """MMA layout of S'^T [TW * 32, 8] (warps along tokens), the word-q layout of the unpack
    ([TW, 4, D], as pv_gluon.layouts), the metadata layout and the shared tile's layout."""
    MMA = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1], instr_shape=[16, 8])
    regs = [[0, 0, 8]] + [[1 << i, 0, 0] for i in range(TW.bit_length() - 1)]
    n = 16 * NW
    while n < D:
        regs.append([0, 0, n])
        n *= 2
    warps = [[0, 0, 16 << i] for i in range(NW.bit_length() - 1)]
    WQ = gl.DistributedLinearLayout(reg_bases=regs, lane_bases=[[0, 1, 0], [0, 2, 0], [0, 0, 1], [0, 0, 2], [0, 0, 4]],
                                    warp_bases=warps, block_bases=[], shape=[TW, 4, D])
    META = gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[1, 32], warps_per_cta=[NW, 1], order=[1, 0])
    SH = gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0])
    return MMA, WQ, META, SH


@gluon.jit
def _qk_gluon(
    q_ptr, out_ptr,
    words_ptr, offsets_ptr, widths_ptr, mins_ptr, scale_ptr, zero_ptr,
    s_word, s_ob, s_oh, s_op, s_wb, s_wh, s_wp, s_wc, s_mb, s_mh, s_mp, s_mc,
    s_sb, s_sh, s_sn, s_sx, s_zb, s_zh, s_zn, s_zx,
    s_qb, s_qh, s_qd, s_outb, s_outh, s_outt,
    heads, n_words, tiles_per_split,
    GROUP: gl.constexpr, D: gl.constexpr, BLOCK: gl.constexpr, TW: gl.constexpr, NPLANES: gl.constexpr,
    MMA: gl.constexpr, WQ: gl.constexpr, META: gl.constexpr, SH: gl.constexpr,
):
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    NT: gl.constexpr = TW * 32
    WQ2: gl.constexpr = gl.SliceLayout(1, WQ)
    pid_bh = gl.program_id(0)
    split = gl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    offsets_bh = offsets_ptr + b * s_ob + h * s_oh
    widths_bh = widths_ptr + b * s_wb + h * s_wh
    mins_bh = mins_ptr + b * s_mb + h * s_mh
    scale_bh = scale_ptr + b * s_sb + h * s_sh
    zero_bh = zero_ptr + b * s_zb + h * s_zh
    first = split * tiles_per_split
    last = gl.minimum(first + tiles_per_split, gl.cdiv(n_words, TW))
    word_end = gl.minimum(last * TW, n_words)

    cB = gl.arange(0, D, layout=gl.SliceLayout(1, B))
    gB = gl.arange(0, 8, layout=gl.SliceLayout(0, B))
    qt = gl.load(q_ptr + b * s_qb + (h * GROUP + gB[None, :]) * s_qh + cB[:, None] * s_qd,
                 mask=(gB < GROUP)[None, :], other=0.0)
    qsum = gl.convert_layout(gl.sum(qt.to(gl.float32), axis=0), gl.SliceLayout(0, MMA))

    mw = gl.arange(0, TW, layout=gl.SliceLayout(1, META))
    mc = gl.arange(0, D, layout=gl.SliceLayout(0, META))
    qi = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, WQ)))
    q3 = gl.expand_dims(gl.expand_dims(qi, 0), 2)
    mS = gl.arange(0, NT, layout=gl.SliceLayout(1, MMA))
    kk = mS % 32
    phys = (mS // 32) * 32 + 8 * (kk & 1) + 16 * ((kk >> 3) & 1) + 4 * ((kk >> 4) & 1) + ((kk >> 1) & 3)
    nS = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))
    out_cols = out_ptr + b * s_outb + (h * GROUP + nS) * s_outh
    tile_smem = gl.allocate_shared_memory(gl.float16, [D, NT], SH)
    for tile in range(first, last):
        words = tile * TW + mw
        valid = words < word_end
        wb = gl.load(widths_bh + words[:, None] * s_wp + (mc // 2)[None, :] * s_wc, mask=valid[:, None], other=0)
        mb = gl.load(mins_bh + words[:, None] * s_mp + (mc // 2)[None, :] * s_mc, mask=valid[:, None], other=0)
        fw = gl.load(offsets_bh + words * s_op, mask=valid, other=0)
        shift = ((mc % 2) * 4)[None, :]
        w = (wb.to(gl.int32) >> shift) & 15
        m = (mb.to(gl.int32) >> shift) & 15
        base = fw[:, None] + gl.associative_scan(w, 1, _add) - w
        base3 = gl.expand_dims(gl.convert_layout(base, WQ2), 1)
        w3 = gl.expand_dims(gl.convert_layout(w, WQ2), 1)
        m3 = gl.expand_dims(gl.convert_layout(m, WQ2), 1)
        ptr = words_ptr + base3.to(gl.int64) * s_word
        n = gl.zeros([TW, 4, D], gl.int32, WQ)
        for pl in gl.static_range(min(NPLANES, 4)):
            x = gl.load(ptr + pl * s_word, mask=w3 > pl, other=0)
            n = n | (((x >> q3) & 0x11111111) << pl)
        e = n & 0x0F0F0F0F
        o = (n >> 4) & 0x0F0F0F0F
        for pl in gl.static_range(4, NPLANES):
            x = gl.load(ptr + pl * s_word, mask=w3 > pl, other=0)
            e = e | (((x >> q3) & 0x01010101) << pl)
            o = o | (((x >> (q3 + 4)) & 0x01010101) << pl)
        hbits = (1024 - m3).to(gl.float16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        sub = hbits | (hbits << 16)
        e0, e1, e2, e3 = _bytes_f16(e, sub)
        o0, o1, o2, o3 = _bytes_f16(o, sub)
        t = gl.join(gl.join(gl.join(e0, o0), gl.join(e2, o2)), gl.join(gl.join(e1, o1), gl.join(e3, o3)))
        t = gl.reshape(gl.permute(t, (2, 0, 3, 4, 1, 5)), [D, NT])
        gl.thread_barrier()  # the previous tile's reads are done
        tile_smem.store(t)
        gl.thread_barrier()
        kt = tile_smem.permute((1, 0)).load(A)
        sp = mma_v2(kt, qt, gl.zeros([NT, 8], gl.float32, MMA))

        tok = tile * NT + phys
        on = tok < word_end * 32
        sc = gl.load(scale_bh + (tok // BLOCK) * s_sn + (tok % BLOCK) * s_sx, mask=on, other=0.0).to(gl.float32)
        ze = gl.load(zero_bh + (tok // BLOCK) * s_zn + (tok % BLOCK) * s_zx, mask=on, other=0.0).to(gl.float32)
        scores = ze[:, None] * qsum[None, :] + sc[:, None] * sp
        gl.store(out_cols[None, :] + tok[:, None] * s_outt, scores, mask=on[:, None] & (nS < GROUP)[None, :])
