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

The kernels walk their 32-token words in a two-stage software pipeline: while word i is
unpacked and multiplied, the first four planes of word i+1 (word_planes) and the metadata
of word i+2 (word_meta) are in flight, so a word does not wait on a chain of dependent
loads (offset and widths, then one gather a plane).
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
def word_meta(
    offsets_bh, widths_bh, mins_bh, scale_bh, zero_bh, word, valid,
    s_op, s_wp, s_wc, s_mp, s_mc, s_sn, s_sx, s_zn, s_zx,
    WPP: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, MIN_BITS: tl.constexpr,
    TOKEN_GROUPED: tl.constexpr,
):
    """The metadata loads of one 32-token word (word ``i`` covers packed tokens ``32i..32i+31``).

    Returns its pack's first word (int64), the pack's widths and minima (int32 ``[D]``), and
    the word's steps and minima, fp32: ``[32]`` in tile_tokens() order (token grouping) or
    the block's ``[D]`` (channel grouping). Widths are 4-bit codes, channel 2i in the low
    nibble of byte i; minima likewise for min_bits 4, bytes for 8, absent (0) for 0.
    Nothing is read (zeros) unless ``valid``: the kernels issue it for words past their range.
    """
    chan = tl.arange(0, D)
    pack = word // WPP
    block = word // (BLOCK // 32)
    keep = chan < tl.where(valid, D, 0)  # a [D] mask, false unless valid
    base = tl.load(offsets_bh + pack * s_op, mask=valid, other=0).to(tl.int64)
    nibble_shift = (chan % 2) * 4
    w = (tl.load(widths_bh + pack * s_wp + (chan // 2) * s_wc, mask=keep, other=0).to(tl.int32) >> nibble_shift) & 15
    if MIN_BITS == 4:
        m = (tl.load(mins_bh + pack * s_mp + (chan // 2) * s_mc, mask=keep, other=0).to(tl.int32) >> nibble_shift) & 15
    elif MIN_BITS == 8:
        m = tl.load(mins_bh + pack * s_mp + chan * s_mc, mask=keep, other=0).to(tl.int32)
    else:
        m = tl.zeros([D], dtype=tl.int32)
    if TOKEN_GROUPED:
        tok_in_block = (word % (BLOCK // 32)) * 32 + tile_tokens()
        on = tok_in_block < tl.where(valid, BLOCK, 0)
        scale = tl.load(scale_bh + block * s_sn + tok_in_block * s_sx, mask=on, other=0.0).to(tl.float32)
        zero = tl.load(zero_bh + block * s_zn + tok_in_block * s_zx, mask=on, other=0.0).to(tl.float32)
    else:
        scale = tl.load(scale_bh + block * s_sn + chan * s_sx, mask=keep, other=0.0).to(tl.float32)
        zero = tl.load(zero_bh + block * s_zn + chan * s_zx, mask=keep, other=0.0).to(tl.float32)
    return base, w, m, scale, zero


@triton.jit
def load_plane(words_ptr, s_word, base, w, starts, b, word, WPP: tl.constexpr):
    """Plane ``b`` of every channel of one word, int32 ``[D]`` (0 where a channel is narrower).

    Plane b of channel c is the word ``base + (starts[c] + b) * WPP + word % WPP``.
    """
    return tl.load(words_ptr + (base + (starts + b) * WPP + word % WPP) * s_word, mask=b < w, other=0)


@triton.jit
def word_planes(words_ptr, s_word, base, w, word, WPP: tl.constexpr):
    """``starts`` (each channel's first plane in the pack), the widest channel, and planes 0-3 of one word.

    ``starts`` is the exclusive prefix sum of the widths. The four gathers are issued
    together (a word ahead of their use in the kernels), so they wait on memory once.
    """
    starts = tl.cumsum(w, 0) - w
    x0 = load_plane(words_ptr, s_word, base, w, starts, 0, word, WPP)
    x1 = load_plane(words_ptr, s_word, base, w, starts, 1, word, WPP)
    x2 = load_plane(words_ptr, s_word, base, w, starts, 2, word, WPP)
    x3 = load_plane(words_ptr, s_word, base, w, starts, 3, word, WPP)
    return starts, tl.max(w, 0), x0, x1, x2, x3


@triton.jit
def _plane_bits(x, b, PAIRED: tl.constexpr):
    """Bit b of the values in plane word ``x [D]``: ``[16, D]`` two tokens a lane, or ``[32, D]``."""
    if PAIRED:
        # Bits j and j + 16 of x land at 0 and 16; the arithmetic shift fills only bits >= 17.
        return ((x[None, :] >> tl.arange(0, 16)[:, None]) & 0x00010001) << b
    else:
        return ((x[None, :] >> tile_tokens()[:, None]) & 1) << b


@triton.jit
def unpack_word(
    words_ptr, s_word, base, w, m, starts, max_w, word, x0, x1, x2, x3,
    WPP: tl.constexpr, D: tl.constexpr, PAIRED: tl.constexpr,
):
    """Quantized integers ``m + u`` of the 32 tokens of one word: int32 ``[32, D]``, rows in tile_tokens() order.

    ``x0..x3`` are planes 0-3 from word_planes; planes from 4 up (wide packs) are gathered
    here, one [D] load a plane. ``PAIRED`` unpacks two tokens a lane (j and j + 16: one
    shift and one mask a plane for both) and interleaves the halves; else one token a
    lane. Measured on an H100, pairs are faster where the tile is transposed for the K
    product, single lanes for V.
    """
    u = _plane_bits(x0, 0, PAIRED)
    if max_w > 1:
        u |= _plane_bits(x1, 1, PAIRED)
    if max_w > 2:
        u |= _plane_bits(x2, 2, PAIRED)
    if max_w > 3:
        u |= _plane_bits(x3, 3, PAIRED)
    for b in range(4, max_w):
        u |= _plane_bits(load_plane(words_ptr, s_word, base, w, starts, b, word, WPP), b, PAIRED)
    if PAIRED:
        pair = tl.join(u & 0xFFFF, u >> 16)  # [16, D, 2]: tokens j and j + 16
        u = tl.reshape(tl.permute(pair, (0, 2, 1)), (32, D))
    return u + m[None, :]


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
def v_word_product(p, v, scale, zero, max_w, TOKEN_GROUPED: tl.constexpr):
    """``p . V`` over one 32-token word, fp32 ``[16, D]``, from its integers ``v = m + u [32, D]``.

    ``p [16, 32]`` weights in tile_tokens() order; ``scale, zero`` from word_meta. Token
    grouping folds the token steps into the weights, ``b = p * scale``:
    ``out_c = sum(p * zero) + b . (m + u)[:, c]``; channel grouping gives
    ``out_c = zero_c * sum(p) + scale_c * p . (m + u)[:, c]``.
    """
    if TOKEN_GROUPED:
        b_hi, b_lo, b_norm = split_rows(p * scale[None, :])
        out = tl.sum(p * zero[None, :], axis=1)[:, None] + dot_split(b_hi, b_lo, b_norm, v, max_w)
    else:
        p_hi, p_lo, p_norm = split_rows(p)
        out = zero[None, :] * tl.sum(p, axis=1)[:, None] + scale[None, :] * dot_split(p_hi, p_lo, p_norm, v, max_w)
    return out


@triton.jit
def k_query(q_ptr, b, h, s_qb, s_qh, s_qd, scale, zero,
            GROUP: tl.constexpr, D: tl.constexpr, TOKEN_GROUPED: tl.constexpr):
    """The query tile folded for K: split ``a [16, D]`` and a per-row term ``bias [16]``.

    Channel grouping (``scale, zero [D]`` of one block, from word_meta): ``a = q * scale``,
    ``bias = sum(q * zero)``, so that ``score = bias + a . (m + u)``; called once a block.
    Token grouping: ``a = q``, ``bias = sum(q)`` (scale, zero unused); called once. The
    query is read again each time (an L1/L2 hit) rather than kept in registers.
    """
    q = load_query_tile(q_ptr, b, h, s_qb, s_qh, s_qd, GROUP, D)
    if TOKEN_GROUPED:
        a_hi, a_lo, a_norm = split_rows(q)
        bias = tl.sum(q, axis=1)
    else:
        a_hi, a_lo, a_norm = split_rows(q * scale[None, :])
        bias = tl.sum(q * zero[None, :], axis=1)
    return a_hi, a_lo, a_norm, bias


@triton.jit
def k_word_scores(a_hi, a_lo, a_norm, bias, v, scale, zero, max_w, TOKEN_GROUPED: tl.constexpr):
    """Raw scores ``q . K^T`` of one 32-token word, fp32 ``[16, 32]`` in tile_tokens() order.

    ``v = m + u [32, D]`` its integers; ``a_*``, ``bias`` from k_query; token grouping then
    applies the token steps and minima (``scale, zero [32]``):
    ``score_t = zero_t * sum(q) + scale_t * q . (m + u_t)``.
    """
    dot = dot_split(a_hi, a_lo, a_norm, tl.trans(v), max_w)
    if TOKEN_GROUPED:
        scores = zero[None, :] * bias[:, None] + scale[None, :] * dot
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
