"""Prototype: the K product from a tile unpacked as in pv_gluon.py, through shared memory (Gluon).

``S'^T [T, 8] = K [T, D] . q^T [D, 8]`` reduces over channels, which an MMA fragment spreads
over the 4 lanes of a quad; K's tokens sit on the 8 quads. So the cheap unpack of the V
prototype (4 lanes share a channel's plane words, nibble lane q each) cannot feed the
fragment directly: the tile ``K^T [D, T]`` is unpacked in that layout, stored to shared
memory and read back transposed (ldmatrix) as the A operand. Slot ``k`` of the tile holds
token ``32 w + 8 r0 + 16 r1 + 4 r2 + q`` as in pv_gluon.py; the scores follow.
Token grouping, pack 32, min_bits 4, widths <= 8 (NPLANES planes). Its unpack, staging and
query operand are attention_gluon.py's.
(A first version gave each lane one byte lane of 32 channels, 8 lanes sharing a load:
11.7 instructions a value, 160 loads a word and thread; see docs/notes/kernels.md.)
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from packkv.kernels.attention_gluon import SHARED, _k_scores, _query_operand
from packkv.kernels.planes import side_pointers, split_tiles
from packkv.kernels.pv_gluon import _slot_tokens, _tile_meta, _token_values


@gluon.jit
def _qk_gluon(
    q_ptr, out_ptr,
    words_ptr, offsets_ptr, widths_ptr, mins_ptr, scale_ptr, zero_ptr,
    s_word, s_ob, s_oh, s_op, s_wb, s_wh, s_wp, s_wc, s_mb, s_mh, s_mp, s_mc,
    s_sb, s_sh, s_sn, s_sx, s_zb, s_zh, s_zn, s_zx,
    s_qb, s_qh, s_qd, s_outb, s_outh, s_outt,
    heads, n_words, tiles_per_split,
    GROUP: gl.constexpr, D: gl.constexpr, BLOCK: gl.constexpr, TW: gl.constexpr, NPLANES: gl.constexpr,
    MMA: gl.constexpr, WQ: gl.constexpr, META: gl.constexpr,
):
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
    col_scale = gl.convert_layout(pw, gl.SliceLayout(0, MMA))
    mw = gl.arange(0, TW, layout=gl.SliceLayout(1, META))
    mc = gl.arange(0, D, layout=gl.SliceLayout(0, META))
    q3 = gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, WQ))), 0), 2)
    token = _slot_tokens(gl.arange(0, NT, layout=gl.SliceLayout(1, MMA)))
    nS = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))
    out_cols = out_ptr + b * s_outb + (h * GROUP + nS) * s_outh
    tile_smem = gl.allocate_shared_memory(gl.float16, [D, NT], SHARED)
    for tile in range(first, last):
        wb, mb, fw = _tile_meta(widths_bh, mins_bh, offsets_bh, tile, word_end, mw, mc, s_wp, s_wc, s_mp, s_mc, s_op, TW)
        tok = tile * NT + token
        on = tok < word_end * 32
        sc = _token_values(scale_bh, tok, on, s_sn, s_sx, BLOCK)
        ze = _token_values(zero_bh, tok, on, s_zn, s_zx, BLOCK)
        scores = _k_scores(words_ptr, s_word, wb, mb, fw, mc, q3, qt, qsum, sc, ze, tile_smem, WQ, A, MMA, NT, D,
                           NPLANES) * col_scale[None, :]
        gl.store(out_cols[None, :] + tok[:, None] * s_outt, scores, mask=on[:, None] & (nS < GROUP)[None, :])
