"""Prototype: the V product with the unpacked tile built in the MMA operand's registers (Gluon).

Each lane of an m16n8k16 B fragment holds 4 tokens (k) of one channel (n); tokens may be
permuted freely (the weights follow), so lane q = lane % 4 takes nibble lane q of every
plane word (tokens 4i + q) and the fragment slots map to tokens by
phys(k) = 32 w + 8 r0 + 16 r1 + 4 r2 + q for k = 32 w + 16 r2 + 8 r1 + 2 q + r0.
No shared memory for V; loads of a plane word are shared by the 4 lanes of a channel.
Token grouping, pack 32, min_bits 4, widths <= 4 (NPLANES planes).
"""

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2


def layouts(D: int, NW: int, TW: int):
    """MMA layout of out^T [D, 8] (warps along channels), the word-q layout of [TW, 4, D]
    (what the A fragments of V^T [D, TW * 32] hold before the tokens are spread), and the
    metadata layout."""
    MMA = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1], instr_shape=[16, 8])
    regs = [[0, 0, 8]] + [[1 << i, 0, 0] for i in range(TW.bit_length() - 1)]
    n = 16 * NW
    while n < D:
        regs.append([0, 0, n])
        n *= 2
    warps = [[0, 0, 16 << i] for i in range(NW.bit_length() - 1)]
    WQ = gl.DistributedLinearLayout(reg_bases=regs, lane_bases=[[0, 1, 0], [0, 2, 0], [0, 0, 1], [0, 0, 2], [0, 0, 4]],
                                    warp_bases=warps, block_bases=[], shape=[TW, 4, D])
    # widths for the prefix sum: 4 channels a thread, a warp a word (warps beyond TW repeat)
    META = gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[1, 32], warps_per_cta=[NW, 1], order=[1, 0])
    # weights^T [TW * 32, 8]: a token a thread, its 8 (padded) query rows in registers
    WB = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32, 1], warps_per_cta=[NW, 1], order=[1, 0])
    return MMA, WQ, META, WB


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _bytes_f16(a, sub):
    return gl.inline_asm_elementwise(
        "{.reg .b32 c, t0, t1;\n"
        "mov.b32 c, 0x64646464;\n"
        "prmt.b32 t0, $4, c, 0x4140;\n"
        "prmt.b32 t1, $4, c, 0x4342;\n"
        "sub.f16x2 t0, t0, $5;\n"
        "sub.f16x2 t1, t1, $5;\n"
        "mov.b32 {$0, $1}, t0;\n"
        "mov.b32 {$2, $3}, t1;}",
        "=h,=h,=h,=h,r,r", [a, sub], dtype=(gl.float16, gl.float16, gl.float16, gl.float16), is_pure=True, pack=1)


@gluon.jit
def _pv_gluon(
    p_ptr, part_ptr,
    words_ptr, offsets_ptr, widths_ptr, mins_ptr, scale_ptr, zero_ptr,
    s_word, s_ob, s_oh, s_op, s_wb, s_wh, s_wp, s_wc, s_mb, s_mh, s_mp, s_mc,
    s_sb, s_sh, s_sn, s_sx, s_zb, s_zh, s_zn, s_zx,
    s_pb, s_ph, s_pt, s_partb, s_parth, s_parts,
    heads, n_words, tiles_per_split,
    GROUP: gl.constexpr, D: gl.constexpr, BLOCK: gl.constexpr, TW: gl.constexpr, NPLANES: gl.constexpr,
    MMA: gl.constexpr, WQ: gl.constexpr, META: gl.constexpr, WB: gl.constexpr,
):
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    NT: gl.constexpr = TW * 32
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

    # metadata layout indices [TW, D]
    mw = gl.arange(0, TW, layout=gl.SliceLayout(1, META))
    mc = gl.arange(0, D, layout=gl.SliceLayout(0, META))
    # word-q layout indices [TW, 4, D]
    WQ2: gl.constexpr = gl.SliceLayout(1, WQ)  # [TW, D]
    qi = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, WQ)))
    q3 = gl.expand_dims(gl.expand_dims(qi, 0), 2)  # [1, 4, 1]
    # weights^T [NT, 8] token indices (loaded in WB, then moved to the B fragments)
    kB = gl.arange(0, NT, layout=gl.SliceLayout(1, WB))
    kk = kB % 32
    phys = (kB // 32) * 32 + 8 * (kk & 1) + 16 * ((kk >> 3) & 1) + 4 * ((kk >> 4) & 1) + ((kk >> 1) & 3)
    rowsB = gl.arange(0, 8, layout=gl.SliceLayout(0, WB))
    p_rows = p_ptr + b * s_pb + (h * GROUP + rowsB) * s_ph
    row_on = rowsB < GROUP
    zacc = gl.zeros([NT, 8], gl.float32, WB)

    acc = gl.zeros([D, 8], gl.float32, MMA)
    for tile in range(first, last):
        words = tile * TW + mw
        valid = words < word_end
        wb = gl.load(widths_bh + words[:, None] * s_wp + (mc // 2)[None, :] * s_wc, mask=valid[:, None], other=0)
        mb = gl.load(mins_bh + words[:, None] * s_mp + (mc // 2)[None, :] * s_mc, mask=valid[:, None], other=0)
        fw = gl.load(offsets_bh + words * s_op, mask=valid, other=0)
        shift = ((mc % 2) * 4)[None, :]
        w = (wb.to(gl.int32) >> shift) & 15
        m = (mb.to(gl.int32) >> shift) & 15
        starts = gl.associative_scan(w, 1, _add) - w
        base = fw[:, None] + starts
        # to the word-q layout (channels as the A fragments hold them)
        base3 = gl.expand_dims(gl.convert_layout(base, WQ2), 1)
        w3 = gl.expand_dims(gl.convert_layout(w, WQ2), 1)
        m3 = gl.expand_dims(gl.convert_layout(m, WQ2), 1)
        ptr = words_ptr + base3.to(gl.int64) * s_word
        n = gl.zeros([TW, 4, D], gl.int32, WQ)
        for pl in gl.static_range(NPLANES):
            x = gl.load(ptr + pl * s_word, mask=w3 > pl, other=0)
            n = n | (((x >> q3) & 0x11111111) << pl)
        e = n & 0x0F0F0F0F
        o = (n >> 4) & 0x0F0F0F0F
        hbits = (1024 - m3).to(gl.float16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        sub = hbits | (hbits << 16)
        e0, e1, e2, e3 = _bytes_f16(e, sub)
        o0, o1, o2, o3 = _bytes_f16(o, sub)
        # dims [TW, 4, D, r2, r1, r0]; r0 (the outermost join) is the fastest register
        t = gl.join(gl.join(gl.join(e0, o0), gl.join(e2, o2)), gl.join(gl.join(e1, o1), gl.join(e3, o3)))
        t = gl.reshape(gl.permute(t, (2, 0, 3, 4, 1, 5)), [D, NT])
        vt = gl.convert_layout(t, A, assert_trivial=True)

        tok = tile * NT + phys
        on = tok < word_end * 32
        sc = gl.load(scale_bh + (tok // BLOCK) * s_sn + (tok % BLOCK) * s_sx, mask=on, other=0.0).to(gl.float32)
        ze = gl.load(zero_bh + (tok // BLOCK) * s_zn + (tok % BLOCK) * s_zx, mask=on, other=0.0).to(gl.float32)
        pw = gl.load(p_rows[None, :] + tok[:, None] * s_pt, mask=row_on[None, :] & on[:, None], other=0.0).to(gl.float32)
        # prototype: weights of at most 1 (softmax), no per-row rescaling before fp16
        zacc += pw * ze[:, None]
        bw = gl.convert_layout((pw * sc[:, None]).to(gl.float16), B)
        acc = mma_v2(vt, bw, acc)
    acc += gl.convert_layout(gl.sum(zacc, axis=0), gl.SliceLayout(0, MMA))[None, :]
    chan = gl.arange(0, D, layout=gl.SliceLayout(1, MMA))
    rows = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))
    out_ptrs = part_ptr + b * s_partb + (h * GROUP + rows[None, :]) * s_parth + split * s_parts + chan[:, None]
    gl.store(out_ptrs, acc, mask=(rows < GROUP)[None, :])


# ---- software-pipelined version: tile i+1's planes and weights, tile i+2's metadata in flight ----

@gluon.jit
def _fetch_meta(widths_bh, mins_bh, offsets_bh, tile, word_end, mw, mc, s_wp, s_wc, s_mp, s_mc, s_op,
                TW: gl.constexpr):
    """Issue the loads of a tile's width and minimum bytes [TW, D] and its packs' first words."""
    words = tile * TW + mw
    valid = words < word_end
    wb = gl.load(widths_bh + words[:, None] * s_wp + (mc // 2)[None, :] * s_wc, mask=valid[:, None], other=0)
    mb = gl.load(mins_bh + words[:, None] * s_mp + (mc // 2)[None, :] * s_mc, mask=valid[:, None], other=0)
    fw = gl.load(offsets_bh + words * s_op, mask=valid, other=0)
    return wb, mb, fw


@gluon.jit
def _stage_planes(words_ptr, s_word, wb, mb, fw, mc, WQ2: gl.constexpr, NPLANES: gl.constexpr):
    """Decode a tile's metadata (loaded a step earlier) and issue its plane loads [TW, 1, D];
    planes from NPLANES up are zero. Also returns the minima [TW, 1, D]."""
    shift = ((mc % 2) * 4)[None, :]
    w = (wb.to(gl.int32) >> shift) & 15
    m = (mb.to(gl.int32) >> shift) & 15
    base = fw[:, None] + gl.associative_scan(w, 1, _add) - w
    base3 = gl.expand_dims(gl.convert_layout(base, WQ2), 1)
    w3 = gl.expand_dims(gl.convert_layout(w, WQ2), 1)
    m3 = gl.expand_dims(gl.convert_layout(m, WQ2), 1)
    ptr = words_ptr + base3.to(gl.int64) * s_word
    x0 = gl.load(ptr, mask=w3 > 0, other=0)
    x1 = gl.zeros_like(x0)
    x2 = gl.zeros_like(x0)
    x3 = gl.zeros_like(x0)
    if NPLANES > 1:
        x1 = gl.load(ptr + s_word, mask=w3 > 1, other=0)
    if NPLANES > 2:
        x2 = gl.load(ptr + 2 * s_word, mask=w3 > 2, other=0)
    if NPLANES > 3:
        x3 = gl.load(ptr + 3 * s_word, mask=w3 > 3, other=0)
    return x0, x1, x2, x3, m3


@gluon.jit
def _fetch_weights(p_rows, scale_bh, zero_bh, tile, word_end, phys, row_on, s_pt, s_sn, s_sx, s_zn, s_zx,
                   NT: gl.constexpr, BLOCK: gl.constexpr):
    """Issue the loads of a tile's weights^T [NT, 8] and token steps and minima [NT] (fp16)."""
    tok = tile * NT + phys
    on = tok < word_end * 32
    sc = gl.load(scale_bh + (tok // BLOCK) * s_sn + (tok % BLOCK) * s_sx, mask=on, other=0.0)
    ze = gl.load(zero_bh + (tok // BLOCK) * s_zn + (tok % BLOCK) * s_zx, mask=on, other=0.0)
    pw = gl.load(p_rows[None, :] + tok[:, None] * s_pt, mask=row_on[None, :] & on[:, None], other=0.0)
    return pw, sc, ze


@gluon.jit
def _v_operand(x0, x1, x2, x3, m3, q3, A: gl.constexpr, NT: gl.constexpr, D: gl.constexpr):
    """The tile's V^T [D, NT] as A fragments, from its planes (nibble lane q of each word)."""
    n = ((x0 >> q3) & 0x11111111) | (((x1 >> q3) & 0x11111111) << 1) | (((x2 >> q3) & 0x11111111) << 2) \
        | (((x3 >> q3) & 0x11111111) << 3)
    e = n & 0x0F0F0F0F
    o = (n >> 4) & 0x0F0F0F0F
    hbits = (1024 - m3).to(gl.float16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    sub = hbits | (hbits << 16)
    e0, e1, e2, e3 = _bytes_f16(e, sub)
    o0, o1, o2, o3 = _bytes_f16(o, sub)
    t = gl.join(gl.join(gl.join(e0, o0), gl.join(e2, o2)), gl.join(gl.join(e1, o1), gl.join(e3, o3)))
    t = gl.reshape(gl.permute(t, (2, 0, 3, 4, 1, 5)), [D, NT])
    return gl.convert_layout(t, A, assert_trivial=True)


@gluon.jit
def _pv_gluon_pipe(
    p_ptr, part_ptr,
    words_ptr, offsets_ptr, widths_ptr, mins_ptr, scale_ptr, zero_ptr,
    s_word, s_ob, s_oh, s_op, s_wb, s_wh, s_wp, s_wc, s_mb, s_mh, s_mp, s_mc,
    s_sb, s_sh, s_sn, s_sx, s_zb, s_zh, s_zn, s_zx,
    s_pb, s_ph, s_pt, s_partb, s_parth, s_parts,
    heads, n_words, tiles_per_split,
    GROUP: gl.constexpr, D: gl.constexpr, BLOCK: gl.constexpr, TW: gl.constexpr, NPLANES: gl.constexpr,
    MMA: gl.constexpr, WQ: gl.constexpr, META: gl.constexpr, WB: gl.constexpr,
):
    """_pv_gluon with a software pipeline (same arguments, same result)."""
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
    mw = gl.arange(0, TW, layout=gl.SliceLayout(1, META))
    mc = gl.arange(0, D, layout=gl.SliceLayout(0, META))
    qi = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, WQ)))
    q3 = gl.expand_dims(gl.expand_dims(qi, 0), 2)
    kB = gl.arange(0, NT, layout=gl.SliceLayout(1, WB))
    kk = kB % 32
    phys = (kB // 32) * 32 + 8 * (kk & 1) + 16 * ((kk >> 3) & 1) + 4 * ((kk >> 4) & 1) + ((kk >> 1) & 3)
    rowsB = gl.arange(0, 8, layout=gl.SliceLayout(0, WB))
    p_rows = p_ptr + b * s_pb + (h * GROUP + rowsB) * s_ph
    row_on = rowsB < GROUP
    zacc = gl.zeros([NT, 8], gl.float32, WB)
    acc = gl.zeros([D, 8], gl.float32, MMA)

    wb, mb, fw = _fetch_meta(widths_bh, mins_bh, offsets_bh, first, word_end, mw, mc, s_wp, s_wc, s_mp, s_mc, s_op, TW)
    x0, x1, x2, x3, m3 = _stage_planes(words_ptr, s_word, wb, mb, fw, mc, WQ2, NPLANES)
    pw, sc, ze = _fetch_weights(p_rows, scale_bh, zero_bh, first, word_end, phys, row_on, s_pt, s_sn, s_sx, s_zn,
                                s_zx, NT, BLOCK)
    wb, mb, fw = _fetch_meta(widths_bh, mins_bh, offsets_bh, first + 1, word_end, mw, mc, s_wp, s_wc, s_mp, s_mc,
                             s_op, TW)
    for tile in range(first, last):
        n0, n1, n2, n3, nm3 = _stage_planes(words_ptr, s_word, wb, mb, fw, mc, WQ2, NPLANES)
        npw, nsc, nze = _fetch_weights(p_rows, scale_bh, zero_bh, tile + 1, word_end, phys, row_on, s_pt, s_sn, s_sx,
                                       s_zn, s_zx, NT, BLOCK)
        wb, mb, fw = _fetch_meta(widths_bh, mins_bh, offsets_bh, tile + 2, word_end, mw, mc, s_wp, s_wc, s_mp, s_mc,
                                 s_op, TW)
        vt = _v_operand(x0, x1, x2, x3, m3, q3, A, NT, D)
        pf = pw.to(gl.float32)
        zacc += pf * ze.to(gl.float32)[:, None]
        bw = gl.convert_layout((pf * sc.to(gl.float32)[:, None]).to(gl.float16), B)
        acc = mma_v2(vt, bw, acc)
        x0, x1, x2, x3, m3 = n0, n1, n2, n3, nm3
        pw, sc, ze = npw, nsc, nze
    acc += gl.convert_layout(gl.sum(zacc, axis=0), gl.SliceLayout(0, MMA))[None, :]
    chan = gl.arange(0, D, layout=gl.SliceLayout(1, MMA))
    rows = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))
    out_ptrs = part_ptr + b * s_partb + (h * GROUP + rows[None, :]) * s_parth + split * s_parts + chan[:, None]
    gl.store(out_ptrs, acc, mask=(rows < GROUP)[None, :])
