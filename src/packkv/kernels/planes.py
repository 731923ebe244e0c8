"""Triton building blocks shared by the kernels: read a pack, unpack its bit planes in
registers, and the products of one 32-token word of packed K or V with the query group.

A program works on one (batch, KV head) and a tile of 16 query rows (the GQA group,
zero-padded) so that ``tl.dot`` runs on tensor cores. The 32 tokens of a plane word are
unpacked into a ``[32, D]`` tile whose row r holds token
``tile_tokens()[r] = r // 2 + 16 * (r % 2)`` (the order of two-tokens-a-lane unpacking). The pack minimum is added to
the integers, so ``v = m + u`` multiplies the folded query or weights directly.
``v < 2**11`` is exact in fp16; the fp32 operand on the other side is split as
``norm * (hi + lo)`` with fp16 ``hi``, ``lo``: two fp16 products with fp32 accumulation
are fp32-accurate (about 2**-22 relative). Wider packs (rel < ~1/1024) add a product of
the high bits.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..codec.format import PackedTensor


def packed_args(packed: PackedTensor) -> list:
    """The flat kernel arguments of a PackedTensor: its six tensors, then every stride.

    Order: words, offsets, widths, mins, scale, zero, words stride, offsets strides (3),
    widths strides (4), mins strides (4), scale strides (4), zero strides (4). Strides let
    the kernels read views of larger preallocated tensors.
    """
    tensors = [packed.words, packed.offsets, packed.widths, packed.mins, packed.scale, packed.zero]
    strides = [packed.words.stride(0)]
    for t in tensors[1:]:
        strides.extend(t.stride())
    return tensors + strides


@triton.jit
def tile_tokens():
    """Token (0..31, within its plane word) of each row of an unpacked ``[32, D]`` tile."""
    r = tl.arange(0, 32)
    return r // 2 + 16 * (r % 2)


@triton.jit
def pack_meta(widths_bh, mins_bh, pack, s_wp, s_wc, s_mp, s_mc, D: tl.constexpr, MIN_BITS: tl.constexpr):
    """Widths, minima, first plane of each channel and the widest channel of one pack.

    Widths are 4-bit codes, channel 2i in the low nibble of byte i; minima likewise for
    min_bits 4, bytes for 8, absent (0) for 0. Returns int32 ``[D]`` x3 and a scalar.
    """
    chan = tl.arange(0, D)
    nibble_shift = (chan % 2) * 4
    w = (tl.load(widths_bh + pack * s_wp + (chan // 2) * s_wc).to(tl.int32) >> nibble_shift) & 15
    if MIN_BITS == 4:
        m = (tl.load(mins_bh + pack * s_mp + (chan // 2) * s_mc).to(tl.int32) >> nibble_shift) & 15
    elif MIN_BITS == 8:
        m = tl.load(mins_bh + pack * s_mp + chan * s_mc).to(tl.int32)
    else:
        m = tl.zeros([D], dtype=tl.int32)
    starts = tl.cumsum(w, 0) - w  # planes before channel c: its first word, in planes
    return w, m, starts, tl.max(w, 0)


@triton.jit
def unpack_word(
    words_ptr, s_word, base, w, m, starts, max_w, word_in_plane,
    WPP: tl.constexpr, D: tl.constexpr, PAIRED: tl.constexpr,
):
    """Quantized integers ``m + u`` of the 32 tokens of one plane word: int32 ``[32, D]``.

    Plane b of channel c is the word ``base + (starts[c] + b) * WPP + word_in_plane``: one
    [D] gather a plane; channels narrower than b load nothing. Rows follow tile_tokens().
    ``PAIRED`` unpacks two tokens a lane (j and j + 16: one shift and one mask a plane for
    both) and interleaves the halves; else one token a lane. Measured on an H100, pairs
    are faster where the tile is transposed for the K product, single lanes for V.
    """
    if PAIRED:
        lane = tl.arange(0, 16)
        u = tl.zeros([16, D], dtype=tl.int32)
        for b in range(0, max_w):
            x = tl.load(words_ptr + (base + (starts + b) * WPP + word_in_plane) * s_word, mask=b < w, other=0)
            # Bits j and j + 16 of x land at 0 and 16; the arithmetic shift fills only bits >= 17.
            u |= ((x[None, :] >> lane[:, None]) & 0x00010001) << b
        pair = tl.join(u & 0xFFFF, u >> 16)  # [16, D, 2]: tokens j and j + 16
        v = tl.reshape(tl.permute(pair, (0, 2, 1)), (32, D))
    else:
        tok = tile_tokens()
        v = tl.zeros([32, D], dtype=tl.int32)
        for b in range(0, max_w):
            x = tl.load(words_ptr + (base + (starts + b) * WPP + word_in_plane) * s_word, mask=b < w, other=0)
            v |= ((x[None, :] >> tok[:, None]) & 1) << b
    return v + m[None, :]


@triton.jit
def split_rows(x):
    """``x`` fp32 ``[M, N]`` as ``norm[:, None] * (hi + lo)``, fp16 ``hi``/``lo``, |hi| <= 1."""
    amax = tl.max(tl.abs(x), axis=1)
    norm = tl.where(amax > 0, amax, 1.0)
    xn = x * (1.0 / norm)[:, None]
    hi = xn.to(tl.float16)
    lo = (xn - hi.to(tl.float32)).to(tl.float16)
    return hi, lo, norm


@triton.jit
def dot_split(hi, lo, norm, v, max_w):
    """``norm[:, None] * ((hi + lo) @ v)`` fp32, for fp16 ``hi, lo [M, K]`` and int ``v [K, N]``.

    ``v = m + u < 2**max_w + 2**8`` is exact in fp16 below 2048, so for max_w <= 10.
    """
    v_low = (v & 2047).to(tl.float16)
    acc = tl.dot(hi, v_low) + tl.dot(lo, v_low)
    if max_w > 10:
        v_high = (v >> 11).to(tl.float16)
        acc += 2048.0 * (tl.dot(hi, v_high) + tl.dot(lo, v_high))
    return acc * norm[:, None]


@triton.jit
def v_word_product(
    p, words_ptr, s_word, base, w, m, starts, max_w, word_in_plane,
    scale_bh, zero_bh, block, tok_in_block, s_sn, s_sx, s_zn, s_zx,
    WPP: tl.constexpr, D: tl.constexpr, TOKEN_GROUPED: tl.constexpr,
):
    """``p . V`` over one 32-token word of a pack, fp32 ``[16, D]``.

    ``p [16, 32]`` weights and ``tok_in_block [32]`` block positions, both in tile_tokens()
    order. Token grouping folds the token scales into the weights, ``b = p * scale``:
    ``out_c = sum(p * zero) + b . (m + u)[:, c]``; channel grouping gives
    ``out_c = zero_c * sum(p) + scale_c * p . (m + u)[:, c]``.
    """
    v = unpack_word(words_ptr, s_word, base, w, m, starts, max_w, word_in_plane, WPP, D, False)
    if TOKEN_GROUPED:
        scale = tl.load(scale_bh + block * s_sn + tok_in_block * s_sx).to(tl.float32)
        zero = tl.load(zero_bh + block * s_zn + tok_in_block * s_zx).to(tl.float32)
        b_hi, b_lo, b_norm = split_rows(p * scale[None, :])
        out = tl.sum(p * zero[None, :], axis=1)[:, None] + dot_split(b_hi, b_lo, b_norm, v, max_w)
    else:
        chan = tl.arange(0, D)
        scale = tl.load(scale_bh + block * s_sn + chan * s_sx).to(tl.float32)
        zero = tl.load(zero_bh + block * s_zn + chan * s_zx).to(tl.float32)
        p_hi, p_lo, p_norm = split_rows(p)
        out = zero[None, :] * tl.sum(p, axis=1)[:, None] + scale[None, :] * dot_split(p_hi, p_lo, p_norm, v, max_w)
    return out


@triton.jit
def k_block_query(q, q_hi, q_lo, q_norm, scale_bh, zero_bh, block, s_sn, s_sx, s_zn, s_zx,
                  D: tl.constexpr, TOKEN_GROUPED: tl.constexpr):
    """The query folded for one block of K: split ``a`` and the per-row bias ``[16]``.

    Channel grouping: ``a = q * scale``, ``bias = sum(q * zero)``, so that
    ``score = bias + a . (m + u)``. Token grouping: ``a = q`` (already split), bias 0.
    """
    if TOKEN_GROUPED:
        a_hi, a_lo, a_norm, bias = q_hi, q_lo, q_norm, tl.zeros_like(q_norm)
    else:
        chan = tl.arange(0, D)
        scale = tl.load(scale_bh + block * s_sn + chan * s_sx).to(tl.float32)
        zero = tl.load(zero_bh + block * s_zn + chan * s_zx).to(tl.float32)
        a_hi, a_lo, a_norm = split_rows(q * scale[None, :])
        bias = tl.sum(q * zero[None, :], axis=1)
    return a_hi, a_lo, a_norm, bias


@triton.jit
def k_word_scores(
    a_hi, a_lo, a_norm, bias, q_sum,
    words_ptr, s_word, base, w, m, starts, max_w, word_in_plane,
    scale_bh, zero_bh, block, tok_in_block, s_sn, s_sx, s_zn, s_zx,
    WPP: tl.constexpr, D: tl.constexpr, TOKEN_GROUPED: tl.constexpr,
):
    """Raw scores ``q . K^T`` of one 32-token word of a pack, fp32 ``[16, 32]`` in tile_tokens() order.

    ``a_*``, ``bias`` from k_block_query; token grouping then applies the token's step
    and minimum: ``score_t = zero_t * sum(q) + scale_t * q . (m + u_t)``.
    """
    v = unpack_word(words_ptr, s_word, base, w, m, starts, max_w, word_in_plane, WPP, D, True)
    dot = dot_split(a_hi, a_lo, a_norm, tl.trans(v), max_w)
    if TOKEN_GROUPED:
        scale = tl.load(scale_bh + block * s_sn + tok_in_block * s_sx).to(tl.float32)
        zero = tl.load(zero_bh + block * s_zn + tok_in_block * s_zx).to(tl.float32)
        scores = zero[None, :] * q_sum[:, None] + scale[None, :] * dot
    else:
        scores = bias[:, None] + dot
    return scores


@triton.jit
def load_query_tile(q_ptr, b, h, s_qb, s_qh, s_qd, GROUP: tl.constexpr, D: tl.constexpr):
    """The GROUP query heads of KV head h as fp32 ``[16, D]``, rows >= GROUP zero."""
    rows = tl.arange(0, 16)
    chan = tl.arange(0, D)
    ptrs = q_ptr + b * s_qb + (h * GROUP + rows[:, None]) * s_qh + chan[None, :] * s_qd
    return tl.load(ptrs, mask=rows[:, None] < GROUP, other=0.0).to(tl.float32)
