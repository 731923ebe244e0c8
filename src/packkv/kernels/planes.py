"""Triton building blocks shared by the decode kernels: read a tile of packs and unpack its
bit planes in registers into an fp16 operand for the tensor cores.

A program works on one (batch, KV head) and the query heads of its GQA group, zero-padded
to 16 rows (``tl.dot`` needs 16). It walks its packed tokens in tiles of ``TW`` 32-token
words (a word is the 32 tokens that share one int32 of each bit plane).

**Unpacking, four tokens a lane.** Bit ``j`` of a plane word holds token ``j``. With
``(plane >> j) & 0x01010101`` one shift and one mask move the bits of tokens ``j``,
``j + 8``, ``j + 16`` and ``j + 24`` into the four byte lanes of an int32; OR-ing the
planes in at bit ``b`` of each byte builds four 8-bit values at once (two instructions a
plane for four values, LOP3 fusing the mask and the OR). Eight such accumulators hold the
word's 32 values of a channel. Planes 0..3 go first into four nibble lanes
(``(plane >> j) & 0x11111111``, tokens ``j + 4i``: eight values for the same two
instructions), whose even and odd nibbles then split into the byte lanes. ``prmt`` then puts two bytes under the exponent of 1024
(``0x64XX`` is the fp16 number ``1024 + XX``), and one packed fp16 subtraction of
``1024 - m`` yields ``m + u`` exactly (every integer below 2048 is an fp16 number): two
instructions for four values. Values wider than 8 bits are unpacked as a second tile of
planes 8..15, multiplied by 256.

**Token order inside a tile.** The conversion leaves, in each thread's registers, the
values in the order (word, j, k) for token ``8k + j``; keeping that order avoids every
register shuffle. So tile column ``c`` holds token :func:`tile_tokens` ``(c)`` of the tile,
and the kernels read token scales, masks and weights, and write scores, through the same
map. K and V are unpacked alike, so the scores of a tile line up with its V rows.

On the CPU (Triton's interpreter, which cannot run inline PTX) the same values are built
with plain integer operations; ``ASM`` selects the path at compile time.
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
def tile_tokens(NT: tl.constexpr):
    """Token (within the tile) held by each of the ``NT`` columns of an unpacked tile."""
    c = tl.arange(0, NT)
    return (c // 32) * 32 + 8 * (c % 4) + (c % 32) // 4


@triton.jit
def side_pointers(offsets_ptr, widths_ptr, mins_ptr, scale_ptr, zero_ptr, b, h,
                  s_ob, s_oh, s_wb, s_wh, s_mb, s_mh, s_sb, s_sh, s_zb, s_zh):
    """The metadata pointers of one (batch, KV head) of a PackedTensor (see :func:`packed_args`)."""
    return (offsets_ptr + b * s_ob + h * s_oh, widths_ptr + b * s_wb + h * s_wh, mins_ptr + b * s_mb + h * s_mh,
            scale_ptr + b * s_sb + h * s_sh, zero_ptr + b * s_zb + h * s_zh)


@triton.jit
def split_tiles(split, tiles_per_split, n_words, TW: tl.constexpr):
    """The tiles ``[first, last)`` of a split, and the word its packs end at."""
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(n_words, TW))
    return first, last, tl.minimum(last * TW, n_words)


@triton.jit
def fetch_meta(offsets_bh, widths_bh, mins_bh, tile, word_end, s_op, s_wp, s_wc, s_mp, s_mc,
               TW: tl.constexpr, WPP: tl.constexpr, D: tl.constexpr, MIN_BITS: tl.constexpr):
    """Issue the metadata loads of the packs of ``tile`` (words ``tile * TW ..``, none from ``word_end``).

    Returns the raw loads (each pack's first word ``[TW]``, width and minimum bytes per
    channel ``[TW, D]``); nothing here uses them, so they stay in flight until
    :func:`decode_meta`, a loop step later. Widths are 4-bit codes, channel 2i in the low
    nibble of byte i; minima likewise for min_bits 4, bytes for 8, absent for 0.
    """
    words = tile * TW + tl.arange(0, TW)
    valid = words < word_end
    chan = tl.arange(0, D)
    pack = words // WPP
    keep = valid[:, None] & (chan[None, :] < D)
    first = tl.load(offsets_bh + pack * s_op, mask=valid, other=0)
    wb = tl.load(widths_bh + pack[:, None] * s_wp + (chan // 2)[None, :] * s_wc, mask=keep, other=0)
    if MIN_BITS == 4:
        mb = tl.load(mins_bh + pack[:, None] * s_mp + (chan // 2)[None, :] * s_mc, mask=keep, other=0)
    elif MIN_BITS == 8:
        mb = tl.load(mins_bh + pack[:, None] * s_mp + chan[None, :] * s_mc, mask=keep, other=0)
    else:
        mb = tl.zeros([TW, D], dtype=tl.uint8)
    return first, wb, mb


@triton.jit
def decode_meta(words_ptr, s_word, first, wb, mb, tile, TW: tl.constexpr, WPP: tl.constexpr, MIN_BITS: tl.constexpr):
    """The tile's metadata from :func:`fetch_meta`'s loads.

    Returns pointers to plane 0 of every channel of every word ``[TW, D]`` (plane b is
    ``b * WPP * s_word`` further: a channel's planes follow the exclusive prefix sum of the
    widths), the widths and minima (int32 ``[TW, D]``) and the widest channel.
    """
    words = tile * TW + tl.arange(0, TW)
    shift = (tl.arange(0, wb.shape[1]) % 2) * 4
    w = (wb.to(tl.int32) >> shift[None, :]) & 15
    if MIN_BITS == 4:
        m = (mb.to(tl.int32) >> shift[None, :]) & 15
    else:
        m = mb.to(tl.int32)
    starts = tl.cumsum(w, 1) - w
    ptrs = words_ptr + ((first.to(tl.int64) + words % WPP)[:, None] + starts * WPP) * s_word
    return ptrs, w, m, tl.max(tl.max(w, axis=1), axis=0)


@triton.jit
def fetch_scales(scale_bh, zero_bh, tile, word_end, s_sn, s_sx, s_zn, s_zx,
                 TW: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, TOKEN_GROUPED: tl.constexpr):
    """Issue the loads of the tile's steps and minima, fp16: ``[TW * 32]`` in
    :func:`tile_tokens` order (token grouping, 0 past ``word_end``) or the block's ``[D]``
    (channel grouping; a tile never straddles blocks)."""
    if TOKEN_GROUPED:
        start = tile * TW * 32
        tok = tile_tokens(TW * 32)
        on = start + tok < word_end * 32
        if BLOCK % (TW * 32) == 0:
            # The tile lies in one block: a scalar block index, and per column a constant
            # offset from the tile's start (no per-token division; the loads take immediate
            # offsets).
            block = start // BLOCK
            tok += start % BLOCK
        else:
            tok += start
            block = tok // BLOCK
            tok = tok % BLOCK
        scale = tl.load(scale_bh + block * s_sn + tok * s_sx, mask=on, other=0.0)
        zero = tl.load(zero_bh + block * s_zn + tok * s_zx, mask=on, other=0.0)
    else:
        chan = tl.arange(0, D)
        keep = chan < tl.where(tile * TW < word_end, D, 0)
        block = (tile * TW * 32) // BLOCK
        scale = tl.load(scale_bh + block * s_sn + chan * s_sx, mask=keep, other=0.0)
        zero = tl.load(zero_bh + block * s_zn + chan * s_zx, mask=keep, other=0.0)
    return scale, zero


@triton.jit
def stage_tile(words_ptr, scale_bh, zero_bh, first, wb, mb, tile, word_end, s_word, s_sn, s_sx, s_zn, s_zx,
               TW: tl.constexpr, WPP: tl.constexpr, BLOCK: tl.constexpr, MIN_BITS: tl.constexpr,
               TOKEN_GROUPED: tl.constexpr):
    """One step ahead of its use: decode a tile's metadata (loaded a step earlier by
    :func:`fetch_meta`) and issue the loads of its planes 0..7 and its scales.

    Returns ``ptrs, w, m, max_w`` (:func:`decode_meta`), the eight planes and the scales.
    """
    ptrs, w, m, max_w = decode_meta(words_ptr, s_word, first, wb, mb, tile, TW, WPP, MIN_BITS)
    x0, x1, x2, x3, x4, x5, x6, x7 = load_planes(ptrs, w, max_w, 0, s_word, WPP)
    scale, zero = fetch_scales(scale_bh, zero_bh, tile, word_end, s_sn, s_sx, s_zn, s_zx, TW, BLOCK, wb.shape[1],
                               TOKEN_GROUPED)
    return ptrs, w, m, max_w, x0, x1, x2, x3, x4, x5, x6, x7, scale, zero


@triton.jit
def high_tile(ptrs, w, max_w, s_word, WPP: tl.constexpr, ASM: tl.constexpr):
    """Bits 8..15 of the tile's values, ``u >> 8``, as an fp16 tile (for packs wider than 8 bits)."""
    y0, y1, y2, y3, y4, y5, y6, y7 = load_planes(ptrs, w, max_w, 8, s_word, WPP)
    return planes_to_tile(y0, y1, y2, y3, y4, y5, y6, y7, tl.zeros_like(w), max_w, 8, ASM)


@triton.jit
def _lane(x, j: tl.constexpr, b: tl.constexpr, ONES: tl.constexpr):
    """Bits ``j + s i`` of ``x`` moved to bits ``b + s i`` (others 0), for the lanes of ``s``
    bits marked by ``ONES`` (0x01010101: bytes, 0x11111111: nibbles; ``j < s``)."""
    # ONES << b as an int32 (bit 31 set for the top bit of a lane).
    mask: tl.constexpr = ((ONES << b) & 0x7FFFFFFF) - ((ONES << b) & 0x80000000)
    # An arithmetic right shift fills only bits >= 32 - (j - b), above the mask's top bit.
    if j >= b:
        return (x >> (j - b)) & mask
    else:
        return (x << (b - j)) & mask


@triton.jit
def _or_plane(a0, a1, a2, a3, a4, a5, a6, a7, x, b: tl.constexpr):
    """OR plane ``x`` (bit ``b`` of the values) into the eight byte-lane accumulators."""
    return (a0 | _lane(x, 0, b, 0x01010101), a1 | _lane(x, 1, b, 0x01010101), a2 | _lane(x, 2, b, 0x01010101),
            a3 | _lane(x, 3, b, 0x01010101), a4 | _lane(x, 4, b, 0x01010101), a5 | _lane(x, 5, b, 0x01010101),
            a6 | _lane(x, 6, b, 0x01010101), a7 | _lane(x, 7, b, 0x01010101))


@triton.jit
def _or_nibbles(n0, n1, n2, n3, x, b: tl.constexpr):
    """OR plane ``x`` (bit ``b < 4`` of the values) into the four nibble-lane accumulators."""
    return (n0 | _lane(x, 0, b, 0x11111111), n1 | _lane(x, 1, b, 0x11111111), n2 | _lane(x, 2, b, 0x11111111),
            n3 | _lane(x, 3, b, 0x11111111))


@triton.jit
def _bytes_f16(a, add, sub, ASM: tl.constexpr):
    """The four bytes of ``a`` plus ``add``, as four fp16 tensors (byte 0 first).

    ``sub`` is ``add``'s fp16x2 form ``1024 - add`` in both halves, used by the PTX path;
    the interpreter's path uses ``add``.
    """
    if ASM:
        return tl.inline_asm_elementwise(
            "{.reg .b32 c, t0, t1;\n"
            "mov.b32 c, 0x64646464;\n"
            "prmt.b32 t0, $4, c, 0x4140;\n"  # bytes 0, 1 under 0x64: fp16 1024 + byte
            "prmt.b32 t1, $4, c, 0x4342;\n"  # bytes 2, 3
            "sub.f16x2 t0, t0, $5;\n"
            "sub.f16x2 t1, t1, $5;\n"
            "mov.b32 {$0, $1}, t0;\n"
            "mov.b32 {$2, $3}, t1;}",
            "=h,=h,=h,=h,r,r", [a, sub], dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=1)
    else:
        return (((a & 255) + add).to(tl.float16), (((a >> 8) & 255) + add).to(tl.float16),
                (((a >> 16) & 255) + add).to(tl.float16), (((a >> 24) & 255) + add).to(tl.float16))


@triton.jit
def _tree8(t0, t1, t2, t3, t4, t5, t6, t7):
    """Eight ``[TW, D]`` tensors as ``[TW, D, 8]`` in this order (a join appends the fastest dim)."""
    pairs = tl.join(tl.join(tl.join(t0, t4), tl.join(t2, t6)), tl.join(tl.join(t1, t5), tl.join(t3, t7)))
    return tl.reshape(pairs, [t0.shape[0], t0.shape[1], 8])


@triton.jit
def load_planes(ptrs, w, max_w, lo, s_word, WPP: tl.constexpr):
    """Issue the loads of planes ``lo..lo+7`` of the tile (int32 ``[TW, D]`` each, 0 where a
    channel is narrower); planes 4 to 7 only if some channel is wider than ``lo + 4``."""
    step: tl.constexpr = WPP * s_word
    left = w - lo
    ptrs = ptrs + lo * step
    zero = tl.zeros_like(w)
    x0 = tl.load(ptrs, mask=0 < left, other=0)
    x1 = tl.load(ptrs + step, mask=1 < left, other=0)
    x2 = tl.load(ptrs + 2 * step, mask=2 < left, other=0)
    x3 = tl.load(ptrs + 3 * step, mask=3 < left, other=0)
    x4, x5, x6, x7 = zero, zero, zero, zero
    if max_w > lo + 4:
        x4 = tl.load(ptrs + 4 * step, mask=4 < left, other=0)
        x5 = tl.load(ptrs + 5 * step, mask=5 < left, other=0)
        x6 = tl.load(ptrs + 6 * step, mask=6 < left, other=0)
        x7 = tl.load(ptrs + 7 * step, mask=7 < left, other=0)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def planes_to_tile(x0, x1, x2, x3, x4, x5, x6, x7, add, max_w, lo, ASM: tl.constexpr):
    """Planes ``lo..lo+7`` (from :func:`load_planes`) plus ``add [TW, D]`` as the fp16 tile
    ``[D, TW * 32]``, columns in :func:`tile_tokens` order.

    Planes from ``max_w`` up are skipped; ``add`` must keep every value below 2048.
    """
    # Planes 0..3 in nibble lanes (eight values an int32: half the work of byte lanes),
    # then split into the byte lanes that planes 4..7 and the conversion use.
    n0, n1, n2, n3 = _lane(x0, 0, 0, 0x11111111), _lane(x0, 1, 0, 0x11111111), _lane(x0, 2, 0, 0x11111111), \
        _lane(x0, 3, 0, 0x11111111)
    if max_w > lo + 1:
        n0, n1, n2, n3 = _or_nibbles(n0, n1, n2, n3, x1, 1)
    if max_w > lo + 2:
        n0, n1, n2, n3 = _or_nibbles(n0, n1, n2, n3, x2, 2)
    if max_w > lo + 3:
        n0, n1, n2, n3 = _or_nibbles(n0, n1, n2, n3, x3, 3)
    # Nibble i of n_j holds token j + 4i: the even nibbles are byte lanes j (tokens j + 8k),
    # the odd ones byte lanes j + 4.
    a0, a1, a2, a3 = n0 & 0x0F0F0F0F, n1 & 0x0F0F0F0F, n2 & 0x0F0F0F0F, n3 & 0x0F0F0F0F
    a4, a5, a6, a7 = (n0 >> 4) & 0x0F0F0F0F, (n1 >> 4) & 0x0F0F0F0F, (n2 >> 4) & 0x0F0F0F0F, (n3 >> 4) & 0x0F0F0F0F
    if max_w > lo + 4:
        a0, a1, a2, a3, a4, a5, a6, a7 = _or_plane(a0, a1, a2, a3, a4, a5, a6, a7, x4, 4)
    if max_w > lo + 5:
        a0, a1, a2, a3, a4, a5, a6, a7 = _or_plane(a0, a1, a2, a3, a4, a5, a6, a7, x5, 5)
    if max_w > lo + 6:
        a0, a1, a2, a3, a4, a5, a6, a7 = _or_plane(a0, a1, a2, a3, a4, a5, a6, a7, x6, 6)
    if max_w > lo + 7:
        a0, a1, a2, a3, a4, a5, a6, a7 = _or_plane(a0, a1, a2, a3, a4, a5, a6, a7, x7, 7)
    sub = _f16x2_bits(1024 - add)
    b00, b01, b02, b03 = _bytes_f16(a0, add, sub, ASM)
    b10, b11, b12, b13 = _bytes_f16(a1, add, sub, ASM)
    b20, b21, b22, b23 = _bytes_f16(a2, add, sub, ASM)
    b30, b31, b32, b33 = _bytes_f16(a3, add, sub, ASM)
    b40, b41, b42, b43 = _bytes_f16(a4, add, sub, ASM)
    b50, b51, b52, b53 = _bytes_f16(a5, add, sub, ASM)
    b60, b61, b62, b63 = _bytes_f16(a6, add, sub, ASM)
    b70, b71, b72, b73 = _bytes_f16(a7, add, sub, ASM)
    # [TW, D, 8 (j), 4 (k)]: byte k of accumulator j (token 8k + j) at column 4j + k, the
    # order the registers already hold (byte pairs share one fp16x2 register).
    tile = tl.join(tl.join(_tree8(b00, b10, b20, b30, b40, b50, b60, b70), _tree8(b02, b12, b22, b32, b42, b52, b62, b72)),
                   tl.join(_tree8(b01, b11, b21, b31, b41, b51, b61, b71), _tree8(b03, b13, b23, b33, b43, b53, b63, b73)))
    tw: tl.constexpr = x0.shape[0]
    d: tl.constexpr = x0.shape[1]
    tile = tl.reshape(tl.permute(tl.reshape(tile, [tw, d, 32]), (1, 0, 2)), [d, tw * 32])
    if ASM:
        # An opaque copy (ptxas removes it): Triton sizes MMA operands from the ops a dot
        # operand is built by, and a tl.join there makes it pick 4-element fragments for
        # both operands (kWidth 4), fed by ~4 register moves per MMA. Not pure, so Triton's
        # analysis stops here and keeps the native 2-element fragments (ldmatrix, no moves).
        tile = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [tile], dtype=tl.float16, is_pure=False, pack=2)
    return tile


@triton.jit
def _f16x2_bits(x):
    """int32 ``x`` (exact in fp16) as the bits of the fp16 pair ``(x, x)``."""
    h = x.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return h | (h << 16)


@triton.jit
def pow2_rows(x):
    """Per-row power of two at or below the row's largest magnitude (1 for a zero row), ``[M]``.

    Dividing by it is exact and brings the row into fp16's range without changing bf16 or
    fp16 mantissas.
    """
    amax = tl.max(tl.abs(x), axis=1)
    return tl.where(amax > 0, tl.exp2(tl.floor(tl.log2(tl.where(amax > 0, amax, 1.0)))), 1.0)


@triton.jit
def split_halves(x, dtype: tl.constexpr):
    """fp32 ``x`` as ``hi + lo`` in ``dtype`` (fp16: about 2**-22 relative; bf16: 2**-16),
    for rows already scaled by pow2_rows: two tensor-core products give a near-fp32 one."""
    hi = x.to(dtype)
    lo = (x - hi.to(tl.float32)).to(dtype)
    return hi, lo


@triton.jit
def load_query_tile(q_ptr, b, h, s_qb, s_qh, s_qd, GROUP: tl.constexpr, D: tl.constexpr):
    """The GROUP query heads of KV head h as fp32 ``[16, D]``, rows >= GROUP zero."""
    rows = tl.arange(0, 16)
    chan = tl.arange(0, D)
    ptrs = q_ptr + b * s_qb + (h * GROUP + rows[:, None]) * s_qh + chan[None, :] * s_qd
    return tl.load(ptrs, mask=rows[:, None] < GROUP, other=0.0).to(tl.float32)
