"""Prototype: fused decode attention over the packed blocks in Gluon, with pv_gluon's V side.

Per tile of TW words: the K^T tile is unpacked as in pv_gluon (nibble lanes), staged in
shared memory and read back transposed as the A operand of ``S'^T = K . q^T`` (warps along
tokens); the scores (token steps and minima applied) go to the B fragments of the V
product, where every warp holds the whole tile, so the online softmax's row maxima need no
barrier; ``P^T`` (at most 1, fp16) multiplies V^T unpacked straight into the A fragments
(pv_gluon._v_operand). K and V share the token order of a slot (the same unpack), so P
needs no permutation. Each program writes its split's (m, l, acc); the merge and the fp16
tail are left to the caller. Token grouping, pack 32, min_bits 4, K widths <= 8, V <= 4.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from packkv.kernels.pv_gluon import _add, _bytes_f16, _v_operand


@gluon.jit
def _meta(widths_bh, mins_bh, offsets_bh, tile, word_end, mw, mc, s_wp, s_wc, s_mp, s_mc, s_op, TW: gl.constexpr):
    words = tile * TW + mw
    valid = words < word_end
    wb = gl.load(widths_bh + words[:, None] * s_wp + (mc // 2)[None, :] * s_wc, mask=valid[:, None], other=0)
    mb = gl.load(mins_bh + words[:, None] * s_mp + (mc // 2)[None, :] * s_mc, mask=valid[:, None], other=0)
    fw = gl.load(offsets_bh + words * s_op, mask=valid, other=0)
    return wb, mb, fw


@gluon.jit
def _k_tile(words_ptr, s_word, wb, mb, fw, mc, q3, WQ: gl.constexpr, NT: gl.constexpr, D: gl.constexpr,
            NPLANES: gl.constexpr):
    """K^T [D, NT] fp16 in the word-lane layout's order (planes 0-3 in nibbles, 4-7 in bytes)."""
    shift = ((mc % 2) * 4)[None, :]
    w = (wb.to(gl.int32) >> shift) & 15
    m = (mb.to(gl.int32) >> shift) & 15
    base = fw[:, None] + gl.associative_scan(w, 1, _add) - w
    WQ2: gl.constexpr = gl.SliceLayout(1, WQ)
    base3 = gl.expand_dims(gl.convert_layout(base, WQ2), 1)
    w3 = gl.expand_dims(gl.convert_layout(w, WQ2), 1)
    m3 = gl.expand_dims(gl.convert_layout(m, WQ2), 1)
    ptr = words_ptr + base3.to(gl.int64) * s_word
    n = gl.zeros([wb.shape[0], 4, D], gl.int32, WQ)
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
    return gl.reshape(gl.permute(t, (2, 0, 3, 4, 1, 5)), [D, NT])


@gluon.jit(do_not_specialize=['heads', 'n_words', 'tiles_per_split'])
def _attn_gluon(
    q_ptr, m_ptr, l_ptr, acc_ptr,
    kw_ptr, ko_ptr, kwd_ptr, kmn_ptr, ks_ptr, kz_ptr,
    k_s_word, k_s_ob, k_s_oh, k_s_op, k_s_wb, k_s_wh, k_s_wp, k_s_wc, k_s_mb, k_s_mh, k_s_mp, k_s_mc,
    k_s_sb, k_s_sh, k_s_sn, k_s_sx, k_s_zb, k_s_zh, k_s_zn, k_s_zx,
    vw_ptr, vo_ptr, vwd_ptr, vmn_ptr, vs_ptr, vz_ptr,
    v_s_word, v_s_ob, v_s_oh, v_s_op, v_s_wb, v_s_wh, v_s_wp, v_s_wc, v_s_mb, v_s_mh, v_s_mp, v_s_mc,
    v_s_sb, v_s_sh, v_s_sn, v_s_sx, v_s_zb, v_s_zh, v_s_zn, v_s_zx,
    s_qb, s_qh, s_qd, qk_scale,
    heads, n_words, tiles_per_split, n_split,
    GROUP: gl.constexpr, D: gl.constexpr, BLOCK: gl.constexpr, TW: gl.constexpr,
    K_PLANES: gl.constexpr, V_PLANES: gl.constexpr,
    MMA: gl.constexpr, WQ: gl.constexpr, META: gl.constexpr, SH: gl.constexpr,
):
    """Grid (batch * kv_heads, splits). Writes each split's running max m (log2 units), sum l
    and unnormalized output acc, as decode_attention.py's partials."""
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    NT: gl.constexpr = TW * 32
    pid_bh = gl.program_id(0)
    split = gl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    first = split * tiles_per_split
    last = gl.minimum(first + tiles_per_split, gl.cdiv(n_words, TW))
    word_end = gl.minimum(last * TW, n_words)
    k_off = ko_ptr + b * k_s_ob + h * k_s_oh
    k_wd = kwd_ptr + b * k_s_wb + h * k_s_wh
    k_mn = kmn_ptr + b * k_s_mb + h * k_s_mh
    k_sc = ks_ptr + b * k_s_sb + h * k_s_sh
    k_ze = kz_ptr + b * k_s_zb + h * k_s_zh
    v_off = vo_ptr + b * v_s_ob + h * v_s_oh
    v_wd = vwd_ptr + b * v_s_wb + h * v_s_wh
    v_mn = vmn_ptr + b * v_s_mb + h * v_s_mh
    v_sc = vs_ptr + b * v_s_sb + h * v_s_sh
    v_ze = vz_ptr + b * v_s_zb + h * v_s_zh

    cB = gl.arange(0, D, layout=gl.SliceLayout(1, B))
    gB = gl.arange(0, 8, layout=gl.SliceLayout(0, B))
    qt = gl.load(q_ptr + b * s_qb + (h * GROUP + gB[None, :]) * s_qh + cB[:, None] * s_qd,
                 mask=(gB < GROUP)[None, :], other=0.0).to(gl.float16)
    qsum = gl.convert_layout(gl.sum(qt.to(gl.float32), axis=0), gl.SliceLayout(0, MMA))

    mw = gl.arange(0, TW, layout=gl.SliceLayout(1, META))
    mc = gl.arange(0, D, layout=gl.SliceLayout(0, META))
    q3 = gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, WQ))), 0), 2)
    mS = gl.arange(0, NT, layout=gl.SliceLayout(1, MMA))
    kk = mS % 32
    token = (mS // 32) * 32 + 8 * (kk & 1) + 16 * ((kk >> 3) & 1) + 4 * ((kk >> 4) & 1) + ((kk >> 1) & 3)
    tile_smem = gl.allocate_shared_memory(gl.float16, [D, NT], SH)

    m_i = gl.full([8], -float("inf"), gl.float32, gl.SliceLayout(0, B))
    l_acc = gl.zeros([NT, 8], gl.float32, B)
    acc = gl.zeros([D, 8], gl.float32, MMA)
    for tile in range(first, last):
        kwb, kmb, kfw = _meta(k_wd, k_mn, k_off, tile, word_end, mw, mc, k_s_wp, k_s_wc, k_s_mp, k_s_mc, k_s_op, TW)
        vwb, vmb, vfw = _meta(v_wd, v_mn, v_off, tile, word_end, mw, mc, v_s_wp, v_s_wc, v_s_mp, v_s_mc, v_s_op, TW)
        tok = tile * NT + token
        on = tok < word_end * 32
        sc = gl.load(k_sc + (tok // BLOCK) * k_s_sn + (tok % BLOCK) * k_s_sx, mask=on, other=0.0).to(gl.float32)
        ze = gl.load(k_ze + (tok // BLOCK) * k_s_zn + (tok % BLOCK) * k_s_zx, mask=on, other=0.0).to(gl.float32)
        vsc = gl.load(v_sc + (tok // BLOCK) * v_s_sn + (tok % BLOCK) * v_s_sx, mask=on, other=0.0).to(gl.float32)
        vze = gl.load(v_ze + (tok // BLOCK) * v_s_zn + (tok % BLOCK) * v_s_zx, mask=on, other=0.0).to(gl.float32)
        # K: unpack, through shared memory to the A operand, S'^T = K . q^T
        kt = _k_tile(kw_ptr, k_s_word, kwb, kmb, kfw, mc, q3, WQ, NT, D, K_PLANES)
        gl.thread_barrier()
        tile_smem.store(kt)
        gl.thread_barrier()
        sp = mma_v2(tile_smem.permute((1, 0)).load(A), qt, gl.zeros([NT, 8], gl.float32, MMA))
        s = (ze[:, None] * qsum[None, :] + sc[:, None] * sp) * qk_scale
        s = gl.where(on[:, None], s, -float("inf"))
        # V's token terms ride with the scores: sum_t p_t (vze_t + vsc_t (m + u)) = p.vze + (p vsc).(m + u)
        sb = gl.convert_layout(s, B)
        vscb = gl.convert_layout(vsc, gl.SliceLayout(1, B))
        vzeb = gl.convert_layout(vze, gl.SliceLayout(1, B))
        m_new = gl.maximum(m_i, gl.max(sb, axis=0))
        m_safe = gl.where(m_new > -float("inf"), m_new, 0.0)
        alpha = gl.exp2(m_i - m_safe)
        p = gl.exp2(sb - m_safe[None, :])
        l_acc = l_acc * alpha[None, :] + p
        z = gl.sum(p * vzeb[:, None], axis=0)
        vt = _v_operand(vw_ptr, v_s_word, vwb, vmb, vfw, mc, q3, WQ, A, NT, D, V_PLANES)
        # p * step times 2**8 keeps the weights of small steps out of fp16's subnormals
        pv = mma_v2(vt, (p * (vscb * 256.0)[:, None]).to(gl.float16), gl.zeros([D, 8], gl.float32, MMA))
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(0, MMA))[None, :] + pv * (1.0 / 256.0) \
            + gl.convert_layout(z, gl.SliceLayout(0, MMA))[None, :]
        m_i = m_new
    l_i = gl.sum(l_acc, axis=0)
    # Partials in decode_attention's format (its _combine_kernel merges them): query row
    # r = b * q_heads + h * GROUP + g, index r * n_split + split; acc [.., D].
    rows = gl.arange(0, 8, layout=gl.SliceLayout(0, B))
    row_ids = (b * heads * GROUP + h * GROUP + rows) * n_split + split
    gl.store(m_ptr + row_ids, m_i, mask=rows < GROUP)
    gl.store(l_ptr + row_ids, l_i, mask=rows < GROUP)
    chan = gl.arange(0, D, layout=gl.SliceLayout(1, MMA))
    cols = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))
    col_ids = (b * heads * GROUP + h * GROUP + cols) * n_split + split
    gl.store(acc_ptr + col_ids[None, :] * D + chan[:, None], acc, mask=(cols < GROUP)[None, :])
