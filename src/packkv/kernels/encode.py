"""GPU store stage: the reference codec's output from three Triton kernels.

``_encode_blocks_kernel`` (a program per (batch, head, block)) quantizes K and V, picks the
median order (or keeps the original one where that packs smaller, as the reference does),
writes scale and zero, flags values the codec rejects, and stages the integers in packed
order with per-pack minima, widths and word counts. ``_scan_kernel`` (one program) turns
the word counts into offsets after the words a pool already uses, and advances that count
on the device. ``_pack_kernel`` (a program per pack) writes the bit planes, the width
nibbles and the stored minima. Every tensor is bit-identical to :func:`packkv.compress_kv`.

The kernels write into a :class:`PackedTensor` of buffers with spare rows (capacity along
the pack or block dimension) from a given block on, so that
:class:`packkv.store.PackedStore` appends in place without a device sync;
:func:`encode_kv_fused` gives them buffers of the exact size.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..codec import check_kv, compress_kv
from ..codec.bitpack import MAX_WIDTH, PACK_ALIGN_WORDS, WORD_BITS
from ..codec.format import PackedKV, PackedTensor
from ..codec.quantize import FP16_MAX, level_bits
from ..config import PackKVConfig

FUSED_HEAD_DIMS = (64, 128)
# The value of a flag slot of ``counts`` while every value checked is accepted.
NO_BAD_VALUE = 2**63 - 1
_NO_BAD_VALUE = tl.constexpr(NO_BAD_VALUE)
_SCAN_CHUNK = 1024  # pack sizes the scan program sums at a time


@triton.jit
def _round_up_fp16(x):
    """The smallest fp16 >= x (x >= 0, fp32), capped at 65504: as quantize.round_up_fp16."""
    y = x.to(tl.float16)
    up = (y.to(tl.int16, bitcast=True) + 1).to(tl.float16, bitcast=True)
    y = tl.where(y.to(tl.float32) < x, up, y)
    return tl.minimum(y.to(tl.float32), 65504.0)


@triton.jit
def _quantize_tile(x, rel, TOKEN: tl.constexpr):
    """Quantize one block ``x: [S, D]`` fp32 as quantize.quantize_blocks does, bit for bit."""
    AXIS: tl.constexpr = 1 if TOKEN else 0
    lo = tl.min(x, axis=AXIS)
    hi = tl.max(x, axis=AXIS)
    step = _round_up_fp16(rel * (hi - lo))
    step = tl.where(step > 0, step, 1.0)
    if TOKEN:
        y = tl.math.div_rn(x - lo[:, None], step[:, None])
    else:
        y = tl.math.div_rn(x - lo[None, :], step[None, :])
    # Round half to even, like torch.round (y >= 0, so truncation is floor).
    f = y.to(tl.int32)
    d = y - f.to(tl.float32)
    q = f + ((d > 0.5) | ((d == 0.5) & ((f & 1) == 1))).to(tl.int32)
    return q, step, lo


@triton.jit
def _flag_bad_values(x, flag_ptr, tok, bh, n_bh, D: tl.constexpr):
    """Lower ``*flag_ptr`` to the key ``(tok * n_bh + bh) * D + channel`` of the first value
    of ``x: [S, D]`` (fp32, as loaded) that check_kv rejects; NaN fails ``<=`` too."""
    ok = tl.abs(x) <= 65504.0
    # The 64-bit keys only where a value is bad: an int32 reduction is all the common case costs.
    if tl.min(ok.to(tl.int32)) == 0:
        c = tl.arange(0, D)
        key = (tok[:, None] * n_bh + bh) * D + c[None, :]
        tl.atomic_min(flag_ptr, tl.min(tl.where(ok, _NO_BAD_VALUE, key)))


@triton.jit
def _pack_stats(q, pack_of, cap, S: tl.constexpr, P: tl.constexpr, D: tl.constexpr):
    """Per-pack minima and widths of ``q: [S, D]`` whose token t goes to pack pack_of[t]."""
    p = tl.arange(0, S // P)
    mins = tl.zeros([S // P, D], tl.int32)
    maxs = tl.zeros([S // P, D], tl.int32)
    for i in tl.static_range(S // P):
        member = (pack_of == i)[:, None]
        lo = tl.min(tl.where(member, q, 1 << 30), axis=0)
        hi = tl.max(tl.where(member, q, -1), axis=0)
        mins = tl.where((p == i)[:, None], tl.minimum(lo, cap)[None, :], mins)
        maxs = tl.where((p == i)[:, None], hi[None, :], maxs)
    u = maxs - mins
    # bit_length(u) for 0 <= u < 2**15, without a loop over bits; never above 15, whatever
    # q holds, which bounds a pack's words (pack_word_bound).
    widths = tl.zeros([S // P, D], tl.int32)
    for b in tl.static_range(15):
        widths += (u >> b) > 0
    return mins, widths


@triton.jit
def _lower_median(q, S: tl.constexpr, D: tl.constexpr):
    """torch.median of each row of ``q: [S, D]`` (0 <= q < 2**14): a bisection on the
    value, counting the elements at most mid (cheaper than a sort, here and in the
    interpreter)."""
    need = (D - 1) // 2 + 1
    lo = tl.zeros([S], tl.int32)
    hi = tl.full([S], (1 << 14) - 1, tl.int32)
    for _ in tl.static_range(14):
        mid = (lo + hi) // 2
        enough = tl.sum((q <= mid[:, None]).to(tl.int32), axis=1) >= need
        hi = tl.where(enough, mid, hi)
        lo = tl.where(enough, lo, mid + 1)
    return lo


@triton.jit
def _store_range(scale_ptr, zero_ptr, index, step, lo):
    tl.store(scale_ptr + index, step.to(tl.float16))
    tl.store(zero_ptr + index, lo.to(tl.float16))


@triton.jit
def _words(widths, WPP: tl.constexpr):
    """Words a pack stores: its planes, padded to a multiple of 4 (as bitpack pads)."""
    used = tl.sum(widths, axis=1) * WPP
    return (used + 3) // 4 * 4


# Strides, counts and rows change as a cache grows; specializing on them (divisible by 16,
# == 1) would recompile the kernel for seconds in the middle of a generation.
@triton.jit(do_not_specialize=[
    "sk_b", "sk_h", "sv_b", "sv_h", "heads", "n_blocks", "block_cap", "block_row0", "token_base",
    "k_rel", "v_rel", "cap",
])
def _encode_blocks_kernel(
    k_ptr, v_ptr, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
    k_ints_ptr, v_ints_ptr, k_mins_ptr, k_widths_ptr, v_mins_ptr, v_widths_ptr, k_sizes_ptr, v_sizes_ptr,
    perm_ptr, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, counts_ptr,
    heads, n_blocks, block_cap, block_row0, token_base, k_rel, v_rel, cap,
    S: tl.constexpr, D: tl.constexpr, P: tl.constexpr, WPP: tl.constexpr,
    K_TOKEN: tl.constexpr, V_TOKEN: tl.constexpr, MEDIAN: tl.constexpr,
):
    """One (batch, head, block): quantize K and V, choose the token order, write scale and
    zero to row ``block_row0 + block`` of buffers of ``block_cap`` rows, and stage the
    integers in packed order plus per-pack minima, widths and word counts."""
    bh = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    n_bh = tl.num_programs(0)
    b = bh // heads
    h = bh % heads
    t = tl.arange(0, S)
    c = tl.arange(0, D)
    tok = blk * S + t
    xk = tl.load(k_ptr + b * sk_b + h * sk_h + tok[:, None] * sk_t + c[None, :]).to(tl.float32)
    xv = tl.load(v_ptr + b * sv_b + h * sv_h + tok[:, None] * sv_t + c[None, :]).to(tl.float32)
    _flag_bad_values(xk, counts_ptr + 2, token_base + tok, bh, n_bh, D)
    _flag_bad_values(xv, counts_ptr + 3, token_base + tok, bh, n_bh, D)
    qk, k_step, k_lo = _quantize_tile(xk.to(tl.float16).to(tl.float32), k_rel, K_TOKEN)
    qv, v_step, v_lo = _quantize_tile(xv.to(tl.float16).to(tl.float32), v_rel, V_TOKEN)
    rank = t
    if MEDIAN:
        # Stable argsort of the lower median of each token's V integers, as a rank.
        med = _lower_median(qv, S, D)
        key = med * S + t
        by_median = tl.sum((key[None, :] < key[:, None]).to(tl.int32), axis=1)
        k_mins, k_widths = _pack_stats(qk, by_median // P, cap, S, P, D)
        v_mins, v_widths = _pack_stats(qv, by_median // P, cap, S, P, D)
        k_id_mins, k_id_widths = _pack_stats(qk, t // P, cap, S, P, D)
        v_id_mins, v_id_widths = _pack_stats(qv, t // P, cap, S, P, D)
        cost = tl.sum(_words(k_widths, WPP), 0) + tl.sum(_words(v_widths, WPP), 0)
        cost_id = tl.sum(_words(k_id_widths, WPP), 0) + tl.sum(_words(v_id_widths, WPP), 0)
        # Keep the original order where the median order would store more words.
        worse = cost > cost_id
        rank = tl.where(worse, t, by_median)
        k_mins = tl.where(worse, k_id_mins, k_mins)
        k_widths = tl.where(worse, k_id_widths, k_widths)
        v_mins = tl.where(worse, v_id_mins, v_mins)
        v_widths = tl.where(worse, v_id_widths, v_widths)
    else:
        k_mins, k_widths = _pack_stats(qk, t // P, cap, S, P, D)
        v_mins, v_widths = _pack_stats(qv, t // P, cap, S, P, D)
    row = (bh * n_blocks + blk) * S + rank  # staged position of each token
    tl.store(k_ints_ptr + row[:, None] * D + c[None, :], qk.to(tl.int16))
    tl.store(v_ints_ptr + row[:, None] * D + c[None, :], qv.to(tl.int16))
    tl.store(perm_ptr + row, tok)
    # Token ranges go to the tokens' packed positions, channel ranges to the block's row.
    dest = bh * block_cap + block_row0 + blk
    if K_TOKEN:
        _store_range(k_scale_ptr, k_zero_ptr, dest * S + rank, k_step, k_lo)
    else:
        _store_range(k_scale_ptr, k_zero_ptr, dest * D + c, k_step, k_lo)
    if V_TOKEN:
        _store_range(v_scale_ptr, v_zero_ptr, dest * S + rank, v_step, v_lo)
    else:
        _store_range(v_scale_ptr, v_zero_ptr, dest * D + c, v_step, v_lo)
    pk = (bh * n_blocks + blk) * (S // P) + tl.arange(0, S // P)
    stat = pk[:, None] * D + c[None, :]
    tl.store(k_mins_ptr + stat, k_mins.to(tl.uint8))
    tl.store(k_widths_ptr + stat, k_widths.to(tl.uint8))
    tl.store(v_mins_ptr + stat, v_mins.to(tl.uint8))
    tl.store(v_widths_ptr + stat, v_widths.to(tl.uint8))
    tl.store(k_sizes_ptr + pk, _words(k_widths, WPP))
    tl.store(v_sizes_ptr + pk, _words(v_widths, WPP))


@triton.jit
def _scan_side(sizes_ptr, count_ptr, offsets_ptr, n, packs_per_row, pack_cap, pack_row0, CHUNK: tl.constexpr):
    """Offsets of ``n`` packs (in (batch, head, pack) order, ``packs_per_row`` a (batch,
    head)) after the ``*count_ptr`` words used, into rows from ``pack_row0`` of a buffer of
    ``pack_cap`` rows; then advance ``*count_ptr`` past them."""
    used = tl.load(count_ptr)
    for start in range(0, n, CHUNK):
        i = start + tl.arange(0, CHUNK).to(tl.int64)
        size = tl.load(sizes_ptr + i, mask=i < n, other=0).to(tl.int64)
        ends = used + tl.cumsum(size, 0)
        row = (i // packs_per_row) * pack_cap + pack_row0 + i % packs_per_row
        tl.store(offsets_ptr + row, (ends - size).to(tl.int32), mask=i < n)
        used += tl.sum(size, 0)
    tl.store(count_ptr, used)


@triton.jit(do_not_specialize=["n", "packs_per_row", "pack_cap", "pack_row0"])
def _scan_kernel(
    k_sizes_ptr, v_sizes_ptr, counts_ptr, k_offsets_ptr, v_offsets_ptr, n, packs_per_row, pack_cap, pack_row0,
    CHUNK: tl.constexpr,
):
    _scan_side(k_sizes_ptr, counts_ptr, k_offsets_ptr, n, packs_per_row, pack_cap, pack_row0, CHUNK)
    _scan_side(v_sizes_ptr, counts_ptr + 1, v_offsets_ptr, n, packs_per_row, pack_cap, pack_row0, CHUNK)


@triton.jit
def _write_planes(u_ptr, pack, w, m, start, words_ptr, c, in_dim, D: tl.constexpr, WPP: tl.constexpr):
    """The bit planes of pack ``pack`` of ``u_ptr`` (rows ``[packs * 32 * WPP, D]``, minus
    ``m``) at ``words_ptr + start``, then its padding zeros (a reused pool holds old words)."""
    plane0 = tl.cumsum(w, 0) - w  # planes stored before channel c in this pack
    max_width = tl.max(w, 0)
    j = tl.arange(0, 32)
    for i in tl.static_range(WPP):
        rows = pack * (WPP * 32) + i * 32 + j
        u = tl.load(u_ptr + rows[:, None] * D + c[None, :], mask=in_dim[None, :], other=0).to(tl.int32) - m[None, :]
        for b in range(0, max_width):
            # Bit b of the 32 tokens, token j at bit j; int32 addition wraps onto bit 31.
            word = tl.sum(((u >> b) & 1) << j[:, None], axis=0)
            tl.store(words_ptr + start + (plane0 + b) * WPP + i, word, mask=in_dim & (b < w))
    used = tl.sum(w, 0) * WPP
    pad = used + tl.arange(0, 4)
    tl.store(words_ptr + start + pad, tl.zeros([4], tl.int32), mask=pad < (used + 3) // 4 * 4)


@triton.jit
def _pack_planes_kernel(u_ptr, widths_ptr, offsets_ptr, words_ptr, D: tl.constexpr, D_POW2: tl.constexpr,
                        WPP: tl.constexpr):
    pack = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, D_POW2)
    in_dim = c < D
    w = tl.load(widths_ptr + pack * D + c, mask=in_dim, other=0).to(tl.int32)
    start = tl.load(offsets_ptr + pack)
    _write_planes(u_ptr, pack, w, tl.zeros([D_POW2], tl.int32), start, words_ptr, c, in_dim, D, WPP)


@triton.jit
def _nibbles(ptr, even):
    """Bytes of two 4-bit codes, ``ptr[even]`` low and ``ptr[even + 1]`` high (bitpack.pack_nibbles)."""
    return (tl.load(ptr + even) | (tl.load(ptr + even + 1) << 4)).to(tl.uint8)


@triton.jit
def _pack_side(ints_ptr, mins_ptr, widths_ptr, pack, row, offsets_ptr, widths_out, mins_out, words_ptr,
               D: tl.constexpr, WPP: tl.constexpr, MIN_BITS: tl.constexpr):
    c = tl.arange(0, D)
    w = tl.load(widths_ptr + pack * D + c).to(tl.int32)
    m = tl.load(mins_ptr + pack * D + c).to(tl.int32)
    _write_planes(ints_ptr, pack, w, m, tl.load(offsets_ptr + row), words_ptr, c, c < D, D, WPP)
    half = tl.arange(0, D // 2)
    even = pack * D + 2 * half
    tl.store(widths_out + row * (D // 2) + half, _nibbles(widths_ptr, even))
    if MIN_BITS == 4:
        tl.store(mins_out + row * (D // 2) + half, _nibbles(mins_ptr, even))
    elif MIN_BITS == 8:
        tl.store(mins_out + row * D + c, m.to(tl.uint8))


@triton.jit(do_not_specialize=["packs_per_row", "pack_cap", "pack_row0"])
def _pack_kernel(
    k_ints_ptr, v_ints_ptr, k_mins_ptr, k_widths_ptr, v_mins_ptr, v_widths_ptr,
    k_offsets_ptr, k_widths_out, k_mins_out, k_words_ptr, v_offsets_ptr, v_widths_out, v_mins_out, v_words_ptr,
    packs_per_row, pack_cap, pack_row0,
    D: tl.constexpr, WPP: tl.constexpr, MIN_BITS: tl.constexpr,
):
    """Staged pack ``program_id(0)`` of K (``program_id(1) == 0``) or of V: its planes at
    the offset the scan wrote, its width nibbles and stored minima in its row."""
    pack = tl.program_id(0).to(tl.int64)
    row = (pack // packs_per_row) * pack_cap + pack_row0 + pack % packs_per_row
    if tl.program_id(1) == 0:
        _pack_side(k_ints_ptr, k_mins_ptr, k_widths_ptr, pack, row, k_offsets_ptr, k_widths_out, k_mins_out,
                   k_words_ptr, D, WPP, MIN_BITS)
    else:
        _pack_side(v_ints_ptr, v_mins_ptr, v_widths_ptr, pack, row, v_offsets_ptr, v_widths_out, v_mins_out,
                   v_words_ptr, D, WPP, MIN_BITS)


def pack_planes_triton(u: torch.Tensor, widths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`packkv.codec.bitpack.pack_planes`, as one Triton launch."""
    n_packs, pack_size, head_dim = u.shape
    wpp = pack_size // WORD_BITS
    used = widths.long().sum(1) * wpp
    sizes = (used + PACK_ALIGN_WORDS - 1) // PACK_ALIGN_WORDS * PACK_ALIGN_WORDS
    offsets = torch.cumsum(sizes, 0) - sizes
    words = torch.empty(int(sizes.sum()) if n_packs else 0, dtype=torch.int32, device=u.device)
    if words.numel():
        _pack_planes_kernel[(n_packs,)](
            u.to(torch.int32).contiguous(), widths.contiguous(), offsets, words,
            D=head_dim, D_POW2=triton.next_power_of_2(head_dim), WPP=wpp,
        )
    return words, offsets


def pack_word_bound(head_dim: int, pack_size: int) -> int:
    """The most words one pack can take, whatever the values encoded: every channel 15
    bits wide (already a multiple of 4, head_dim being one of 16)."""
    return head_dim * MAX_WIDTH * (pack_size // WORD_BITS)


def fused_serves(k: torch.Tensor, config: PackKVConfig) -> bool:
    """Whether the fused kernels encode ``k`` under ``config``: a CUDA tensor, head_dim 64
    or 128, median or no repacking, and a power-of-two block (a Triton tile's length)."""
    s = config.block_size
    return k.is_cuda and k.shape[-1] in FUSED_HEAD_DIMS and config.repack != "greedy" and s & (s - 1) == 0


def new_counts(device: torch.device | str) -> torch.Tensor:
    """A fresh ``counts`` for :func:`encode_blocks`: no words used, no value flagged."""
    return torch.tensor([0, 0, NO_BAD_VALUE, NO_BAD_VALUE], dtype=torch.int64, device=device)


def empty_buffers(batch: int, heads: int, n_blocks: int, head_dim: int, config: PackKVConfig, side: str,
                  device: torch.device | str) -> PackedTensor:
    """Uninitialized buffers for ``n_blocks`` blocks of K (``side="k"``) or V, no words yet."""
    grouping, rel = (config.k_grouping, config.k_rel) if side == "k" else (config.v_grouping, config.v_rel)
    s, p = config.block_size, config.pack_size
    n_packs = n_blocks * (s // p)
    group = s if grouping == "token" else head_dim

    def new(*shape, dtype):
        return torch.empty(batch, heads, *shape, dtype=dtype, device=device)

    return PackedTensor(
        words=torch.empty(0, dtype=torch.int32, device=device), offsets=new(n_packs, dtype=torch.int32),
        widths=new(n_packs, head_dim // 2, dtype=torch.uint8),
        mins=new(n_packs, head_dim * config.min_bits // 8, dtype=torch.uint8),
        scale=new(n_blocks, group, dtype=torch.float16), zero=new(n_blocks, group, dtype=torch.float16),
        grouping=grouping, block_size=s, pack_size=p, min_bits=config.min_bits, width_bound=level_bits(rel),
    )


class Staged(NamedTuple):
    """What :func:`encode_blocks` leaves for :func:`pack_blocks`, K's then V's."""

    ints: torch.Tensor  # int16 [2, packs * pack_size, head_dim], packed order
    stats: torch.Tensor  # uint8 [4, packs, head_dim]: K minima, K widths, V minima, V widths
    packs_per_row: int  # packs of one (batch, head)


def encode_blocks(
    k: torch.Tensor, v: torch.Tensor, config: PackKVConfig, k_dest: PackedTensor, v_dest: PackedTensor,
    block_row0: int, counts: torch.Tensor, token_base: int,
) -> tuple[Staged, torch.Tensor]:
    """Launch the encoder and the scan over the blocks of ``k`` and ``v`` (no device sync).

    Args:
        k, v: ``[batch, heads, n_blocks * block_size, head_dim]``, checked (bar their values)
            by the caller; head_dim 64 or 128.
        k_dest, v_dest: buffers ``[batch, heads, capacity, ...]`` with the same pack and
            block capacity; this call's blocks go to block rows ``[block_row0, block_row0 +
            n_blocks)`` (scale, zero) and the pack rows of those blocks (offsets). Their
            words are not touched.
        counts: int64 ``[4]`` on k's device. ``counts[0]`` and ``counts[1]``, the words K's
            and V's pools use, give the new packs' offsets and advance past them.
            ``counts[2]`` (K) and ``counts[3]`` (V) are lowered to the key ``((token_base
            + t) * batch * heads + b * heads + h) * head_dim + c`` of the first value at
            (b, h, t, c) that is not finite or beyond +-65504 (``NO_BAD_VALUE`` while none).
        token_base: added to the token index in those keys.

    Returns:
        What :func:`pack_blocks` needs, and the permutation, int64
        ``[batch, heads, n_blocks * block_size]`` (as ``compress_kv`` returns it).
    """
    b, h, n, d = k.shape
    s, p = config.block_size, config.pack_size
    nb = n // s
    n_packs = b * h * nb * (s // p)
    dev = k.device
    # The kernel reads rows with strides but each row's channels as consecutive elements.
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    ints = torch.empty(2, n_packs * p, d, dtype=torch.int16, device=dev)
    stats = torch.empty(4, n_packs, d, dtype=torch.uint8, device=dev)
    sizes = torch.empty(2, n_packs, dtype=torch.int32, device=dev)
    perm = torch.empty(b, h, nb * s, dtype=torch.int64, device=dev)
    _encode_blocks_kernel[(b * h, nb)](
        k, v, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        ints[0], ints[1], stats[0], stats[1], stats[2], stats[3], sizes[0], sizes[1],
        perm, k_dest.scale, k_dest.zero, v_dest.scale, v_dest.zero, counts,
        h, nb, k_dest.scale.shape[2], block_row0, token_base, config.k_rel, config.v_rel, (1 << config.min_bits) - 1,
        S=s, D=d, P=p, WPP=p // WORD_BITS,
        K_TOKEN=config.k_grouping == "token", V_TOKEN=config.v_grouping == "token",
        MEDIAN=config.repack == "median",
    )
    packs_per_row = nb * (s // p)
    _scan_kernel[(1,)](
        sizes[0], sizes[1], counts, k_dest.offsets, v_dest.offsets,
        n_packs, packs_per_row, k_dest.offsets.shape[2], block_row0 * (s // p), CHUNK=_SCAN_CHUNK,
    )
    return Staged(ints, stats, packs_per_row), perm


def pack_blocks(staged: Staged, k_dest: PackedTensor, v_dest: PackedTensor, block_row0: int) -> None:
    """Launch the packer: the staged packs' planes into ``k_dest.words`` / ``v_dest.words`` at
    the offsets :func:`encode_blocks` wrote (the pools must hold them), their width nibbles
    and minima into their rows."""
    n_packs = staged.stats.shape[1]
    ppb = k_dest.block_size // k_dest.pack_size
    _pack_kernel[(n_packs, 2)](
        staged.ints[0], staged.ints[1], *staged.stats,
        k_dest.offsets, k_dest.widths, k_dest.mins, k_dest.words,
        v_dest.offsets, v_dest.widths, v_dest.mins, v_dest.words,
        staged.packs_per_row, k_dest.offsets.shape[2], block_row0 * ppb,
        D=k_dest.head_dim, WPP=k_dest.pack_size // WORD_BITS, MIN_BITS=k_dest.min_bits,
    )


def encode_kv_fused(k: torch.Tensor, v: torch.Tensor, config: PackKVConfig) -> tuple[PackedKV, torch.Tensor]:
    """The fused path of :func:`encode_kv` (CUDA, or Triton's interpreter in tests).

    Needs what :func:`fused_serves` asks but the device; ``k`` and ``v`` checked bar their
    values, which the kernel checks (a rejected value raises check_kv's error). One device
    sync: the word totals and the value check. Returns the packed layer and the
    permutation, as ``compress_kv(..., return_permutation=True)``.
    """
    b, h, n, d = k.shape
    s = config.block_size
    nb = n // s
    full = nb * s
    dev = k.device
    dests = [empty_buffers(b, h, nb, d, config, side, dev) for side in ("k", "v")]
    counts = new_counts(dev)
    perm = torch.empty(b, h, 0, dtype=torch.int64, device=dev)
    if nb:
        staged, perm = encode_blocks(k, v, config, *dests, 0, counts, 0)
    # The kernel checked the blocks' values; the tail's are checked here, in the same sync.
    tail_bad = [(~(t[:, :, full:].abs() <= FP16_MAX)).any() for t in (k, v)]
    k_words, v_words, k_bad, v_bad, *tail = torch.cat([counts, torch.stack(tail_bad).long()]).tolist()
    if min(k_bad, v_bad) != NO_BAD_VALUE or any(tail):
        check_kv(k, v)  # raises, naming the first rejected value
    dests = [replace(dest, words=torch.empty(n_words, dtype=torch.int32, device=dev))
             for dest, n_words in zip(dests, (k_words, v_words))]
    if nb:
        pack_blocks(staged, *dests, 0)
    # copy=True: an fp16 input's tail slice would otherwise be the caller's memory.
    k_tail, v_tail = (t[:, :, full:].to(torch.float16, copy=True).contiguous() for t in (k, v))
    return PackedKV(k=dests[0], v=dests[1], k_tail=k_tail, v_tail=v_tail, config=config, dtype=k.dtype), perm


def encode_kv(
    k: torch.Tensor, v: torch.Tensor, config: PackKVConfig | None = None, *, return_permutation: bool = False
) -> PackedKV | tuple[PackedKV, torch.Tensor]:
    """:func:`packkv.compress_kv` on the GPU; the output is identical either way.

    Where :func:`fused_serves` says so, three fused kernels do the whole store stage with
    one device sync. Greedy repacking (sequential, better ratio) and other head dims or
    block sizes take the reference codec with the Triton bit-plane packer on CUDA. On CPU
    this is the reference codec.
    """
    config = config or PackKVConfig()
    check_kv(k, v, values=False)
    if fused_serves(k, config):
        packed, perm = encode_kv_fused(k, v, config)
        return (packed, perm) if return_permutation else packed
    packer = pack_planes_triton if k.is_cuda else None
    return compress_kv(k, v, config, return_permutation=return_permutation, packer=packer)
