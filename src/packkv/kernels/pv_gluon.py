"""The V product on an NVIDIA GPU, with the unpacked V built in the tensor cores' registers (Gluon).

Gluon (``triton.experimental.gluon``) states each tensor's register layout, which plain
Triton chooses by itself. This kernel computes ``out^T [D, 8] = V^T [D, T] . P^T [T, 8]``
with m16n8k16 MMAs: V^T is the A operand (warps along channels), the weights of the GQA
group (padded to 8) the B operand.

**Why V fits the fragments.** In an A fragment lane ``l`` holds channels ``l // 4`` (and
+8) and, of each 16 fragment slots, slots ``2 q + {0, 1}`` (and +8), ``q = l % 4``: the 4
lanes of a quad share a channel. Tokens may be permuted freely (the weights follow). A
plane word holds a channel's bit of 32 tokens; its nibble lane ``n`` (``(x >> n) &
0x11111111``) holds tokens ``4 i + n``. A tile of ``TW`` words (1, 2 or 4) puts its words on
the quad's lanes, so that each lane loads and unpacks words of its own: quad lane ``q =
n_lo + 2**(2 - a) w`` (``TW = 2**a``) takes word ``w``'s nibble lanes ``n = n_lo + 2**(2 - a)
n_hi``, ``n_hi`` in registers. Fragment slot ``z + 2 n_lo + 2**(3 - a) w + 8 y + 16 x + 32
n_hi`` holds token ``32 w + 8 z + 16 y + 4 x + n`` (:func:`_slot_tokens`): splitting the
nibbles into even and odd bytes (``z``) and the ``prmt``/``sub.f16x2`` conversion of
planes.py then give, register by register, the fp16 pairs the fragment wants, and
``convert_layout(..., assert_trivial=True)`` proves at compile time that no value moves
between lanes. (With the words in registers and the nibble lanes on the quad, the first
version, each plane word was loaded by 4 lanes and its metadata converted for each: 1.2-1.3x
slower in the fused attention, docs/notes/kernels.md.) Only the widths' prefix sum and the
weights go through shared memory (1 KB a tile).

Measured on an H100 (docs/notes/gluon/run_pv.py, docs/benchmarks.md "v11"): 1.35-2.3x faster than
the Triton kernel of pv.py.
It serves the default format only: token grouping, packs of 32, 4-bit minima and V widths of
at most 4 bits (:func:`supported`); pv.py's Triton kernel serves the rest and the CPU.
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from ..codec.format import PackedTensor
from . import _common
from .planes import packed_args, side_pointers, split_tiles

# (32-token words a program unpacks per step, register cap) by head_dim; measured on an
# H100 (docs/notes/kernels.md, "Gluon"). At the cap of 128 a multiprocessor holds 4
# programs at head_dim 128 (8 at 64); uncapped, the per-row rescaling of the weights takes
# the kernel to ~165 registers.
SETTINGS = {64: (4, 128), 128: (4, 128)}
TILE_WORDS = (1, 2, 4)  # the tiles the quad's lanes can hold
MAX_PLANES = 4  # widths the nibble lanes hold


def serves_format(p: PackedTensor, max_planes: int) -> bool:
    """Whether the Gluon kernels' unpack (:func:`_unpacked_tile`) reads ``p``: token grouping,
    packs of 32, 4-bit minima, widths of at most ``max_planes`` bits, a kernel head_dim."""
    return (p.grouping == "token" and p.pack_size == 32 and p.min_bits == 4 and p.width_bound <= max_planes
            and p.head_dim in _common.KERNEL_HEAD_DIMS)


def supported(v: PackedTensor, group: int, device: torch.device) -> bool:
    """Whether this kernel serves ``v`` for GQA groups of ``group`` on ``device``: compiled
    CUDA, the format it unpacks, and at most 8 query heads a KV head (the B operand's width)."""
    return _common.use_asm(device) and serves_format(v, MAX_PLANES) and group <= 8


@functools.lru_cache(maxsize=None)
def layouts(head_dim: int, tile_words: int, warps: int) -> tuple:
    """Register layouts for ``warps`` warps (16 channels each, at most ``head_dim / 16``): the
    MMA accumulator out^T [D, 8] (warps along channels); the word-lane layout [TW, 4, D] that
    holds, per (word, nibble lane, channel), what the A fragments of V^T [D, TW * 32] hold
    before the nibbles are spread (the words on the quad's lanes, module docstring); the
    widths' layout [TW, D] (4 channels a thread, a warp a word); the weights' [TW * 32, 8]
    (a token a thread)."""
    if tile_words not in TILE_WORDS or not 16 <= 16 * warps <= head_dim:
        raise ValueError(f"tiles of {tile_words} words and {warps} warps do not fit head_dim {head_dim}")
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[warps, 1], instr_shape=[16, 8])
    a = tile_words.bit_length() - 1
    quad = [[0, 1 << i, 0] for i in range(2 - a)] + [[1 << i, 0, 0] for i in range(a)]
    regs = [[0, 0, 8]] + [[0, 1 << (2 - a + i), 0] for i in range(a)]
    n = 16 * warps
    while n < head_dim:
        regs.append([0, 0, n])
        n *= 2
    word_lanes = gl.DistributedLinearLayout(
        reg_bases=regs, lane_bases=quad + [[0, 0, 1], [0, 0, 2], [0, 0, 4]],
        warp_bases=[[0, 0, 16 << i] for i in range(warps.bit_length() - 1)], block_bases=[],
        shape=[tile_words, 4, head_dim])
    meta = gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[1, 32], warps_per_cta=[warps, 1], order=[1, 0])
    weights = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32, 1], warps_per_cta=[warps, 1], order=[1, 0])
    return mma, word_lanes, meta, weights


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _pow2_at_most(x):
    """The power of two at or below each ``x`` (fp32, >= 0); 1 where ``x`` is 0."""
    return gl.exp2(gl.floor(gl.log2(gl.where(x > 0, x, 1.0))))


@gluon.jit
def _bytes_f16(a, sub):
    """The four bytes of ``a`` minus ``sub`` (fp16x2 ``1024 - m``): ``m + byte`` as fp16, byte 0 first."""
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
def _slot_tokens(k, TW: gl.constexpr):
    """The token (from the tile's start) that fragment slot ``k`` of a tile of ``TW`` words
    holds (module docstring)."""
    NLO: gl.constexpr = 2 - TW // 2  # nibble-lane bits on the quad's lanes
    n_lo = (k >> 1) & ((1 << NLO) - 1)
    w = (k >> (1 + NLO)) & (TW - 1)
    n = n_lo + ((k >> 5) << NLO)
    return 32 * w + 8 * (k & 1) + 16 * ((k >> 3) & 1) + 4 * ((k >> 4) & 1) + n


def flat_steps(p: PackedTensor) -> bool:
    """Whether ``p``'s steps and zeros lie token after token, as the cache stores them
    (contiguous in their last two dimensions): token t's at offset t of its (batch, head)."""
    return all(x.stride(-1) == 1 and x.stride(-2) == p.block_size for x in (p.scale, p.zero))


@gluon.jit
def _token_values(side_bh, tok, on, s_n, s_x, BLOCK: gl.constexpr, FLAT: gl.constexpr):
    """A token-grouped side's step or zero of tokens ``tok`` (0 where not ``on``), fp32;
    ``FLAT``: stored token after token (:func:`flat_steps`), which saves the block and row
    arithmetic (~8% of the attention's instructions)."""
    if FLAT:
        return gl.load(side_bh + tok, mask=on, other=0.0).to(gl.float32)
    return gl.load(side_bh + (tok // BLOCK) * s_n + (tok % BLOCK) * s_x, mask=on, other=0.0).to(gl.float32)


@gluon.jit
def _unpack_indices(TW: gl.constexpr, D: gl.constexpr, META: gl.constexpr, WQ: gl.constexpr):
    """The words [TW] and channels [D] of the metadata's layout, and the nibble lanes [1, 4, 1]
    of the word-lane layout: what :func:`_tile_meta` and :func:`_unpacked_tile` take."""
    mw = gl.arange(0, TW, layout=gl.SliceLayout(1, META))
    mc = gl.arange(0, D, layout=gl.SliceLayout(0, META))
    return mw, mc, gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, WQ))), 0), 2)


@gluon.jit
def _tile_meta(widths_bh, mins_bh, offsets_bh, tile, word_end, mw, mc, s_wp, s_wc, s_mp, s_mc, s_op,
               TW: gl.constexpr):
    """Issue the loads of a tile's width and minimum bytes [TW, D] and its packs' first words
    [TW] (packs of 32: a word is a pack; none from ``word_end``)."""
    words = tile * TW + mw
    valid = words < word_end
    wb = gl.load(widths_bh + words[:, None] * s_wp + (mc // 2)[None, :] * s_wc, mask=valid[:, None], other=0)
    mb = gl.load(mins_bh + words[:, None] * s_mp + (mc // 2)[None, :] * s_mc, mask=valid[:, None], other=0)
    fw = gl.load(offsets_bh + words * s_op, mask=valid, other=0)
    return wb, mb, fw


@gluon.jit
def _select55(a, b):
    """The bits of ``a`` where 0x55555555 has ones, of ``b`` elsewhere: one LOP3 (ptxas makes
    two of ``(a & m) | (b & ~m)``)."""
    return gl.inline_asm_elementwise("lop3.b32 $0, $1, $2, 0x55555555, 0xE4;", "=r,r,r", [a, b], dtype=gl.int32,
                                     is_pure=True, pack=1)


@gluon.jit
def _select33(a, b):
    """:func:`_select55` with the mask 0x33333333."""
    return gl.inline_asm_elementwise("lop3.b32 $0, $1, $2, 0x33333333, 0xE4;", "=r,r,r", [a, b], dtype=gl.int32,
                                     is_pure=True, pack=1)


@gluon.jit
def _nibble_lanes(x0, x1, x2, x3):
    """Planes 0..3 of words [TW, 1, D] as their 4 nibble lanes [TW, 4, D]: lane r holds bit p
    of token 4 j + r at bit 4 j + p. A 4 x 32 bit-matrix transpose in two swaps (bit pairs,
    then pairs of pairs), 16 instructions where a shift and a mask a plane and a lane take
    28: 14% of the attention's loop at head_dim 128 (docs/benchmarks.md, v10)."""
    a = _select55(x0, x1 << 1)  # 2-bit fields (planes 0, 1) of tokens 2 i
    b = _select55(x0 >> 1, x1)  # of tokens 2 i + 1
    c = _select55(x2, x3 << 1)  # planes 2, 3
    d = _select55(x2 >> 1, x3)
    t = gl.join(gl.join(_select33(a, c << 2), _select33(b, d << 2)),
                gl.join(_select33(a >> 2, c), _select33(b >> 2, d)))  # [TW, 1, D, i, o]: lane 2 o + i
    return gl.reshape(gl.permute(t, (0, 1, 4, 3, 2)), [x0.shape[0], 4, x0.shape[2]])


@gluon.jit
def _tile_words(words_ptr, s_word, wb, mb, fw, mc, WQ: gl.constexpr, NPLANES: gl.constexpr):
    """Issue the loads of a tile's plane words from :func:`_tile_meta`'s loads: planes 0..7
    [TW, 1, D] in the word-lane layout (0 past ``NPLANES`` or a channel's width), and the
    channels' minima [TW, 1, D]. Apart from :func:`_tile_values`, so that a kernel can issue
    them well before it needs them."""
    shift = ((mc % 2) * 4)[None, :]
    w = (wb.to(gl.int32) >> shift) & 15
    m = (mb.to(gl.int32) >> shift) & 15
    base = fw[:, None] + gl.associative_scan(w, 1, _add) - w  # plane 0 of each channel
    WQ2: gl.constexpr = gl.SliceLayout(1, WQ)
    ptr = words_ptr + gl.expand_dims(gl.convert_layout(base, WQ2), 1).to(gl.int64) * s_word
    w3 = gl.expand_dims(gl.convert_layout(w, WQ2), 1)
    m3 = gl.expand_dims(gl.convert_layout(m, WQ2), 1)
    x0 = gl.load(ptr, mask=w3 > 0, other=0)
    z = gl.zeros_like(x0)
    x1 = gl.load(ptr + s_word, mask=w3 > 1, other=0) if NPLANES > 1 else z
    x2 = gl.load(ptr + 2 * s_word, mask=w3 > 2, other=0) if NPLANES > 2 else z
    x3 = gl.load(ptr + 3 * s_word, mask=w3 > 3, other=0) if NPLANES > 3 else z
    x4 = gl.load(ptr + 4 * s_word, mask=w3 > 4, other=0) if NPLANES > 4 else z
    x5 = gl.load(ptr + 5 * s_word, mask=w3 > 5, other=0) if NPLANES > 5 else z
    x6 = gl.load(ptr + 6 * s_word, mask=w3 > 6, other=0) if NPLANES > 6 else z
    x7 = gl.load(ptr + 7 * s_word, mask=w3 > 7, other=0) if NPLANES > 7 else z
    return x0, x1, x2, x3, x4, x5, x6, x7, m3


@gluon.jit
def _byte_plane(e, o, x, q3, P: gl.constexpr):
    """Plane ``P`` (4..7) of words ``x`` ORed into the even and odd nibbles' bytes."""
    return e | (((x >> q3) & 0x01010101) << P), o | (((x >> (q3 + 4)) & 0x01010101) << P)


@gluon.jit
def _tile_values(x0, x1, x2, x3, x4, x5, x6, x7, m3, q3, WQ: gl.constexpr, NT: gl.constexpr, D: gl.constexpr,
                 NPLANES: gl.constexpr):
    """The tile's values ``m + u`` as fp16 [D, NT] (channels, fragment slots), in the word-lane
    layout's register order, from :func:`_tile_words`' loads. Planes 0..3 in nibble lanes,
    planes 4..7 (``NPLANES`` > 4) ORed into the bytes they split into."""
    TW: gl.constexpr = x0.shape[0]
    if TW == 4:  # the quad's lanes on the words: each thread holds all 4 nibble lanes
        n = gl.convert_layout(_nibble_lanes(x0, x1, x2, x3), WQ, assert_trivial=True)
    else:
        n = ((x0 >> q3) & 0x11111111) | (((x1 >> q3) & 0x11111111) << 1) \
            | (((x2 >> q3) & 0x11111111) << 2) | (((x3 >> q3) & 0x11111111) << 3)
    # even nibbles (tokens 8 k + q) and odd ones (8 k + 4 + q) as bytes
    e = n & 0x0F0F0F0F
    o = (n >> 4) & 0x0F0F0F0F
    if NPLANES > 4:
        e, o = _byte_plane(e, o, x4, q3, 4)
    if NPLANES > 5:
        e, o = _byte_plane(e, o, x5, q3, 5)
    if NPLANES > 6:
        e, o = _byte_plane(e, o, x6, q3, 6)
    if NPLANES > 7:
        e, o = _byte_plane(e, o, x7, q3, 7)
    hbits = (1024 - m3).to(gl.float16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    sub = hbits | (hbits << 16)
    e0, e1, e2, e3 = _bytes_f16(e, sub)
    o0, o1, o2, o3 = _bytes_f16(o, sub)
    # dims [w, n, D, x, y, z]: byte z + 2 y of the even (x = 0) or odd nibbles, token
    # 32 w + 8 z + 16 y + 4 x + n; then n = n_lo + 2**NLO n_hi, and the fragment slots
    # [D, (n_hi, x, y, w, n_lo, z)] (_slot_tokens)
    NLO: gl.constexpr = 2 - TW // 2
    t = gl.join(gl.join(gl.join(e0, o0), gl.join(e2, o2)), gl.join(gl.join(e1, o1), gl.join(e3, o3)))
    t = gl.reshape(t, [TW, 4 >> NLO, 1 << NLO, D, 2, 2, 2])
    return gl.reshape(gl.permute(t, (3, 1, 4, 5, 0, 2, 6)), [D, NT])


@gluon.jit
def _unpacked_tile(words_ptr, s_word, wb, mb, fw, mc, q3, WQ: gl.constexpr, NT: gl.constexpr, D: gl.constexpr,
                   NPLANES: gl.constexpr):
    """:func:`_tile_values` of :func:`_tile_words`: the tile's values [D, NT] from its metadata."""
    x0, x1, x2, x3, x4, x5, x6, x7, m3 = _tile_words(words_ptr, s_word, wb, mb, fw, mc, WQ, NPLANES)
    return _tile_values(x0, x1, x2, x3, x4, x5, x6, x7, m3, q3, WQ, NT, D, NPLANES)


@gluon.jit
def _v_operand(values, A: gl.constexpr):
    """V^T [D, NT] of one tile (:func:`_tile_values`) as A fragments: the unpack already holds them."""
    return gl.convert_layout(values, A, assert_trivial=True)


# Batch/head strides and counts change as a cache grows (see pv.py).
@gluon.jit(do_not_specialize=['s_ob', 's_oh', 's_wb', 's_wh', 's_mb', 's_mh', 's_sb', 's_sh', 's_zb', 's_zh', 's_pb', 's_ph', 's_partb', 's_parth', 'heads', 'n_words', 'tiles_per_split'])
def _pv_gluon_kernel(
    p_ptr, part_ptr,
    words_ptr, offsets_ptr, widths_ptr, mins_ptr, scale_ptr, zero_ptr,
    s_word, s_ob, s_oh, s_op, s_wb, s_wh, s_wp, s_wc, s_mb, s_mh, s_mp, s_mc,
    s_sb, s_sh, s_sn, s_sx, s_zb, s_zh, s_zn, s_zx,
    s_pb, s_ph, s_pt, s_partb, s_parth, s_parts,
    heads, n_words, tiles_per_split,
    GROUP: gl.constexpr, D: gl.constexpr, BLOCK: gl.constexpr, TW: gl.constexpr, NPLANES: gl.constexpr,
    FLAT: gl.constexpr, MMA: gl.constexpr, WQ: gl.constexpr, META: gl.constexpr, WB: gl.constexpr,
):
    """Grid (batch * kv_heads, splits); a program writes its split's partial sum ``[GROUP, D]``
    (pv.py's ``_pv_kernel`` contract)."""
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    NT: gl.constexpr = TW * 32
    pid_bh = gl.program_id(0)
    split = gl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    offsets_bh, widths_bh, mins_bh, scale_bh, zero_bh = side_pointers(
        offsets_ptr, widths_ptr, mins_ptr, scale_ptr, zero_ptr, b, h, s_ob, s_oh, s_wb, s_wh, s_mb, s_mh, s_sb, s_sh, s_zb, s_zh)
    first, last, word_end = split_tiles(split, tiles_per_split, n_words, TW)

    mw, mc, q3 = _unpack_indices(TW, D, META, WQ)
    token = _slot_tokens(gl.arange(0, NT, layout=gl.SliceLayout(1, WB)), TW)
    rows = gl.arange(0, 8, layout=gl.SliceLayout(0, WB))
    p_rows = p_ptr + b * s_pb + (h * GROUP + rows) * s_ph
    row_on = rows < GROUP
    z_acc = gl.zeros([NT, 8], gl.float32, WB)  # sum of p * zero, reduced once at the end
    acc = gl.zeros([D, 8], gl.float32, MMA)
    # Each tile's metadata is loaded a step ahead (masked past word_end), so that its latency
    # and that of the plane words' addresses do not add up (docs/benchmarks.md, v11).
    wb_n, mb_n, fw_n = _tile_meta(widths_bh, mins_bh, offsets_bh, first, word_end, mw, mc, s_wp, s_wc, s_mp, s_mc, s_op, TW)
    for tile in range(first, last):
        wb, mb, fw = wb_n, mb_n, fw_n
        wb_n, mb_n, fw_n = _tile_meta(widths_bh, mins_bh, offsets_bh, tile + 1, word_end, mw, mc, s_wp, s_wc, s_mp, s_mc,
                                      s_op, TW)
        tok = tile * NT + token
        on = tok < word_end * 32
        sc = _token_values(scale_bh, tok, on, s_sn, s_sx, BLOCK, FLAT)
        ze = _token_values(zero_bh, tok, on, s_zn, s_zx, BLOCK, FLAT)
        p = gl.load(p_rows[None, :] + tok[:, None] * s_pt, mask=row_on[None, :] & on[:, None], other=0.0).to(gl.float32)
        vt = _v_operand(_unpacked_tile(words_ptr, s_word, wb, mb, fw, mc, q3, WQ, NT, D, NPLANES), A)
        # V[t, c] = zero_t + scale_t (m_c + u_tc): the weights p * scale go to the tensor
        # cores in fp16 after dividing each row by a power of two (pv.py's contract).
        z_acc += p * ze[:, None]
        # In the B fragments every warp holds the whole tile: the row maxima need no barrier.
        weights = gl.convert_layout(p * sc[:, None], B)
        amax = gl.max(gl.abs(weights), axis=0)
        pw = _pow2_at_most(amax)
        out = mma_v2(vt, (weights * (1.0 / pw)[None, :]).to(gl.float16), gl.zeros([D, 8], gl.float32, MMA))
        acc += out * gl.convert_layout(pw, gl.SliceLayout(0, MMA))[None, :]
    acc += gl.convert_layout(gl.sum(z_acc, axis=0), gl.SliceLayout(0, MMA))[None, :]
    chan = gl.arange(0, D, layout=gl.SliceLayout(1, MMA))
    cols = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))
    out_ptrs = part_ptr + b * s_partb + (h * GROUP + cols[None, :]) * s_parth + split * s_parts + chan[:, None]
    gl.store(out_ptrs, acc, mask=(cols < GROUP)[None, :])


def pv_gluon(p: torch.Tensor, v: PackedTensor, splits: int | None = None) -> torch.Tensor:
    """:func:`pv.pv` with this kernel (inputs validated, :func:`supported` true; GQA group <= 8).

    Returns fp32 ``[batch, q_heads, head_dim]``.
    """
    batch, q_heads, _ = p.shape
    group = q_heads // v.heads
    n_words = v.n_tokens // 32
    d = v.head_dim
    if n_words == 0:
        return torch.zeros(batch, q_heads, d, dtype=torch.float32, device=p.device)
    tile_words, cap = SETTINGS[d]
    mma, word_lanes, meta, weights = layouts(d, tile_words, d // 32)
    planes = max(1, v.width_bound)
    flat = flat_steps(v)
    key = ("pv_gluon", p.device, d, group, v.block_size, planes, tile_words, cap, flat)
    # One wave: the programs a multiprocessor holds (4 at head_dim 128 under the cap, 8 at
    # 64), counted on the compiled kernel.
    per_sm = _common.programs_per_sm(8 if d == 64 else 4, key)
    per_split, n_split = _common.tile_splits(batch * v.heads, n_words, tile_words, p.device, splits, per_sm)
    partial = torch.empty(batch, q_heads, n_split, d, dtype=torch.float32, device=p.device)
    compiled = _pv_gluon_kernel[(batch * v.heads, n_split)](
        p, partial, *packed_args(v), *p.stride(), *partial.stride()[:3], v.heads, n_words, per_split,
        GROUP=group, D=d, BLOCK=v.block_size, TW=tile_words, NPLANES=planes, FLAT=flat,
        MMA=mma, WQ=word_lanes, META=meta, WB=weights, num_warps=d // 32, **({"maxnreg": cap} if cap else {}),
    )
    _common.count_resident(key, compiled, p.device)
    return partial.sum(dim=2)
