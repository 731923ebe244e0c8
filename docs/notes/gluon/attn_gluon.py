"""Prototype: fused decode attention over the packed blocks in Gluon, with pv_gluon's V side.

Per tile of TW words: the K^T tile is unpacked as in pv_gluon (nibble lanes), staged in
shared memory and read back transposed as the A operand of ``S'^T = K . q^T`` (warps along
tokens); the scores (token steps and minima applied) go to the B fragments of the V
product, where every warp holds the whole tile, so the online softmax's row maxima need no
barrier; ``P^T`` (at most 1, fp16) multiplies V^T unpacked straight into the A fragments
(pv_gluon._v_operand). K and V share the token order of a slot (the same unpack), so P
needs no permutation. Each program writes its split's (m, l, acc) as decode_attention.py's
kernel does, for its _combine_kernel to merge; the fp16 tail is left out. Token grouping, pack 32, min_bits 4, K widths <= 8, V <= 4.
"""

from qk_gluon import SHARED, _k_scores, _query_operand
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from packkv.kernels.planes import side_pointers, split_tiles
from packkv.kernels.pv_gluon import _slot_tokens, _tile_meta, _token_values, _v_operand


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
    MMA: gl.constexpr, WQ: gl.constexpr, META: gl.constexpr,
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
    first, last, word_end = split_tiles(split, tiles_per_split, n_words, TW)
    k_off, k_wd, k_mn, k_sc, k_ze = side_pointers(
        ko_ptr, kwd_ptr, kmn_ptr, ks_ptr, kz_ptr, b, h, k_s_ob, k_s_oh, k_s_wb, k_s_wh, k_s_mb, k_s_mh, k_s_sb, k_s_sh,
        k_s_zb, k_s_zh)
    v_off, v_wd, v_mn, v_sc, v_ze = side_pointers(
        vo_ptr, vwd_ptr, vmn_ptr, vs_ptr, vz_ptr, b, h, v_s_ob, v_s_oh, v_s_wb, v_s_wh, v_s_mb, v_s_mh, v_s_sb, v_s_sh,
        v_s_zb, v_s_zh)
    qt, qsum = _query_operand(q_ptr, b, h, s_qb, s_qh, s_qd, GROUP, D, B, MMA)
    mw = gl.arange(0, TW, layout=gl.SliceLayout(1, META))
    mc = gl.arange(0, D, layout=gl.SliceLayout(0, META))
    q3 = gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, WQ))), 0), 2)
    token = _slot_tokens(gl.arange(0, NT, layout=gl.SliceLayout(1, MMA)))
    tile_smem = gl.allocate_shared_memory(gl.float16, [D, NT], SHARED)

    m_i = gl.full([8], -float("inf"), gl.float32, gl.SliceLayout(0, B))
    l_acc = gl.zeros([NT, 8], gl.float32, B)
    acc = gl.zeros([D, 8], gl.float32, MMA)
    for tile in range(first, last):
        kwb, kmb, kfw = _tile_meta(k_wd, k_mn, k_off, tile, word_end, mw, mc, k_s_wp, k_s_wc, k_s_mp, k_s_mc, k_s_op, TW)
        vwb, vmb, vfw = _tile_meta(v_wd, v_mn, v_off, tile, word_end, mw, mc, v_s_wp, v_s_wc, v_s_mp, v_s_mc, v_s_op, TW)
        tok = tile * NT + token
        on = tok < word_end * 32
        sc = _token_values(k_sc, tok, on, k_s_sn, k_s_sx, BLOCK)
        ze = _token_values(k_ze, tok, on, k_s_zn, k_s_zx, BLOCK)
        vsc = _token_values(v_sc, tok, on, v_s_sn, v_s_sx, BLOCK)
        vze = _token_values(v_ze, tok, on, v_s_zn, v_s_zx, BLOCK)
        s = _k_scores(kw_ptr, k_s_word, kwb, kmb, kfw, mc, q3, qt, qsum, sc, ze, tile_smem, WQ, A, MMA, NT, D,
                      K_PLANES) * qk_scale
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
