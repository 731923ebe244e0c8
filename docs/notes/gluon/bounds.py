"""Timing-only bounds of the Gluon kernels (wrong results on purpose): what the decode attention and the K
and V products would cost if parts of their work were free. Written against the kernels of commit 9fd17e8.

    python3 docs/notes/gluon/bounds.py        # writes the variants into src/packkv/kernels/_bnd_*.py
    PYTHONPATH=src python3 docs/notes/gluon/run_attn.py --variants _bnd_loads,_bnd_free,_bnd_freens,_bnd_stream
    PYTHONPATH=src python3 docs/notes/gluon/run_qk.py --variants _bnd_qkloads,_bnd_qkstream
    PYTHONPATH=src python3 docs/notes/gluon/run_pv.py --variants _bnd_pvloads
    rm src/packkv/kernels/_bnd_*.py

Variants of attention_gluon.py:
- ``_bnd_loads`` (L): the metadata, steps, zeros and both sides' plane words loaded as the kernel loads them
  (widths' prefix sum, predicated 4-byte words a lane); no unpack, no MMA, no softmax. The words are XORed into a
  value the output depends on, so that no load is removed.
- ``_bnd_free`` (U): everything as the kernel does it, but the planes XORed and used as fp16 bits (~0.5
  instructions a value where the unpack takes ~2.5).
- ``_bnd_freens`` (UN): U without the K^T staging through shared memory (head_dim 128).
- ``_bnd_stream`` (S): the same bytes streamed as 16-byte vectors from each split's first pack to its last pack's
  start, with no metadata-dependent address; steps and zeros as the kernel loads them. A ceiling for any format
  with the same bytes read by this kernel's structure (splits, merge, tail program).
Variants of qk_gluon.py: ``_bnd_qkloads`` (L) and ``_bnd_qkstream`` (S), the scores still written; of
pv_gluon.py: ``_bnd_pvloads`` (L).
"""
base = open("src/packkv/kernels/attention_gluon.py").read()


def rep(src, a, b):
    assert src.count(a) == 1, a
    return src.replace(a, b)


body_old = """            kt = _tile_values(k0, k1, k2, k3, k4, k5, k6, k7, km, q3, WQ, NT, D, K_PLANES)
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
"""
loads_body = """            xs = xs ^ (k0 ^ k1 ^ k2 ^ k3 ^ k4 ^ k5 ^ k6 ^ k7 ^ km ^ v0 ^ v1 ^ v2 ^ v3 ^ v4 ^ v5 ^ v6 ^ v7 ^ vm)
            fs = fs + sc + ze + vsc + vze  # BOUND L: loads only
        tot = gl.sum(gl.sum(gl.sum(xs, axis=2), axis=1), axis=0)
        acc = acc + gl.where(tot == 987654321, 1.0, 0.0) + gl.sum(fs, axis=0) * 0.0
"""
loads_init = """        for tile in range(first, last):
            kwb, kmb, kfw = kwb_n, kmb_n, kfw_n"""
loads_init_new = """        xs = gl.expand_dims(gl.zeros([TW, D], gl.int32, gl.SliceLayout(1, WQ)), 1)
        fs = gl.zeros([NT], gl.float32, gl.SliceLayout(1, MMA))
        for tile in range(first, last):
            kwb, kmb, kfw = kwb_n, kmb_n, kfw_n"""
L = rep(rep(base, body_old, loads_body), loads_init, loads_init_new)

cheap = '''

@gluon.jit
def _halves(a):
    """BOUND: the two fp16 halves of int32 ``a`` (no instruction)."""
    return gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [a], dtype=(gl.float16, gl.float16),
                                     is_pure=True, pack=1)


@gluon.jit
def _cheap_values(x0, x1, x2, x3, x4, x5, x6, x7, m3, q3, WQ: gl.constexpr, NT: gl.constexpr, D: gl.constexpr,
                  NPLANES: gl.constexpr):
    """BOUND U: _tile_values' shape and layout at ~0.5 instructions a value (wrong values)."""
    TW: gl.constexpr = x0.shape[0]
    n = (x0 ^ x1 ^ x2 ^ x3 ^ x4 ^ x5 ^ x6 ^ x7 ^ m3) + q3
    e = n & 0x3BFF3BFF
    o = (n >> 3) & 0x3BFF3BFF
    e0, e1 = _halves(e)
    o0, o1 = _halves(o)
    NLO: gl.constexpr = 2 - TW // 2
    t = gl.join(gl.join(gl.join(e0, o0), gl.join(e1, o1)), gl.join(gl.join(e1, o0), gl.join(e0, o1)))
    t = gl.reshape(t, [TW, 4 >> NLO, 1 << NLO, D, 2, 2, 2])
    return gl.reshape(gl.permute(t, (3, 1, 4, 5, 0, 2, 6)), [D, NT])
'''
anchor = "\n\n@gluon.jit\ndef _k_scores("
U = rep(base, anchor, cheap + anchor)
U = rep(U, "            kt = _tile_values(k0, k1, k2, k3, k4, k5, k6, k7, km, q3, WQ, NT, D, K_PLANES)",
        "            kt = _cheap_values(k0, k1, k2, k3, k4, k5, k6, k7, km, q3, WQ, NT, D, K_PLANES)")
U = rep(U, "            vt = _v_operand(_tile_values(v0, v1, v2, v3, v4, v5, v6, v7, vm, q3, WQ, NT, D, V_PLANES), A)",
        "            vt = _v_operand(_cheap_values(v0, v1, v2, v3, v4, v5, v6, v7, vm, q3, WQ, NT, D, V_PLANES), A)")
stage_old = """    _barrier()  # the previous tile's reads are done
    tile_smem.store(kt)
    _barrier()
    sp = mma_v2(tile_smem.permute((1, 0)).load(A), qt, gl.zeros([NT, 8], gl.float32, MMA))"""
stage_new = """    if kt.shape[0] == kt.shape[1]:  # BOUND: no staging (wrong scores)
        sp = mma_v2(gl.convert_layout(kt, A, assert_trivial=True), qt, gl.zeros([NT, 8], gl.float32, MMA))
    else:
        _barrier()
        tile_smem.store(kt)
        _barrier()
        sp = mma_v2(tile_smem.permute((1, 0)).load(A), qt, gl.zeros([NT, 8], gl.float32, MMA))"""
UN = rep(U, stage_old, stage_new)
for name, src in dict(loads=L, free=U, freens=UN).items():
    open(f"src/packkv/kernels/_bnd_{name}.py", "w").write(src)

# K product and V product, loads only
qk = open("src/packkv/kernels/qk_gluon.py").read()
qk = rep(qk, """        kt = _unpacked_tile(words_ptr, s_word, wb, mb, fw, mc, q3, WQ, NT, D, NPLANES)
        scores = _k_scores(kt, qt, qsum, sc, ze, tile_smem, A, MMA, NT) * col_scale[None, :]
        gl.store(out_cols[None, :] + tok[:, None] * s_outt, scores, mask=on[:, None] & (cols < GROUP)[None, :])
""", """        x0, x1, x2, x3, x4, x5, x6, x7, m3 = _tile_words(words_ptr, s_word, wb, mb, fw, mc, WQ, NPLANES)
        xs = xs ^ (x0 ^ x1 ^ x2 ^ x3 ^ x4 ^ x5 ^ x6 ^ x7 ^ m3)  # BOUND: loads only
        scores = gl.zeros([NT, 8], gl.float32, MMA) + (sc + ze)[:, None]
        gl.store(out_cols[None, :] + tok[:, None] * s_outt, scores, mask=on[:, None] & (cols < GROUP)[None, :])
    tot = gl.sum(gl.sum(gl.sum(xs, axis=2), axis=1), axis=0)
    gl.store(out_ptr + cols, gl.zeros([8], gl.float32, gl.SliceLayout(0, MMA)) + 1.0, mask=(cols < 1) & (tot == 987654321))
""")
qk = rep(qk, "    for tile in range(first, last):\n",
         "    xs = gl.expand_dims(gl.zeros([TW, D], gl.int32, gl.SliceLayout(1, WQ)), 1)\n    for tile in range(first, last):\n")
qk = rep(qk, "_token_values, _unpack_indices,", "_token_values, _unpack_indices, _tile_words,")
pv = open("src/packkv/kernels/pv_gluon.py").read()
pv = rep(pv, """        vt = _v_operand(_unpacked_tile(words_ptr, s_word, wb, mb, fw, mc, q3, WQ, NT, D, NPLANES), A)
""", """        x0, x1, x2, x3, x4, x5, x6, x7, m3 = _tile_words(words_ptr, s_word, wb, mb, fw, mc, WQ, NPLANES)
        xs = xs ^ (x0 ^ x1 ^ x2 ^ x3 ^ x4 ^ x5 ^ x6 ^ x7 ^ m3)  # BOUND: loads only
""")
pv = rep(pv, """        out = mma_v2(vt, (weights * (1.0 / pw)[None, :]).to(gl.float16), gl.zeros([D, 8], gl.float32, MMA))
        acc += out * gl.convert_layout(pw, gl.SliceLayout(0, MMA))[None, :]
""", """        acc += gl.convert_layout(gl.sum(weights, axis=0) * pw, gl.SliceLayout(0, MMA))[None, :]
    tot = gl.sum(gl.sum(gl.sum(xs, axis=2), axis=1), axis=0)
    acc += gl.where(tot == 987654321, 1.0, 0.0)
""")
pv = rep(pv, "    for tile in range(first, last):\n",
         "    xs = gl.expand_dims(gl.zeros([TW, D], gl.int32, gl.SliceLayout(1, WQ)), 1)\n    for tile in range(first, last):\n")
open("src/packkv/kernels/_bnd_qkloads.py", "w").write(qk)
open("src/packkv/kernels/_bnd_pvloads.py", "w").write(pv)

# S: the same bytes streamed as 16-byte vectors (no metadata-dependent addresses): a format redesign's ceiling
stream_fn = '''

@gluon.jit
def _stream_xor(w_ptr, off_ptr, s_op, first_word, end_word, TW: gl.constexpr):
    """BOUND S: XOR of the words from pack ``first_word``'s start to pack ``end_word - 1``'s start, 16 bytes a
    thread a load, 4 loads in flight."""
    W: gl.constexpr = gl.num_warps()
    SL: gl.constexpr = gl.BlockedLayout([4], [32], [W], [0])
    CH: gl.constexpr = 4 * 32 * W
    lane = gl.arange(0, CH, layout=SL)
    a = gl.load(off_ptr + first_word * s_op)
    e = gl.load(off_ptr + (end_word - 1) * s_op)
    x = gl.zeros([CH], gl.int32, SL)
    a4 = (a // 4) * 4
    e = ((e + 3) // 4) * 4
    for it in range(0, (e - a4 + 4 * CH - 1) // (4 * CH)):
        i0 = a4 + it * (4 * CH) + lane
        y0 = gl.load(w_ptr + i0, mask=i0 < e, other=0)
        y1 = gl.load(w_ptr + i0 + CH, mask=i0 + CH < e, other=0)
        y2 = gl.load(w_ptr + i0 + 2 * CH, mask=i0 + 2 * CH < e, other=0)
        y3 = gl.load(w_ptr + i0 + 3 * CH, mask=i0 + 3 * CH < e, other=0)
        x = x ^ y0 ^ y1 ^ y2 ^ y3
    return gl.sum(x, axis=0)
'''
S = rep(base, anchor, stream_fn + anchor)
S = rep(S, body_old, """            fs = fs + sc + ze + vsc + vze  # BOUND S: steps and zeros; words streamed below
        tot = _stream_xor(kw_ptr, k_off, ks_op, first * TW, gl.minimum(last * TW, word_end), TW) \\
            + _stream_xor(vw_ptr, v_off, vs_op, first * TW, gl.minimum(last * TW, word_end), TW)
        acc = acc + gl.where(tot == 987654321, 1.0, 0.0) + gl.sum(fs, axis=0) * 0.0
""")
S = rep(S, loads_init, """        fs = gl.zeros([NT], gl.float32, gl.SliceLayout(1, MMA))
        for tile in range(first, last):
            kwb, kmb, kfw = kwb_n, kmb_n, kfw_n""")
S = rep(S, """            k0, k1, k2, k3, k4, k5, k6, k7, km = _tile_words(kw_ptr, ks_word, kwb, kmb, kfw, mc, WQ, K_PLANES)
            v0, v1, v2, v3, v4, v5, v6, v7, vm = _tile_words(vw_ptr, vs_word, vwb, vmb, vfw, mc, WQ, V_PLANES)
""", "")
S = rep(S, """            kwb_n, kmb_n, kfw_n = _tile_meta(k_wd, k_mn, k_off, tile + 1, word_end, mw, mc, ks_wp, ks_wc, ks_mp, ks_mc,
                                             ks_op, TW)
            vwb_n, vmb_n, vfw_n = _tile_meta(v_wd, v_mn, v_off, tile + 1, word_end, mw, mc, vs_wp, vs_wc, vs_mp, vs_mc,
                                             vs_op, TW)
""", "")
open("src/packkv/kernels/_bnd_stream.py", "w").write(S)

qs = open("src/packkv/kernels/qk_gluon.py").read()
qs = rep(qs, """        wb, mb, fw = _tile_meta(widths_bh, mins_bh, offsets_bh, tile, word_end, mw, mc, s_wp, s_wc, s_mp, s_mc, s_op, TW)
""", "")
qs = rep(qs, """        kt = _unpacked_tile(words_ptr, s_word, wb, mb, fw, mc, q3, WQ, NT, D, NPLANES)
        scores = _k_scores(kt, qt, qsum, sc, ze, tile_smem, A, MMA, NT) * col_scale[None, :]
        gl.store(out_cols[None, :] + tok[:, None] * s_outt, scores, mask=on[:, None] & (cols < GROUP)[None, :])
""", """        scores = gl.zeros([NT, 8], gl.float32, MMA) + (sc + ze)[:, None]  # BOUND S
        gl.store(out_cols[None, :] + tok[:, None] * s_outt, scores, mask=on[:, None] & (cols < GROUP)[None, :])
    tot = _stream_xor(words_ptr, offsets_bh, s_op, first * TW, gl.minimum(last * TW, word_end), TW)
    gl.store(out_ptr + cols, gl.zeros([8], gl.float32, gl.SliceLayout(0, MMA)) + 1.0, mask=(cols < 1) & (tot == 987654321))
""")
qs = rep(qs, "from .attention_gluon import", "from ._bnd_stream import _stream_xor\nfrom .attention_gluon import")
open("src/packkv/kernels/_bnd_qkstream.py", "w").write(qs)
